//! A trainer that panics fails its job with the panic's message and the
//! worker takes new work; a non-finite gradient is handled alike on every
//! replica, as the job's `on_nonfinite` says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringtrain_tests::{last_json, local, local_output, stderr, wait_for, Cluster};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const FEATURES: usize = 4;
const TRAIN: usize = 32;
/// The training sample whose first feature is +Inf (when poisoned); past
/// the few samples the dry run before acceptance looks at.
const POISONED: usize = 13;

/// A tiny two-class data set: `train.safetensors` (32 samples) and
/// `test.safetensors` (16), 4 features each; with `poison`, one training
/// sample holds an Inf, which makes the gradient of whichever step uses it
/// NaN (Inf · weights of both signs), on one replica only.
fn tiny_data(dir: &Path, poison: bool) -> (PathBuf, PathBuf) {
    let write = |name: &str, n: usize, poisoned: Option<usize>| {
        let mut x: Vec<f32> = (0..n * FEATURES)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        if let Some(s) = poisoned {
            x[s * FEATURES] = f32::INFINITY;
        }
        let y: Vec<i64> = (0..n)
            .map(|s| i64::from(x[s * FEATURES + 1] > 0.0))
            .collect();
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            (
                "inputs",
                TensorView::new(Dtype::F32, vec![n, FEATURES], &xb).expect("inputs"),
            ),
            (
                "targets",
                TensorView::new(Dtype::I64, vec![n], &yb).expect("targets"),
            ),
        ];
        let path = dir.join(name);
        safetensors::serialize_to_file(tensors, None, &path).expect("write data");
        path
    };
    (
        write("train.safetensors", TRAIN, poison.then_some(POISONED)),
        write("test.safetensors", 16, None),
    )
}

/// A job spec file for the tiny data set (2 workers, global batch 16: two
/// steps an epoch).
fn tiny_spec(dir: &Path, poison: bool, extra: &str) -> String {
    let (train, test) = tiny_data(dir, poison);
    let path = dir.join("job.toml");
    let text = format!(
        "name = \"tiny\"\nmodel = \"mlp\"\nworkers = 2\nbatch_size = 8\nseed = 3\n{extra}\n\
         [dataset]\nformat = \"safetensors\"\npath = \"{}\"\ntest_path = \"{}\"\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.1\n",
        train.display(),
        test.display()
    );
    std::fs::write(&path, text).expect("write spec");
    path.to_string_lossy().into_owned()
}

/// Everything the processes of a `ringtrain local` run logged.
fn run_logs(run_dir: &Path) -> String {
    let mut all = String::new();
    for f in std::fs::read_dir(run_dir.join("logs"))
        .expect("logs dir")
        .flatten()
    {
        all += &std::fs::read_to_string(f.path()).unwrap_or_default();
    }
    all
}

/// The steps the coordinator logged as skipped, in order.
fn skipped_steps_logged(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter(|l| l.contains("non-finite gradient: every member skipped the step"))
        .filter_map(|l| {
            let rest = &l[l.find("step=")? + 5..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_nonfinite_gradient_skips_the_step_on_every_replica_or_fails_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = tiny_spec(dir.path(), true, "epochs = 2");

    // skip_step: the poisoned sample is in one step of each epoch. The
    // coordinator compares every replica's parameter hash at every step and
    // fails the job if they differ, so success means the replicas stayed
    // identical through the skipped steps.
    let run = dir.path().join("skip");
    let v = local(&spec, 2, &run, &["on_nonfinite=skip_step"]);
    assert_eq!(v["steps"], 4, "{v}");
    assert_eq!(v["skipped_steps"], 2, "one skipped step an epoch: {v}");
    let logs = run_logs(&run);
    let skipped = skipped_steps_logged(&logs);
    assert_eq!(
        skipped.len(),
        2,
        "the coordinator logs each skipped step once"
    );
    assert_eq!(
        logs.matches("non-finite gradient after the all-reduce: step skipped on every replica")
            .count(),
        4,
        "both workers skip both steps"
    );
    // The parameters never took the NaN in.
    let ckpt = Path::new(v["checkpoint_dir"].as_str().expect("checkpoint dir"));
    let bytes = std::fs::read(ckpt.join("model.safetensors")).expect("model file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    for (name, t) in st.tensors() {
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert!(
            values.iter().all(|x| x.is_finite()),
            "{name} holds a non-finite value"
        );
    }
    assert!(v["test_accuracy"].as_f64().is_some(), "{v}");

    // fail (the default): the job ends at the first such step, naming it.
    let o = local_output(&spec, 2, &dir.path().join("fail"), &[]);
    assert!(!o.status.success(), "the job must fail: {}", stderr(&o));
    let v = last_json(&o);
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().expect("error");
    assert!(
        error.contains(&format!("non-finite gradient at step {}", skipped[0])),
        "the same seed meets the Inf at the same step ({skipped:?}): {error}"
    );
    assert!(!error.contains('\n'), "one line: {error}");
}

/// A trainer panic (here injected: every panic a job spec could reach is
/// refused by validation, so the worker's test-only fault injection
/// `RINGTRAIN_FAULT_INJECT=trainer_panic_at_step=N` stands in for one) fails
/// the job with the panic's message, logged as one line; the worker lives
/// on and trains the next job.
#[test]
fn a_trainer_panic_fails_the_job_and_the_worker_takes_new_work() {
    let mut cluster = Cluster::start(1);
    // Inside the cluster's directory: the coordinator confines data to its roots.
    let spec = tiny_spec(cluster.dir.path(), false, "");
    let coordinator = cluster.coordinator.clone();
    let faulty = cluster.start_worker_with(
        &["env", "RINGTRAIN_FAULT_INJECT=trainer_panic_at_step=3"],
        &coordinator,
        "127.0.0.1:0",
        "127.0.0.1",
    );

    // Steps not overlapped: each completes before the next begins, so the
    // count at the panic is exact (an overlapped step 2 would still be
    // pending as step 3 began, and count only once step 3's forward pass
    // had applied it).
    let job = cluster.submit(&spec, &["max_steps=10", "ring.overlap=false"]);
    let v = last_json(&cluster.cli(&["watch", &job, "--json"]));
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().expect("error");
    assert!(
        error.starts_with("worker w")
            && error.contains(
                "trainer panicked: fault injection: RINGTRAIN_FAULT_INJECT=trainer_panic_at_step=3"
            ),
        "{error}"
    );
    assert_eq!(v["steps"], 2, "the panic came as step 3 began: {v}");
    // One log line for the panic, not the default multi-line report.
    let log = wait_for("the panic in the log", Duration::from_secs(10), || {
        let log = cluster.log(&faulty);
        log.contains("trainer panicked").then_some(log)
    });
    assert_eq!(log.matches("panic: fault injection").count(), 1, "{log}");
    if std::env::var_os("RUST_BACKTRACE").is_none_or(|v| v == "0") {
        assert!(
            !log.contains("panicked at") && !log.contains("RUST_BACKTRACE"),
            "a raw panic report in the log:\n{log}"
        );
    }

    // Both workers, the one that panicked among them, train the next job.
    let next = cluster.submit(&spec, &["max_steps=2"]);
    let v = last_json(&cluster.cli(&["watch", &next, "--json"]));
    assert_eq!(v["state"], "succeeded", "{v}");
    let joined = cluster
        .log(&faulty)
        .lines()
        .any(|l| l.contains("joining ring") && l.contains(&format!("job={next}")));
    assert!(joined, "the worker that panicked trained job {next}");
}
