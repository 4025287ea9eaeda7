//! A coordinator and workers as child processes on this machine: what
//! `ringtrain local`, the benchmarks and the end-to-end tests run. Built on
//! [`Supervisor`] (per-process logs, ready files, PDEATHSIG, stop on Drop).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{ProcessError, Signal, Supervisor};

/// How long a process may take to be ready (workers register first).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the processes listen and what they advertise.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `ringtrain` binary.
    pub program: PathBuf,
    /// Every process listens on this IP (port 0).
    pub listen_ip: String,
    /// The host workers advertise to their ring neighbours.
    pub advertise: String,
    /// The coordinator's data roots (empty: its defaults).
    pub data_roots: Vec<PathBuf>,
    /// The coordinator's checkpoint root (None: its data dir).
    pub checkpoint_root: Option<PathBuf>,
    /// Run in the clear; otherwise (the default) certificates are made in
    /// `RUN_DIR/tls` and everything speaks mutual TLS.
    pub insecure: bool,
}

impl ClusterOptions {
    /// Everything on 127.0.0.1.
    pub fn loopback(program: PathBuf) -> Self {
        Self {
            program,
            listen_ip: "127.0.0.1".into(),
            advertise: "127.0.0.1".into(),
            data_roots: Vec::new(),
            checkpoint_root: None,
            insecure: false,
        }
    }
}

