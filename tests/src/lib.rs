//! Test-cluster harness: real `ringtrain` processes on this machine, through
//! the same [`LocalCluster`] that `ringtrain local` and the benchmarks use
//! (per-process logs, ready files, children die with the test, every child
//! stopped on Drop, log tails printed when the test fails).
//!
//! A test that cannot do its real check here (no data set, no network
//! namespaces, a missing tool) calls [`skip`]: outside CI that prints
//! SKIPPED and the test returns; with `CI` set it fails with the reason,
//! since CI's machine has everything.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use ringtrain_common::local_cluster::{ClusterOptions, LocalCluster};
pub use ringtrain_common::process::{Signal, Supervisor};

/// The release binary built by scripts/test.sh (`cargo build --release`).
pub fn ringtrain_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/release/deps/<test> -> target/release/ringtrain
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("ringtrain"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build --release)",
        bin.display()
    );
    bin
}

pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

pub use ringtrain_common::testing::skip;

/// [`skip`] where Fashion-MNIST is not installed (scripts/test.sh installs it).
pub fn skip_without_data() -> bool {
    let train = Path::new(FASHION_MNIST).join("train-images-idx3-ubyte.gz");
    let plain = Path::new(FASHION_MNIST).join("train-images-idx3-ubyte");
    !(train.is_file() || plain.is_file())
        && skip(&format!(
            "the Fashion-MNIST data set is missing from {FASHION_MNIST} (scripts/test.sh installs Debian's dataset-fashion-mnist)"
        ))
}

/// The project's Python (`.venv`, made by scripts/env.sh), running `args`;
/// None, after [`skip`], where it is missing. A failing script fails the test.
pub fn python(args: &[&str]) -> Option<String> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if !python.is_file() {
        skip(&format!(
            "{} is missing (scripts/env.sh makes it)",
            python.display()
        ));
        return None;
    }
    let o = Command::new(&python)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    assert!(
        o.status.success(),
        "python {}: {}",
        args.join(" "),
        stderr(&o)
    );
    Some(stdout(&o))
}

/// `examples/export_model.py --model MODEL --out OUT EXTRA...`: a TorchScript file.
pub fn export_model(model: &str, out: &Path, extra: &[&str]) -> Option<PathBuf> {
    let script = examples().join("export_model.py");
    let mut args = vec![
        script.to_str().expect("path"),
        "--model",
        model,
        "--out",
        out.to_str().expect("path"),
    ];
    args.extend(extra);
    python(&args).map(|_| out.to_path_buf())
}

/// `tests/fixtures/make_data.py ARGS`.
pub fn fixture(args: &[&str]) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/make_data.py");
    let mut all = vec![script.to_str().expect("path")];
    all.extend(args);
    python(&all)
}

/// `ringtrain local SPEC --workers N --json --run-dir DIR --set S...`: the
/// final status line of a job that must succeed.
pub fn local(spec: &str, workers: usize, run_dir: &Path, sets: &[&str]) -> serde_json::Value {
    let o = local_output(spec, workers, run_dir, sets);
    assert!(o.status.success(), "local failed:\n{}", stderr(&o));
    let v = last_json(&o);
    assert_eq!(v["state"], "succeeded", "{v}");
    v
}

/// `ringtrain local ...` as it ran, for jobs that must fail.
pub fn local_output(spec: &str, workers: usize, run_dir: &Path, sets: &[&str]) -> Output {
    let workers = workers.to_string();
    let run_dir = run_dir.to_string_lossy().into_owned();
    let mut args = vec![
        "local",
        spec,
        "--workers",
        &workers,
        "--json",
        "--run-dir",
        &run_dir,
    ];
    for s in with_overlap(sets) {
        args.extend(["--set", s]);
    }
    run(&args)
}

/// The train losses of a finished job, by step, from its metrics.csv.
pub fn losses(checkpoint_dir: &str) -> Vec<f64> {
    let csv = std::fs::read_to_string(Path::new(checkpoint_dir).join("metrics.csv"))
        .unwrap_or_else(|e| panic!("{checkpoint_dir}/metrics.csv: {e}"));
    csv.lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(2)?.parse().ok())
        .collect()
}

