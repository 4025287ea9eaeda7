//! End-to-end training on Fashion-MNIST through `ringtrain local` and a
//! test cluster: equivalence of the gradient merge, resume, convergence,
//! and the client commands against a live coordinator.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use ringtrain_tests::{
    cnn_spec, last_json, local, mlp_spec, run, skip_without_data, stderr, wait_for, Cluster,
};
use safetensors::SafeTensors;

fn load_params(dir: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("checkpoint file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("momentum."))
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, data)
        })
        .collect()
}

/// max over tensors of max|a-b| / max|b|.
fn max_relative_difference(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f64 {
    assert_eq!(a.len(), b.len(), "same tensors");
    a.iter()
        .map(|(name, x)| {
            let y = &b[name];
            let diff = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            let scale = y.iter().map(|q| q.abs()).fold(0f32, f32::max).max(1e-12);
            f64::from(diff / scale)
        })
        .fold(0.0, f64::max)
}

/// lr 0.01: at the demo's lr 0.05 with momentum 0.9 the first steps are so
/// sensitive that f32 rounding differences (1e-7 after 3 steps, measured)
/// grow to 3e-3 by step 10 and 8e-2 by step 20 whatever the merge, which
/// would hide a real error instead of testing for one.
#[test]
fn four_workers_of_16_equal_one_worker_of_64() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let four = local(
        &cnn_spec(),
        4,
        &dir.path().join("four"),
        // Buckets reduced during backward give the same sum.
        &[
            "batch_size=16",
            "max_steps=20",
            "optimizer.lr=0.01",
            "ring.overlap=true",
        ],
    );
    let one = local(
        &cnn_spec(),
        1,
        &dir.path().join("one"),
        &["batch_size=64", "max_steps=20", "optimizer.lr=0.01"],
    );
    assert_eq!(four["steps"], 20);
    assert_eq!(one["steps"], 20);
    let a = load_params(Path::new(four["checkpoint_dir"].as_str().expect("dir")));
    let b = load_params(Path::new(one["checkpoint_dir"].as_str().expect("dir")));
    let initial_difference = {
        // Parameters must have moved, or the comparison proves nothing.
        let fresh = local(
            &cnn_spec(),
            1,
            &dir.path().join("fresh"),
            &["batch_size=64", "max_steps=1", "optimizer.lr=0.01"],
        );
        max_relative_difference(
            &b,
            &load_params(Path::new(fresh["checkpoint_dir"].as_str().expect("dir"))),
        )
    };
    assert!(
        initial_difference > 1e-3,
        "training moved the parameters ({initial_difference})"
    );
    let d = max_relative_difference(&a, &b);
    assert!(
        d <= 1e-4,
        "4x16 vs 1x64 after 20 steps: max relative difference {d}"
    );
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    if skip_without_data() {
        return;
    }
    let spec = mlp_spec();
    // SGD with momentum; AdamW (its moments checkpointed) with a warm-up and
    // step schedule (the learning rate follows the version) and clipping.
    let adamw = [
        "optimizer.kind=adamw",
        "optimizer.momentum=0",
        "optimizer.lr=0.001",
        "optimizer.clip_grad_norm=1.0",
        "schedule.kind=step",
        "schedule.step_size=5",
        "schedule.gamma=0.5",
        "schedule.warmup_steps=3",
    ];
    for extra in [&[][..], &adamw[..]] {
        let dir = tempfile::tempdir().expect("tempdir");
        let with = |steps: &'static str| {
            let mut sets: Vec<&'static str> = vec![steps];
            sets.extend(extra);
            sets
        };
        let straight = local(
            &spec,
            2,
            &dir.path().join("straight"),
            &with("max_steps=30"),
        );
        let first = local(&spec, 2, &dir.path().join("first"), &with("max_steps=12"));
        let ckpt = first["checkpoint_dir"].as_str().expect("dir").to_string();
        let run_dir = dir.path().join("second").to_string_lossy().into_owned();
        let mut args = vec![
            "local",
            &spec,
            "--json",
            "--run-dir",
            &run_dir,
            "--resume",
            &ckpt,
        ];
        for s in with("max_steps=30") {
            args.extend(["--set", s]);
        }
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let resumed = last_json(&o);
        assert_eq!(resumed["steps"], 30);
        let a = load_params(Path::new(straight["checkpoint_dir"].as_str().expect("dir")));
        let b = load_params(Path::new(resumed["checkpoint_dir"].as_str().expect("dir")));
        assert_eq!(
            max_relative_difference(&a, &b),
            0.0,
            "resume is bit-exact with {extra:?}"
        );
    }
}

