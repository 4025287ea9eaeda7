//! Test-cluster harness: real `ringtrain` processes on loopback.
//!
//! Every process gets a log file in the cluster's temp dir and binds port 0;
//! its ready file says where it listens. On Drop every child is killed, and
//! if the test is failing the tail of every log is printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// True, after saying so, where Fashion-MNIST is not installed: tests that
/// train skip there. scripts/test.sh installs it, so CI never skips them.
pub fn skip_without_data() -> bool {
    let missing = !Path::new(FASHION_MNIST).is_dir();
    if missing {
        eprintln!("SKIPPED: {FASHION_MNIST} missing (scripts/test.sh installs it)");
    }
    missing
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

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    ready: serde_json::Value,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    procs: Vec<Proc>,
    pub coordinator: String,
    workers_started: usize,
    /// Address workers advertise to ring neighbours.
    advertise: String,
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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
        let mut c = Cluster {
            dir,
            procs: Vec::new(),
            coordinator: String::new(),
            workers_started: 0,
            advertise: advertise.to_string(),
        };
        let listen = format!("{listen_ip}:0");
        let data = c.dir.path().join("data").to_string_lossy().into_owned();
        let ready = c.spawn(
            "coordinator",
            &[
                "coordinator",
                "--listen",
                &listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
                &data,
            ],
        );
        let port = ready["grpc"]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .expect("grpc addr")
            .to_string();
        c.coordinator = format!("http://127.0.0.1:{port}");
        for _ in 0..workers {
            let url = c.coordinator.clone();
            let advertise = c.advertise.clone();
            c.start_worker_with(&[], &url, &format!("{listen_ip}:0"), &advertise);
        }
        c
    }

    /// Starts one more worker; returns its name.
    pub fn start_worker(&mut self) -> String {
        let (url, advertise) = (self.coordinator.clone(), self.advertise.clone());
        self.start_worker_with(&[], &url, "127.0.0.1:0", &advertise)
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
        let name = format!("worker-{}", self.workers_started);
        self.workers_started += 1;
        let args = [
            "worker",
            "--coordinator",
            coordinator,
            "--listen",
            listen,
            "--ring-listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--advertise-host",
            advertise,
        ];
        self.spawn_wrapped(&name, wrapper, &args);
        name
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> serde_json::Value {
        self.spawn_wrapped(name, &[], args)
    }

    fn spawn_wrapped(&mut self, name: &str, wrapper: &[&str], args: &[&str]) -> serde_json::Value {
        let n = self
            .procs
            .iter()
            .filter(|p| p.name.starts_with(name))
            .count();
        let log = self.dir.path().join(format!("{name}-{n}.log"));
        let ready = self.dir.path().join(format!("{name}.ready"));
        let file = std::fs::File::create(&log).expect("log file");
        let bin = ringtrain_bin();
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(args)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn ringtrain");
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log: log.clone(),
            ready: serde_json::Value::Null,
        });
        let value: serde_json::Value = wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(30),
            || {
                let text = std::fs::read_to_string(&ready).ok()?;
                serde_json::from_str(&text).ok()
            },
        );
        if let Some(p) = self.procs.last_mut() {
            p.ready = value.clone();
        }
        value
    }

    fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Starts a new coordinator on the same address and data dir as the
    /// first one (after that one was killed).
    pub fn restart_coordinator(&mut self) {
        let addr = self.coordinator.trim_start_matches("http://").to_string();
        let data = self.dir.path().join("data").to_string_lossy().into_owned();
        if let Some(p) = self.procs.iter_mut().find(|p| p.name == "coordinator") {
            let _ = p.child.kill();
            let _ = p.child.wait();
            p.name = "coordinator (old)".into();
        }
        let ready = self.dir.path().join("coordinator.ready");
        let _ = std::fs::remove_file(&ready);
        self.spawn(
            "coordinator",
            &[
                "coordinator",
                "--listen",
                &addr,
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
                &data,
            ],
        );
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT") to a process.
    pub fn signal(&mut self, name: &str, signal: &str) {
        let pid = self.proc(name).child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal} {name}");
    }

    /// `ringtrain ARGS --coordinator URL`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(ringtrain_bin())
            .args(args)
            .args(["--coordinator", &self.coordinator])
            .stdin(Stdio::null())
            .output()
            .expect("run ringtrain")
    }

    /// `ringtrain submit SPEC --set S...`; returns the new job's id.
    pub fn submit(&self, spec: &str, sets: &[&str]) -> String {
        let mut args = vec!["submit", spec];
        for s in sets {
            args.extend(["--set", s]);
        }
        let o = self.cli(&args);
        assert!(o.status.success(), "submit failed: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    /// GET /metrics of a process.
    pub fn metrics(&mut self, name: &str) -> String {
        let addr = self.proc(name).ready["metrics"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} serves no metrics"))
            .to_string();
        http_get(&addr, "/metrics")
    }

    /// The job's status as `status --json` prints it.
    pub fn status(&self, job: &str) -> serde_json::Value {
        last_json(&self.cli(&["status", job, "--json"]))
    }

    pub fn log(&mut self, name: &str) -> String {
        std::fs::read_to_string(&self.proc(name).log).unwrap_or_default()
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

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!(
                    "----- last lines of {} ({}) -----\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 30)
                );
            }
        }
    }
}
