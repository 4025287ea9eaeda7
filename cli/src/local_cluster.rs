//! A coordinator and N workers as child processes on loopback, for
//! `ringtrain local` and `ringtrain bench train`. Every child logs to its own
//! file, dies with its parent (PR_SET_PDEATHSIG), and is killed on Drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

pub struct LocalCluster {
    run_dir: PathBuf,
    pub logs: PathBuf,
    workers_started: usize,
    pub coordinator_url: String,
    children: Vec<(String, Child)>,
}

/// The last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

impl LocalCluster {
    pub fn start(run_dir: &Path, workers: usize) -> anyhow::Result<Self> {
        let logs = run_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let mut cluster = LocalCluster {
            run_dir: run_dir.to_path_buf(),
            logs,
            coordinator_url: String::new(),
            children: Vec::new(),
            workers_started: 0,
        };
        let ready = run_dir.join("coordinator.ready");
        let _ = std::fs::remove_file(&ready);
        let data_dir = run_dir.to_string_lossy().into_owned();
        let ready_arg = ready.to_string_lossy().into_owned();
        cluster.spawn(
            "coordinator",
            &[
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
                &data_dir,
                "--ready-file",
                &ready_arg,
            ],
        )?;
        let info = cluster.wait_ready("coordinator", &ready)?;
        let grpc = info["grpc"]
            .as_str()
            .ok_or_else(|| anyhow!("coordinator ready file lacks its address"))?;
        cluster.coordinator_url = format!("http://{grpc}");
        // Start them all, then wait: workers boot in parallel.
        let mut readies = Vec::new();
        for _ in 0..workers {
            readies.push(cluster.spawn_worker()?);
        }
        for (name, ready) in readies {
            cluster.wait_ready(&name, &ready)?;
        }
        Ok(cluster)
    }

    fn spawn_worker(&mut self) -> anyhow::Result<(String, PathBuf)> {
        let name = format!("worker-{}", self.workers_started);
        self.workers_started += 1;
        let ready = self.run_dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let url = self.coordinator_url.clone();
        let ready_arg = ready.to_string_lossy().into_owned();
        self.spawn(
            &name,
            &[
                "worker",
                "--coordinator",
                &url,
                "--listen",
                "127.0.0.1:0",
                "--ring-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--advertise-host",
                "127.0.0.1",
                "--ready-file",
                &ready_arg,
            ],
        )?;
        Ok((name, ready))
    }

    /// Starts one more worker and waits until it has registered.
    pub fn add_worker(&mut self) -> anyhow::Result<String> {
        let (name, ready) = self.spawn_worker()?;
        self.wait_ready(&name, &ready)?;
        Ok(name)
    }

    /// kill -9 of one child.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| anyhow!("no process {name}"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the ringtrain binary")?;
        let log_path = self.logs.join(format!("{name}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn wait_ready(&mut self, name: &str, ready: &Path) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = self.logs.join(format!("{name}.log"));
        loop {
            if let Ok(text) = std::fs::read_to_string(ready) {
                return serde_json::from_str(&text).with_context(|| format!("{name} ready file"));
            }
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) {
                if let Some(status) = child.try_wait()? {
                    let last = tail(&log, 1);
                    bail!("{name} exited ({status}) before it was ready: {last}");
                }
            }
            if Instant::now() > deadline {
                bail!("{name} was not ready within 30s; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[allow(unsafe_code)]
fn terminate(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SIGTERM first, so the coordinator finishes its job reports; SIGKILL
        // whatever is still there after a grace period.
        for (_, child) in self.children.iter_mut().rev() {
            terminate(child);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for (_, child) in self.children.iter_mut() {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
