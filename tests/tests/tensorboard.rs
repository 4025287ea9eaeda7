//! TensorBoard: every job's scalars land as event files in its checkpoint
//! directory, and TensorBoard's own reader (`EventAccumulator`, from the
//! `tensorboard` package scripts/env.sh installs) finds what the
//! coordinator reports: the loss and samples/s of every step, the test
//! accuracy of every evaluation. A job resumed into the same directory
//! continues the curve; `checkpoint.tensorboard = false` writes none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringtrain_common::security::CertRole;
use ringtrain_common::tensorboard::{event_files, read_run, EventWriter};
use ringtrain_proto as pb;
use ringtrain_tests::{mlp_spec, python, skip, skip_without_data, wait_for, with_token, Cluster};

/// Prints `{tag: [[step, value], ...]}` of a directory's event files as
/// TensorBoard loads them (every scalar kept), or `{"missing": why}`.
const READ_EVENTS: &str = r#"
import json, sys
try:
    from tensorboard.backend.event_processing import event_accumulator as ea
except ImportError as e:
    print(json.dumps({"missing": str(e)}))
    sys.exit(0)
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0})
acc.Reload()
print(json.dumps({t: [[s.step, s.value] for s in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

/// (step, value) by tag.
type Curves = BTreeMap<String, Vec<(u64, f64)>>;

/// The directory's scalars as TensorBoard reads them; None after [`skip`].
fn tensorboard_curves(dir: &Path) -> Option<Curves> {
    let out = python(&["-c", READ_EVENTS, dir.to_str().expect("path")])?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON from the reader");
    if let Some(why) = v["missing"].as_str() {
        skip(&format!(
            "TensorBoard's Python package is missing ({why}; scripts/env.sh installs it)"
        ));
        return None;
    }
    let curves = v
        .as_object()
        .expect("tags")
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .expect("points")
                .iter()
                .map(|p| (p[0].as_u64().expect("step"), p[1].as_f64().expect("value")))
                .collect();
            (tag.clone(), points)
        })
        .collect();
    Some(curves)
}

/// Waits until the directory's event files (read by our own reader) hold
/// `tag` at `step`: the coordinator flushes a job's file as it ends, just
/// after the watch sees the end.
fn wait_for_scalar(dir: &Path, tag: &str, step: i64) {
    wait_for(
        &format!("{tag} at step {step} in {}", dir.display()),
        Duration::from_secs(15),
        || {
            read_run(dir)
                .ok()?
                .iter()
                .any(|s| s.tag == tag && s.step == step)
                .then_some(())
        },
    );
}

/// The job's rows as GetJobMetrics returns them.
fn job_metrics(cluster: &Cluster, job: &str) -> Vec<pb::MetricRow> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c =
            pb::coordinator_client::CoordinatorClient::new(cluster.channel(CertRole::Client).await);
        let token = cluster.admin_token();
        c.get_job_metrics(with_token(
            pb::GetJobRequest {
                job_id: job.to_string(),
            },
            Some(&token),
        ))
        .await
        .expect("GetJobMetrics")
        .into_inner()
        .rows
    })
}

/// The value a TensorBoard scalar holds for `x`: float32.
fn assert_f32_eq(what: &str, got: f64, want: f64) {
    assert_eq!(
        got as f32, want as f32,
        "{what}: TensorBoard has {got}, the coordinator {want}"
    );
}

fn steps(points: &[(u64, f64)]) -> Vec<u64> {
    points.iter().map(|p| p.0).collect()
}

fn curve<'a>(curves: &'a Curves, tag: &str) -> &'a [(u64, f64)] {
    curves
        .get(tag)
        .unwrap_or_else(|| panic!("no {tag} scalars: {:?}", curves.keys()))
}

/// Each row's loss and samples/s, and each evaluation, equal TensorBoard's
/// values at that step.
fn assert_matches_rows(curves: &Curves, rows: &[pb::MetricRow]) {
    let at = |tag: &str, step: u64| {
        curve(curves, tag)
            .iter()
            .find(|p| p.0 == step)
            .unwrap_or_else(|| panic!("no {tag} at step {step}"))
            .1
    };
    for r in rows {
        if r.loss.is_finite() {
            assert_f32_eq(&format!("loss at {}", r.step), at("loss", r.step), r.loss);
            assert_f32_eq(
                &format!("samples_per_s at {}", r.step),
                at("samples_per_s", r.step),
                r.samples_per_s,
            );
        }
        if r.has_eval {
            assert_f32_eq(
                &format!("test_accuracy at {}", r.step),
                at("test_accuracy", r.step),
                r.test_accuracy,
            );
            assert_f32_eq(
                &format!("test_loss at {}", r.step),
                at("test_loss", r.step),
                r.test_loss,
            );
        }
    }
}

