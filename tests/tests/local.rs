//! `ringtrain local` stops everything it started: on Ctrl-C, and even when
//! it is killed outright (its children die with it).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ringtrain_tests::{mlp_spec, ringtrain_bin, skip_without_data, wait_for};

/// Processes whose command line mentions `needle` (other than `except`).
fn processes_mentioning(needle: &str, except: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == except {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

fn start_local(run_dir: &Path) -> Child {
    let spec = mlp_spec();
    Command::new(ringtrain_bin())
        .args(["local", spec.as_str(), "--set", "max_steps=100000000"])
        .arg("--run-dir")
        .arg(run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringtrain local")
}

fn wait_until_training(run_dir: &Path) {
    wait_for("the local job to train", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(run_dir.join("logs/coordinator.log")).ok()?;
        log.contains(" step").then_some(())
    });
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn ctrl_c_stops_the_job_and_every_process() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run");
    let mut local = start_local(&run_dir);
    wait_until_training(&run_dir);
    let needle = run_dir.to_string_lossy().into_owned();
    assert!(
        processes_mentioning(&needle, local.id()).len() >= 3,
        "coordinator and workers running"
    );
    signal(local.id(), "-INT");
    let status = wait_for("local to exit", Duration::from_secs(30), || {
        local.try_wait().ok().flatten()
    });
    assert!(!status.success(), "an interrupted run exits non-zero");
    let mut err = String::new();
    std::io::Read::read_to_string(local.stderr.as_mut().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        processes_mentioning(&needle, 0),
        Vec::<u32>::new(),
        "no orphan left"
    );
}

#[test]
fn children_die_with_a_killed_local() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run");
    let mut local = start_local(&run_dir);
    wait_until_training(&run_dir);
    let needle = run_dir.to_string_lossy().into_owned();
    local.kill().expect("kill -9 local");
    let _ = local.wait();
    wait_for(
        "the children to die with their parent",
        Duration::from_secs(10),
        || processes_mentioning(&needle, 0).is_empty().then_some(()),
    );
}