/// Mean of the first and of the last `n` values.
pub fn first_and_last(values: &[f64], n: usize) -> (f64, f64) {
    let n = n.min(values.len() / 2).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&values[..n]), mean(&values[values.len() - n..]))
}

/// The examples/ directory of the repository.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// `examples/fashion-mlp.toml`, as a command-line argument.
pub fn mlp_spec() -> String {
    examples()
        .join("fashion-mlp.toml")
        .to_string_lossy()
        .into_owned()
}

/// `examples/fashion-cnn.toml`, as a command-line argument.
pub fn cnn_spec() -> String {
    examples()
        .join("fashion-cnn.toml")
        .to_string_lossy()
        .into_owned()
}

/// A test job's settings, with gradient overlap forced on unless the test
/// says otherwise: every member of a test cluster is on this host, where
/// `ring.overlap = "auto"` would turn it off, and the fault and training
/// tests must hold with it.
fn with_overlap<'a>(sets: &[&'a str]) -> Vec<&'a str> {
    let mut out = sets.to_vec();
    if !sets.iter().any(|s| s.starts_with("ring.overlap=")) {
        out.push("ring.overlap=true");
    }
    out
}

/// Polls `check` until it returns Some or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs `ringtrain ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(ringtrain_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ringtrain")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The last JSON line of a command's stdout.
pub fn last_json(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in stdout:\n{out}\nstderr:\n{}", stderr(o)));
    serde_json::from_str(line).expect("JSON line")
}

/// A coordinator and workers for one test, in a temporary directory.
pub struct Cluster {
    // Dropped first: the processes stop before their directory goes.
    inner: LocalCluster,
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub coordinator: String,
}

impl Cluster {
    /// A coordinator and `workers` workers, all ready, on loopback.
    pub fn start(workers: usize) -> Cluster {
        Self::start_on(workers, "127.0.0.1", "127.0.0.1")
    }

    /// Like [`Cluster::start`], but every process listens on `listen_ip` and
    /// workers advertise `advertise` (e.g. a veth address that a network
    /// namespace can reach).
    pub fn start_on(workers: usize, listen_ip: &str, advertise: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        // Tests make their data sets and models in their own directory.
        let options = ClusterOptions {
            program: ringtrain_bin(),
            listen_ip: listen_ip.into(),
            advertise: advertise.into(),
            data_roots: vec![
                dir.path().to_path_buf(),
                PathBuf::from("/usr/share/datasets"),
            ],
            checkpoint_root: Some(dir.path().to_path_buf()),
            // Every test runs over mutual TLS, as a real cluster should.
            insecure: false,
        };
        let inner = LocalCluster::start(&dir.path().join("data"), workers, options)
            .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
        Cluster {
            coordinator: inner.coordinator_url.clone(),
            inner,
            dir,
        }
    }

    /// The cluster's TLS dir (certificates and the admin token).
    pub fn tls_dir(&self) -> &Path {
        self.inner
            .tls_dir
            .as_deref()
            .expect("test clusters run over TLS")
    }

