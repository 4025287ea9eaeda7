//! Child processes of the `ringtrain` binary, supervised: each logs to its
//! own file, announces itself through a ready file, dies with its parent
//! (PR_SET_PDEATHSIG), and is stopped when the [`Supervisor`] is dropped
//! (SIGTERM, a grace period, then SIGKILL). A child is signalled only until
//! it is reaped, never after, so a pid the kernel has handed to another
//! process is never signalled. If the current thread is panicking (a failing
//! test), the tail of every log is printed on Drop.
//!
//! [`crate::local_cluster`] builds a coordinator and workers on top of it,
//! for `ringtrain local`, the benchmarks and the end-to-end tests.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Why a child could not be started, waited for or signalled.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("starting {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready: {last_line}")]
    ExitedEarly {
        name: String,
        status: ExitStatus,
        last_line: String,
    },
    #[error("{name} was not ready within {timeout:?}; see {log}")]
    NotReady {
        name: String,
        timeout: Duration,
        log: String,
    },
    #[error("{name}: ready file {path}: {message}")]
    BadReadyFile {
        name: String,
        path: String,
        message: String,
    },
    #[error("no process {0}")]
    Unknown(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// Signals a test or the harness sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
    Stop,
    Cont,
    Int,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Int => libc::SIGINT,
        }
    }
}

/// One supervised child.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    ready_file: PathBuf,
    /// What the child wrote to its ready file (Null until it has).
    pub ready: serde_json::Value,
    /// Reaped: its pid is no longer ours to signal.
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reaps the child if it has exited; true while it runs.
    fn running(&mut self) -> bool {
        if self.exited.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
            }
        }
        self.exited.is_none()
    }

    #[allow(unsafe_code)]
    fn signal(&mut self, sig: Signal) -> Result<(), ProcessError> {
        if !self.running() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| ProcessError::Unknown(self.name.clone()))?;
        // SAFETY: kill(2) on the pid of a child we spawned and have not
        // reaped: it cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig.number()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(ProcessError::Io(format!("signalling {}", self.name), e));
        }
        Ok(())
    }

    fn wait(&mut self) {
        if self.exited.is_none() {
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
    }
}

/// The last `n` lines of a file (for error messages and failing tests).
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

/// A group of supervised children whose logs and ready files live in one
/// directory.
pub struct Supervisor {
    dir: PathBuf,
    procs: Vec<Proc>,
    /// Grace between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
}

