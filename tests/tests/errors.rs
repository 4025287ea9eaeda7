//! Every error a user can hit gives one clear line and a non-zero exit.

use ringtrain_tests::{examples, run, stderr, Cluster};

fn error_line(o: &std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stderr(o)
    );
    let err = stderr(o);
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"))
        .to_string();
    line
}

fn spec_with(extra: &str) -> tempfile::NamedTempFile {
    let base = std::fs::read_to_string(examples().join("fashion-mlp.toml")).expect("example");
    let f = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(f.path(), format!("{extra}\n{base}")).expect("write");
    f
}

#[test]
fn an_unknown_spec_key_is_named() {
    let f = spec_with("learning_rate = 0.1");
    let o = run(&["local", f.path().to_str().expect("path"), "--json"]);
    let line = error_line(&o);
    assert!(line.contains("learning_rate"), "{line}");
}

#[test]
fn a_bad_value_set_on_the_command_line_is_named() {
    let spec = examples().join("fashion-mlp.toml");
    let o = run(&[
        "local",
        spec.to_str().expect("path"),
        "--set",
        "optimizer.lr=-0.5",
    ]);
    let line = error_line(&o);
    assert!(
        line.contains("optimizer.lr must be a positive number"),
        "{line}"
    );
    let o = run(&[
        "local",
        spec.to_str().expect("path"),
        "--set",
        "model=resnet",
    ]);
    let line = error_line(&o);
    assert!(line.contains("model") && line.contains("resnet"), "{line}");
}

#[test]
fn a_missing_spec_file_is_named() {
    let o = run(&["local", "/nonexistent/job.toml"]);
    let line = error_line(&o);
    assert!(
        line.contains("cannot read job spec /nonexistent/job.toml"),
        "{line}"
    );
}

#[test]
fn a_missing_dataset_is_reported_before_anything_starts() {
    let spec = examples().join("fashion-mlp.toml");
    let o = run(&[
        "local",
        spec.to_str().expect("path"),
        "--set",
        "dataset.path=/nonexistent/fmnist",
    ]);
    let line = error_line(&o);
    assert!(
        line.contains("dataset not found: /nonexistent/fmnist"),
        "{line}"
    );
}

#[test]
fn a_worker_that_cannot_reach_the_coordinator_says_so() {
    // Port 1 on loopback: nothing listens there.
    let o = run(&[
        "worker",
        "--coordinator",
        "http://127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--ring-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
        "--connect-timeout-s",
        "1",
        "--insecure",
    ]);
    let line = error_line(&o);
    assert!(
        line.contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{line}"
    );
}

#[test]
fn client_commands_name_an_unreachable_coordinator_and_unknown_jobs() {
    let o = run(&[
        "status",
        "--insecure",
        "--coordinator",
        "http://127.0.0.1:1",
    ]);
    let line = error_line(&o);
    assert!(
        line.contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{line}"
    );

    let cluster = Cluster::start(0);
    let o = cluster.cli(&["status", "0123456789abcdef"]);
    assert!(error_line(&o).contains("no job 0123456789abcdef"));
    let o = cluster.cli(&["cancel", "not-a-job"]);
    assert!(error_line(&o).contains("'not-a-job' is not a job id"));
}

#[test]
fn a_bad_coordinator_config_key_is_named() {
    let f = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(f.path(), "listen = \"127.0.0.1:0\"\nlisten_port = 3\n").expect("write");
    let o = run(&["coordinator", "--config", f.path().to_str().expect("path")]);
    let line = error_line(&o);
    assert!(line.contains("unknown key 'listen_port'"), "{line}");
}

#[test]
fn resuming_from_a_directory_without_a_checkpoint_is_refused() {
    let spec = examples().join("fashion-mlp.toml");
    let o = run(&["local", spec.to_str().expect("path"), "--resume", "/tmp"]);
    let line = error_line(&o);
    assert!(
        line.contains("cannot resume: /tmp holds no checkpoint"),
        "{line}"
    );
}
