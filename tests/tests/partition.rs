//! A network partition: one worker lives in its own network namespace,
//! joined to the host by a veth pair, and the link is cut mid-job. The
//! others go on; when the link comes back the worker rejoins as a new member.
//! Linux only; skipped with a message where namespaces cannot be made.

use std::process::Command;
use std::time::Duration;

use ringtrain_tests::{mlp_spec, skip, skip_without_data, stderr, wait_for, Cluster};

const HOST_IP: &str = "169.254.77.1";
const NS_IP: &str = "169.254.77.2";

/// A namespace with a veth link to the host; removed on Drop.
struct NetNs {
    name: String,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl NetNs {
    fn create() -> Result<Self, String> {
        let id = std::process::id();
        let ns = NetNs {
            name: format!("rtp{id}"),
            host_if: format!("rtp{id}a"),
        };
        let peer = format!("rtp{id}b");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{NS_IP}/30"),
            "dev",
            &peer,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn set_link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]).expect("link state");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn steps(v: &serde_json::Value) -> u64 {
    v["steps"].as_u64().unwrap_or(0)
}

#[test]
fn a_partitioned_worker_is_dropped_and_rejoins_when_the_link_returns() {
    if skip_without_data() {
        return;
    }
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) => {
            skip(&format!("cannot make a network namespace here ({e})"));
            return;
        }
    };
    let mut cluster = Cluster::start_on(2, "0.0.0.0", HOST_IP);
    let port = cluster
        .coordinator
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    let remote = format!("http://{HOST_IP}:{port}");
    cluster.start_worker_with(
        &["ip", "netns", "exec", &ns.name],
        &remote,
        "0.0.0.0:0",
        NS_IP,
    );

    let spec = mlp_spec();
    let job = cluster.submit(&spec, &["workers=3", "max_steps=1000000"]);
    wait_for("training on three workers", Duration::from_secs(60), || {
        let v = cluster.status(&job);
        (steps(&v) >= 5 && v["ring_workers"] == 3).then_some(())
    });

    ns.set_link(false);
    let cut_at = steps(&cluster.status(&job));
    wait_for(
        "the others to go on without it",
        Duration::from_secs(60),
        || {
            let v = cluster.status(&job);
            (v["ring_workers"] == 2 && steps(&v) > cut_at + 5).then_some(())
        },
    );

    ns.set_link(true);
    let healed_at = steps(&cluster.status(&job));
    wait_for("the worker to rejoin", Duration::from_secs(60), || {
        let v = cluster.status(&job);
        (v["ring_workers"] == 3 && steps(&v) > healed_at + 5).then_some(())
    });
    assert_eq!(
        cluster.status(&job)["state"],
        "running",
        "replica hashes agree"
    );
    let o = cluster.cli(&["cancel", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
}