pub struct LocalCluster {
    procs: Supervisor,
    options: ClusterOptions,
    /// The coordinator's data dir: its job store and default checkpoints.
    pub data_dir: PathBuf,
    /// `https://127.0.0.1:PORT` (`http://` when insecure).
    pub coordinator_url: String,
    /// The throwaway TLS dir every process uses (None when insecure).
    pub tls_dir: Option<PathBuf>,
    workers_started: usize,
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl LocalCluster {
    /// A coordinator (data in `run_dir`, logs in `run_dir/logs`) and
    /// `workers` workers, all ready. Workers boot in parallel.
    pub fn start(
        run_dir: &Path,
        workers: usize,
        options: ClusterOptions,
    ) -> Result<Self, ProcessError> {
        let tls_dir = if options.insecure {
            None
        } else {
            let dir = run_dir.join("tls");
            let hosts: Vec<String> = [&options.listen_ip, &options.advertise]
                .into_iter()
                .filter(|h| !h.is_empty() && h.as_str() != "0.0.0.0")
                .cloned()
                .collect();
            crate::security::certs::init(&dir, &hosts, true).map_err(|e| {
                ProcessError::Io(
                    format!("making certificates in {}", dir.display()),
                    std::io::Error::other(e),
                )
            })?;
            Some(dir)
        };
        let mut cluster = Self {
            procs: Supervisor::new(&run_dir.join("logs"))?,
            options,
            data_dir: run_dir.to_path_buf(),
            coordinator_url: String::new(),
            tls_dir,
            workers_started: 0,
        };
        let listen = format!("{}:0", cluster.options.listen_ip);
        cluster.start_coordinator(&listen)?;
        let names: Vec<String> = (0..workers)
            .map(|_| cluster.spawn_worker(&[], None, None, None))
            .collect::<Result<_, _>>()?;
        for name in names {
            cluster.procs.wait_ready(&name, READY_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// `--tls-dir DIR`, or `--insecure`.
    pub fn security_args(&self) -> Vec<String> {
        match &self.tls_dir {
            Some(dir) => vec!["--tls-dir".into(), text(dir)],
            None => vec!["--insecure".into()],
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls_dir.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn start_coordinator(&mut self, listen: &str) -> Result<(), ProcessError> {
        let data = text(&self.data_dir);
        let program = self.options.program.clone();
        let security = self.security_args();
        let mut args: Vec<String> = [
            "coordinator",
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
        ]
        .map(String::from)
        .to_vec();
        for root in &self.options.data_roots {
            args.extend(["--data-root".to_string(), text(root)]);
        }
        if let Some(root) = &self.options.checkpoint_root {
            args.extend(["--checkpoint-root".to_string(), text(root)]);
        }
        args.extend(security);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.procs.spawn("coordinator", &[], &program, &args)?;
        let ready = self.procs.wait_ready("coordinator", READY_TIMEOUT)?;
        let port = ready["grpc"]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .ok_or_else(|| ProcessError::BadReadyFile {
                name: "coordinator".into(),
                path: text(&self.procs.dir().join("coordinator.ready")),
                message: "no gRPC address".into(),
            })?;
        self.coordinator_url = format!("{}://127.0.0.1:{port}", self.scheme());
        Ok(())
    }

    /// Starts a worker without waiting; returns its name.
    fn spawn_worker(
        &mut self,
        wrapper: &[&str],
        coordinator: Option<&str>,
        listen: Option<&str>,
        advertise: Option<&str>,
    ) -> Result<String, ProcessError> {
        let name = format!("worker-{}", self.workers_started);
        self.workers_started += 1;
        let default_listen = format!("{}:0", self.options.listen_ip);
        let listen = listen.unwrap_or(&default_listen);
        let url = coordinator.unwrap_or(&self.coordinator_url).to_string();
        let program = self.options.program.clone();
        let advertise = advertise.unwrap_or(&self.options.advertise).to_string();
        let security = self.security_args();
        let mut args = vec![
            "worker",
            "--coordinator",
            &url,
            "--listen",
            listen,
            "--ring-listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--advertise-host",
            &advertise,
        ];
        args.extend(security.iter().map(String::as_str));
        self.procs.spawn(&name, wrapper, &program, &args)?;
        Ok(name)
    }

    /// Starts one more worker and waits until it has registered.
    pub fn add_worker(&mut self) -> Result<String, ProcessError> {
        let name = self.spawn_worker(&[], None, None, None)?;
        self.procs.wait_ready(&name, READY_TIMEOUT)?;
        Ok(name)
    }

    /// Starts a worker under `wrapper` (e.g. `ip netns exec NS`) that
    /// reaches the coordinator at `coordinator`, listens on `listen` and
    /// advertises `advertise` to its ring neighbours.
    pub fn add_worker_with(
        &mut self,
        wrapper: &[&str],
        coordinator: &str,
        listen: &str,
        advertise: &str,
    ) -> Result<String, ProcessError> {
        let name = self.spawn_worker(wrapper, Some(coordinator), Some(listen), Some(advertise))?;
        self.procs.wait_ready(&name, READY_TIMEOUT)?;
        Ok(name)
    }

    /// kill -9 of the coordinator, then a new one on the same address and
    /// data dir.
    pub fn restart_coordinator(&mut self) -> Result<(), ProcessError> {
        self.procs.kill("coordinator")?;
        let hostport = self
            .coordinator_url
            .split_once("://")
            .map_or(self.coordinator_url.as_str(), |(_, rest)| rest);
        let listen = hostport.replace("127.0.0.1", &self.options.listen_ip);
        self.start_coordinator(&listen)
    }

    pub fn kill(&mut self, name: &str) -> Result<(), ProcessError> {
        self.procs.kill(name)
    }

    pub fn signal(&mut self, name: &str, sig: Signal) -> Result<(), ProcessError> {
        self.procs.signal(name, sig)
    }

    /// What `name` wrote to its ready file.
    pub fn ready(&self, name: &str) -> Option<&serde_json::Value> {
        self.procs.get(name).map(|p| &p.ready)
    }

    /// The log file of (the newest process called) `name`.
    /// The pid of process `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(|p| p.pid())
    }

    pub fn log_path(&self, name: &str) -> Option<&Path> {
        self.procs.get(name).map(|p| p.log.as_path())
    }

    /// The directory of every log.
    pub fn logs(&self) -> &Path {
        self.procs.dir()
    }

    /// The tail of every log.
    pub fn tails(&self, lines: usize) -> String {
        self.procs.tails(lines)
    }
}