#[test]
fn every_job_writes_tensorboard_scalars_that_match_its_metrics() {
    if skip_without_data() {
        return;
    }
    let cluster = Cluster::start(2);
    let spec = mlp_spec();

    // 30 steps, evaluated at 10, 20 and the end.
    let v = cluster.submit_and_watch(&spec, &["max_steps=30", "eval_every_steps=10"]);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["steps"], 30);
    let job = v["job"].as_str().expect("job").to_string();
    let dir = PathBuf::from(v["checkpoint_dir"].as_str().expect("checkpoint dir"));
    wait_for_scalar(&dir, "test_accuracy", 30);
    let Some(curves) = tensorboard_curves(&dir) else {
        return;
    };
    eprintln!("tags: {:?}", curves.keys());
    let all: Vec<u64> = (1..=30).collect();
    for tag in ["loss", "samples_per_s", "allreduce_s"] {
        let c = curve(&curves, tag);
        assert_eq!(steps(c), all, "{tag}: one value per step, in order");
        assert!(
            c.iter().all(|p| p.1.is_finite() && p.1 >= 0.0),
            "{tag}: {c:?}"
        );
    }
    assert!(curve(&curves, "samples_per_s").iter().all(|p| p.1 > 0.0));
    assert!(
        curve(&curves, "allreduce_s").iter().any(|p| p.1 > 0.0),
        "a ring of 2 spends time in its all-reduce"
    );
    for tag in ["test_accuracy", "test_loss"] {
        assert_eq!(steps(curve(&curves, tag)), [10, 20, 30], "{tag}");
    }
    let rows = job_metrics(&cluster, &job);
    assert_eq!(
        rows.iter().filter(|r| r.loss.is_finite()).count(),
        30,
        "{rows:?}"
    );
    assert_matches_rows(&curves, &rows);
    let accuracy = v["test_accuracy"].as_f64().expect("accuracy");
    assert_f32_eq(
        "final test accuracy",
        curve(&curves, "test_accuracy")[2].1,
        accuracy,
    );
    assert!(accuracy > 0.5, "30 MLP steps learn something: {accuracy}");

    // Resumed into the same directory: a second file, the steps go on.
    let o = cluster.cli(&[
        "submit",
        &spec,
        "--resume",
        dir.to_str().expect("path"),
        "--watch",
        "--json",
        "--set",
        "max_steps=40",
        "--set",
        "eval_every_steps=10",
        "--set",
        &format!("checkpoint.dir={}", dir.display()),
    ]);
    assert!(
        o.status.success(),
        "resume: {}",
        ringtrain_tests::stderr(&o)
    );
    let resumed = ringtrain_tests::last_json(&o);
    assert_eq!(resumed["state"], "succeeded", "{resumed}");
    assert_eq!(resumed["steps"], 40);
    wait_for_scalar(&dir, "test_accuracy", 40);
    assert_eq!(event_files(&dir).expect("dir").len(), 2, "one file per job");
    let curves = tensorboard_curves(&dir).expect("the reader ran before");
    let all: Vec<u64> = (1..=40).collect();
    for tag in ["loss", "samples_per_s", "allreduce_s"] {
        assert_eq!(steps(curve(&curves, tag)), all, "{tag} across the resume");
    }
    assert_eq!(steps(curve(&curves, "test_accuracy")), [10, 20, 30, 40]);
    let second = resumed["job"].as_str().expect("job");
    let rows = job_metrics(&cluster, second);
    assert_eq!(
        rows.iter()
            .filter(|r| r.loss.is_finite())
            .map(|r| r.step)
            .collect::<Vec<_>>(),
        (31..=40).collect::<Vec<_>>()
    );
    assert_matches_rows(&curves, &rows);
    assert_f32_eq(
        "resumed final test accuracy",
        curve(&curves, "test_accuracy")[3].1,
        resumed["test_accuracy"].as_f64().expect("accuracy"),
    );

    // Turned off: the checkpoint directory holds no event file.
    let off = cluster.submit_and_watch(&spec, &["max_steps=3", "checkpoint.tensorboard=false"]);
    assert_eq!(off["state"], "succeeded", "{off}");
    let off_dir = PathBuf::from(off["checkpoint_dir"].as_str().expect("dir"));
    wait_for("the job's metrics.csv", Duration::from_secs(15), || {
        off_dir.join("metrics.csv").is_file().then_some(())
    });
    assert_eq!(event_files(&off_dir).expect("dir"), Vec::<PathBuf>::new());
}

/// A rollback as the coordinator writes it (a session START at the step the
/// job goes back to, in its file or at the head of a new one) is what
/// TensorBoard's reader honours: the redone steps replace the abandoned ones,
/// as our own reader ([`read_run`]) says.
#[test]
fn tensorboard_keeps_the_steps_a_rollback_redid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let mut w = EventWriter::create(&run).expect("event file");
    for step in 1..=5 {
        w.scalars(1.0, step, &[("loss", step as f32)])
            .expect("write");
    }
    w.session_start(2.0, 3).expect("write");
    for step in 3..=6 {
        w.scalars(2.0, step, &[("loss", 10.0 * step as f32)])
            .expect("write");
    }
    w.flush().expect("flush");
    let mut w2 = EventWriter::create(&run).expect("event file");
    w2.session_start(3.0, 6).expect("write");
    w2.scalars(3.0, 6, &[("loss", 600.0)]).expect("write");
    w2.scalars(3.0, 7, &[("loss", 700.0)]).expect("write");
    w2.flush().expect("flush");
    let want = [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
        (5, 50.0),
        (6, 600.0),
        (7, 700.0),
    ];
    let ours: Vec<(u64, f64)> = read_run(&run)
        .expect("read")
        .iter()
        .map(|s| (s.step as u64, f64::from(s.value)))
        .collect();
    assert_eq!(ours, want);
    let Some(curves) = tensorboard_curves(&run) else {
        return;
    };
    assert_eq!(curve(&curves, "loss"), want);
}