    /// `ringtrain ARGS` as a client of this cluster would run it: with its
    /// TLS dir (and so its admin token) in the environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ringtrain_bin());
        c.args(args)
            .env("RINGTRAIN_TLS_DIR", self.tls_dir())
            .env_remove("RINGTRAIN_INSECURE")
            .env_remove("RINGTRAIN_TOKEN")
            .stdin(Stdio::null());
        c
    }

    /// A gRPC channel to the coordinator with `role`'s certificate, as a
    /// client (or a worker) of this cluster would open it.
    pub async fn channel(
        &self,
        role: ringtrain_common::security::CertRole,
    ) -> tonic::transport::Channel {
        use ringtrain_common::security::{CertRole, Transport};
        Transport::from_flags(Some(self.tls_dir()), false)
            .expect("tls dir")
            .endpoint(&self.coordinator, role, Some(CertRole::Coordinator))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// The admin's bearer token.
    pub fn admin_token(&self) -> String {
        ringtrain_common::security::default_token(self.tls_dir()).expect("admin token")
    }

    /// The pid of process `name` ("coordinator", "worker-0", ...).
    pub fn pid(&self, name: &str) -> u32 {
        self.inner
            .pid(name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// What process `name` wrote to its ready file (its addresses).
    pub fn ready(&self, name: &str) -> serde_json::Value {
        self.inner
            .ready(name)
            .cloned()
            .unwrap_or_else(|| panic!("no ready file of {name}"))
    }

    /// Every process's log tail, for a failure message.
    pub fn tails(&self, lines: usize) -> String {
        self.inner.tails(lines)
    }

    /// The coordinator's data dir (job store, default checkpoints).
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Starts one more worker; returns its name.
    pub fn start_worker(&mut self) -> String {
        self.inner
            .add_worker()
            .unwrap_or_else(|e| panic!("starting a worker: {e}\n{}", self.inner.tails(20)))
    }

    /// Starts a worker through `wrapper` (e.g. `ip netns exec NS`), reaching
    /// the coordinator at `coordinator` and advertising `advertise`.
    pub fn start_worker_with(
        &mut self,
        wrapper: &[&str],
        coordinator: &str,
        listen: &str,
        advertise: &str,
    ) -> String {
        self.inner
            .add_worker_with(wrapper, coordinator, listen, advertise)
            .unwrap_or_else(|e| panic!("starting a worker: {e}\n{}", self.inner.tails(20)))
    }

    /// kill -9 of the coordinator, then a new one on the same address and
    /// data dir.
    pub fn restart_coordinator(&mut self) {
        self.inner
            .restart_coordinator()
            .unwrap_or_else(|e| panic!("restarting the coordinator: {e}"));
        self.coordinator = self.inner.coordinator_url.clone();
    }

    /// Sends `signal` to a process.
    pub fn signal(&mut self, name: &str, signal: Signal) {
        self.inner
            .signal(name, signal)
            .unwrap_or_else(|e| panic!("signal {signal:?} to {name}: {e}"));
    }

    /// `ringtrain ARGS --coordinator URL`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args)
            .args(["--coordinator", &self.coordinator])
            .output()
            .expect("run ringtrain")
    }

    /// `ringtrain submit SPEC --set S...`; returns the new job's id.
    pub fn submit(&self, spec: &str, sets: &[&str]) -> String {
        let mut args = vec!["submit", spec];
        for s in with_overlap(sets) {
            args.extend(["--set", s]);
        }
        let o = self.cli(&args);
        assert!(o.status.success(), "submit failed: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    /// `ringtrain submit SPEC --set S... --watch --json` to the job's end;
    /// returns its final status line (the submission must succeed).
    pub fn submit_and_watch(&self, spec: &str, sets: &[&str]) -> serde_json::Value {
        let mut args = vec!["submit", spec, "--watch", "--json"];
        for s in with_overlap(sets) {
            args.extend(["--set", s]);
        }
        let o = self.cli(&args);
        assert!(o.status.success(), "submit --watch failed: {}", stderr(&o));
        last_json(&o)
    }

    /// GET /metrics of a process.
    pub fn metrics(&self, name: &str) -> String {
        let addr = self
            .inner
            .ready(name)
            .and_then(|r| r["metrics"].as_str())
            .unwrap_or_else(|| panic!("{name} serves no metrics"))
            .to_string();
        http_get(&addr, "/metrics")
    }

    /// The job's status as `status --json` prints it.
    pub fn status(&self, job: &str) -> serde_json::Value {
        last_json(&self.cli(&["status", job, "--json"]))
    }

    /// What (the newest process called) `name` has logged so far.
    pub fn log(&self, name: &str) -> String {
        self.inner
            .log_path(name)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 GET, returning the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// `message` with `Authorization: Bearer TOKEN` (none: no header).
pub fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    r
}