impl Supervisor {
    /// Logs and ready files go into `dir` (created).
    pub fn new(dir: &Path) -> Result<Self, ProcessError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ProcessError::Io(format!("creating {}", dir.display()), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            procs: Vec::new(),
            grace: Duration::from_secs(5),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `program ARGS --ready-file FILE` (under `wrapper`, e.g.
    /// `ip netns exec NS`, when not empty) as `name`, logging to
    /// `<dir>/<name>.log` (`<name>-N.log` for the N-th reuse of a name).
    pub fn spawn(
        &mut self,
        name: &str,
        wrapper: &[&str],
        program: &Path,
        args: &[&str],
    ) -> Result<(), ProcessError> {
        let reuse = self.procs.iter().filter(|p| p.name == name).count();
        let log = match reuse {
            0 => self.dir.join(format!("{name}.log")),
            n => self.dir.join(format!("{name}-{n}.log")),
        };
        let ready_file = self.dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready_file);
        let io = |what: &str, e| ProcessError::Io(format!("{what} {}", log.display()), e);
        let file = File::create(&log).map_err(|e| io("creating", e))?;
        let err = file.try_clone().map_err(|e| io("opening", e))?;
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .arg("--ready-file")
            .arg(&ready_file)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_string(),
            source,
        })?;
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
            ready_file,
            ready: serde_json::Value::Null,
            exited: None,
        });
        Ok(())
    }

    /// Waits until `name` has written its ready file and returns what it
    /// wrote; fails at once if it exits first, naming its last log line.
    pub fn wait_ready(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, ProcessError> {
        let deadline = Instant::now() + timeout;
        let p = self.proc_mut(name)?;
        loop {
            if let Ok(text) = std::fs::read_to_string(&p.ready_file) {
                // Written atomically (renamed into place): whole or absent.
                let value: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| ProcessError::BadReadyFile {
                        name: name.to_string(),
                        path: p.ready_file.display().to_string(),
                        message: e.to_string(),
                    })?;
                p.ready = value.clone();
                return Ok(value);
            }
            if !p.running() {
                return Err(ProcessError::ExitedEarly {
                    name: name.to_string(),
                    status: p.exited.unwrap_or_default(),
                    last_line: tail(&p.log, 1),
                });
            }
            if Instant::now() > deadline {
                return Err(ProcessError::NotReady {
                    name: name.to_string(),
                    timeout,
                    log: p.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for `name` to exit; its exit status, or None
    /// if it still runs.
    pub fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        let p = self.proc_mut(name)?;
        while p.running() {
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(p.exited)
    }

    /// The newest process called `name`.
    pub fn get(&self, name: &str) -> Option<&Proc> {
        self.procs.iter().rev().find(|p| p.name == name)
    }

    fn proc_mut(&mut self, name: &str) -> Result<&mut Proc, ProcessError> {
        self.procs
            .iter_mut()
            .rev()
            .find(|p| p.name == name)
            .ok_or_else(|| ProcessError::Unknown(name.to_string()))
    }

    /// Sends `sig` to `name` (nothing, once it has exited and been reaped).
    pub fn signal(&mut self, name: &str, sig: Signal) -> Result<(), ProcessError> {
        self.proc_mut(name)?.signal(sig)
    }

    /// kill -9 of `name`, and reaps it.
    pub fn kill(&mut self, name: &str) -> Result<(), ProcessError> {
        let p = self.proc_mut(name)?;
        p.signal(Signal::Kill)?;
        p.wait();
        Ok(())
    }

    /// True while `name` runs.
    pub fn running(&mut self, name: &str) -> bool {
        self.proc_mut(name).is_ok_and(Proc::running)
    }

    /// The tail of every log, one block per process.
    pub fn tails(&self, lines: usize) -> String {
        self.procs
            .iter()
            .map(|p| {
                format!(
                    "----- last lines of {} ({}) -----\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM to every child (newest first, so workers go before the
    /// coordinator finishes its reports), then SIGKILL to what is left after
    /// the grace period; reaps them all.
    pub fn stop_all(&mut self) {
        for p in self.procs.iter_mut().rev() {
            let _ = p.signal(Signal::Term);
        }
        let deadline = Instant::now() + self.grace;
        for p in &mut self.procs {
            while p.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = p.signal(Signal::Kill);
            p.wait();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
        if std::thread::panicking() {
            eprintln!("{}", self.tails(30));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "program" that writes its ready file (the last argument) and waits.
    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("child.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
        path
    }

    #[test]
    fn a_child_is_ready_when_it_says_so_and_is_stopped_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            r#"for f; do r=$f; done; echo starting; echo '{"port": 7}' > "$r.tmp"; mv "$r.tmp" "$r"; exec sleep 60"#,
        );
        let pid;
        {
            let mut s = Supervisor::new(&dir.path().join("logs")).unwrap();
            s.spawn("c", &[], &prog, &[]).unwrap();
            let ready = s.wait_ready("c", Duration::from_secs(10)).unwrap();
            assert_eq!(ready["port"], 7);
            assert_eq!(tail(&s.get("c").unwrap().log, 1), "starting");
            pid = s.get("c").unwrap().pid();
            assert!(s.running("c"));
        }
        // Reaped on Drop: no such process any more.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_child_that_dies_before_it_is_ready_is_reported_with_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(dir.path(), "echo 'error: no such dataset'; exit 3");
        let mut s = Supervisor::new(dir.path()).unwrap();
        s.spawn("w", &[], &prog, &[]).unwrap();
        let err = s.wait_ready("w", Duration::from_secs(10)).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "w exited (exit status: 3) before it was ready: error: no such dataset"
            ),
            "{err}"
        );
        // Reaped: signalling it again is a no-op, not a signal to a stranger.
        s.kill("w").unwrap();
        s.signal("w", Signal::Term).unwrap();
        assert!(matches!(s.kill("nobody"), Err(ProcessError::Unknown(_))));
    }
}