#[test]
fn submit_watch_status_and_metrics_against_a_live_cluster() {
    if skip_without_data() {
        return;
    }
    let cluster = Cluster::start(2);
    let spec = mlp_spec();
    let v = cluster.submit_and_watch(&spec, &["max_steps=40", "eval_every_steps=20"]);
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["steps"], 40);
    assert_eq!(v["workers"], 2);
    let acc = v["test_accuracy"].as_f64().expect("accuracy");
    assert!(acc > 0.6, "40 MLP steps reach more than chance: {acc}");
    let job = v["job"].as_str().expect("job").to_string();

    let o = cluster.cli(&["status", &job, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(last_json(&o)["state"], "succeeded");
    let o = cluster.cli(&["status"]);
    let table = ringtrain_tests::stdout(&o);
    assert!(
        table.contains(&job) && table.contains("succeeded"),
        "{table}"
    );
    assert!(
        table.contains("127.0.0.1:"),
        "workers listed with addresses: {table}"
    );

    let m = cluster.metrics("coordinator");
    assert!(
        m.contains(&format!("ringtrain_job_steps_total{{job=\"{job}\"}} 40")),
        "{m}"
    );
    assert!(m.contains("ringtrain_workers_alive 2"), "{m}");
    let m = cluster.metrics("worker-0");
    assert!(m.contains("ringtrain_worker_steps_total"), "{m}");
    assert!(m.contains("ringtrain_allreduce_seconds_total"), "{m}");

    // The histograms: one observation per step the worker ran.
    let steps = metric_sum(&m, "ringtrain_worker_steps_total", "");
    assert!(steps >= 1.0, "{m}");
    assert_eq!(
        metric_sum(&m, "ringtrain_step_seconds_count", ""),
        steps,
        "{m}"
    );
    assert!(
        metric_sum(&m, "ringtrain_step_seconds_sum", "") > 0.0,
        "{m}"
    );
    for phase in ["data", "forward_backward", "allreduce", "optimizer"] {
        let phase = format!("phase=\"{phase}\"");
        assert_eq!(
            metric_sum(&m, "ringtrain_step_phase_seconds_count", &phase),
            steps,
            "{phase}: {m}"
        );
    }
    assert_eq!(
        metric_sum(&m, "ringtrain_ring_wait_seconds_count", ""),
        steps,
        "{m}"
    );
    assert!(
        m.contains("ringtrain_step_seconds_bucket{le=\"+Inf\"}"),
        "{m}"
    );
    let m = cluster.metrics("coordinator");
    assert!(
        metric_sum(
            &m,
            "ringtrain_rpc_seconds_count",
            "method=\"ReportStep\",code=\"OK\""
        ) >= 1.0,
        "{m}"
    );
    let log = cluster.log("coordinator");
    assert!(
        log.contains("step") && log.contains("loss"),
        "coordinator logs carry steps"
    );
}

/// The sum of `name`'s samples in a /metrics text whose labels contain `labels`.
fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && rest.contains(labels)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_cancelled_job_stops_and_frees_its_workers() {
    if skip_without_data() {
        return;
    }
    let cluster = Cluster::start(2);
    let job = cluster.submit(&mlp_spec(), &["max_steps=1000000"]);
    wait_for("the job to make progress", Duration::from_secs(60), || {
        let v = last_json(&cluster.cli(&["status", &job, "--json"]));
        (v["steps"].as_u64()? >= 3).then_some(())
    });
    let o = cluster.cli(&["cancel", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ringtrain_tests::stdout(&o).contains("cancelled"));
    // Workers go idle, and a new job can use them.
    let o = cluster.cli(&[
        "submit",
        &mlp_spec(),
        "--set",
        "max_steps=5",
        "--watch",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(last_json(&o)["state"], "succeeded");
    let o = cluster.cli(&["watch", &job, "--json"]);
    assert!(
        !o.status.success(),
        "watching a cancelled job ends non-zero"
    );
    assert_eq!(last_json(&o)["state"], "cancelled");
}

/// The demo's setup (cnn, batch 64 per worker, SGD lr 0.05 momentum 0.9, 2
/// epochs). DDP's 0.891 (shared/README) is with 2 workers; with 4 workers the
/// global batch doubles and half as many steps are taken: DDP itself reached
/// 0.8836 there (ddp_train.py --world 4 --epochs 2), so that run is held to
/// DDP's figure less one point.
#[test]
fn two_epochs_of_the_cnn_reach_ddp_accuracy() {
    if skip_without_data() {
        return;
    }
    for (workers, floor) in [(2, 0.89), (4, 0.8736)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = local(&cnn_spec(), workers, dir.path(), &[]);
        assert_eq!(v["epochs"], 2);
        let acc = v["test_accuracy"].as_f64().expect("accuracy");
        eprintln!("test accuracy after 2 epochs on {workers} workers: {acc}");
        assert!(
            acc >= floor,
            "{workers} workers: test accuracy {acc} < {floor}"
        );
    }
}

/// The gRPC transport and bf16 gradients carry a whole job; control values
/// (versions, evaluation counts, parameter broadcasts) still travel exact.
#[test]
fn training_over_grpc_with_bf16_gradients() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let v = local(
        &mlp_spec(),
        2,
        dir.path(),
        &["max_steps=40", "ring.transport=grpc", "ring.encoding=bf16"],
    );
    assert_eq!(v["steps"], 40);
    let acc = v["test_accuracy"].as_f64().expect("accuracy");
    assert!(acc > 0.5, "bf16 gradients still train: {acc}");
    let correct = acc * 10_000.0;
    assert!(
        (correct - correct.round()).abs() < 1e-6,
        "evaluation counts are exact: {acc}"
    );
}

/// PowerSGD carries a whole job with gradient overlap asked for (it runs
/// after backward instead): replicas stay bit-identical (the coordinator
/// compares their hashes every step and would fail the job), and the
/// compressed, error-fed gradient still trains the CNN.
#[test]
fn training_with_powersgd_keeps_replicas_identical_and_learns() {
    if skip_without_data() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let v = local(
        &cnn_spec(),
        3,
        dir.path(),
        &[
            "max_steps=40",
            "batch_size=32",
            "ring.compression=powersgd:2",
            "ring.overlap=true",
        ],
    );
    assert_eq!(v["steps"], 40, "{v}");
    // 40 small steps from ln(10) = 2.30 and 10% (chance): clearly learning.
    let acc = v["test_accuracy"].as_f64().expect("accuracy");
    let loss = v["loss"].as_f64().expect("loss");
    assert!(acc > 0.3, "PowerSGD gradients still train: accuracy {acc}");
    assert!(loss < 2.0, "PowerSGD gradients still train: loss {loss}");
}
