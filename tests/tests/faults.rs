//! Fault tolerance and elasticity with real processes and real signals:
//! kill -9 a worker, SIGSTOP one, add one, kill -9 the coordinator. The job
//! goes on, loses no sample and uses none twice, and replicas stay identical
//! (the coordinator fails a job whose replicas' hashes differ).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ringtrain_tests::{
    last_json, mlp_spec, run, skip_without_data, stderr, wait_for, Cluster, Signal,
};

fn steps(v: &serde_json::Value) -> u64 {
    v["steps"].as_u64().unwrap_or(0)
}

/// Waits for the job to end and returns its final status line.
fn wait_end(cluster: &Cluster, job: &str) -> serde_json::Value {
    let o = cluster.cli(&["watch", job, "--json"]);
    last_json(&o)
}

/// The sample ids of every committed step, from the workers' audit files:
/// each version once (a version completed by several workers is the same
/// global batch).
fn audited_epochs(cluster: &Cluster) -> BTreeMap<u64, Vec<u32>> {
    let mut by_version: BTreeMap<u64, (u64, Vec<u32>)> = BTreeMap::new();
    let root = cluster.data_dir().to_path_buf();
    for job_dir in std::fs::read_dir(&root).expect("data dir").flatten() {
        let samples = job_dir.path().join("samples");
        let Ok(files) = std::fs::read_dir(&samples) else {
            continue;
        };
        for f in files.flatten() {
            let text = std::fs::read_to_string(f.path()).expect("audit file");
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("audit line");
                let version = v["version"].as_u64().expect("version");
                let epoch = v["epoch"].as_u64().expect("epoch");
                let ids: Vec<u32> = v["ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|i| i.as_u64().expect("id") as u32)
                    .collect();
                if let Some(prev) = by_version.get(&version) {
                    assert_eq!(
                        prev,
                        &(epoch, ids.clone()),
                        "version {version} recorded twice differently"
                    );
                }
                by_version.insert(version, (epoch, ids));
            }
        }
    }
    let mut epochs: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let versions: Vec<u64> = by_version.keys().copied().collect();
    assert_eq!(
        versions,
        (1..=versions.len() as u64).collect::<Vec<_>>(),
        "every version recorded"
    );
    for (_, (epoch, ids)) in by_version {
        epochs.entry(epoch).or_default().extend(ids);
    }
    epochs
}

fn assert_each_sample_once(ids: &[u32], samples: usize) {
    let mut count: HashMap<u32, u32> = HashMap::new();
    for &i in ids {
        *count.entry(i).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(twice.is_empty(), "samples used twice: {twice:?}");
    assert_eq!(count.len(), samples, "every sample used once");
}

/// Waits for the ring to be re-formed and a step of the new generation to
/// complete; returns the seconds since `since`.
fn next_step_of_new_ring(
    cluster: &Cluster,
    job: &str,
    generation_before: u64,
    since: Instant,
) -> f64 {
    let after_reform = wait_for("a new ring generation", Duration::from_secs(30), || {
        let v = cluster.status(job);
        (v["ring_generation"].as_u64()? > generation_before).then(|| steps(&v))
    });
    wait_for("a step of the new ring", Duration::from_secs(30), || {
        let v = cluster.status(job);
        (steps(&v) > after_reform || v["state"] == "succeeded").then_some(())
    });
    since.elapsed().as_secs_f64()
}

#[test]
fn killing_one_of_four_workers_loses_no_sample_and_accuracy_holds() {
    if skip_without_data() {
        return;
    }
    let baseline_dir = tempfile::tempdir().expect("tempdir");
    let run_dir = baseline_dir.path().to_string_lossy().into_owned();
    let o = run(&[
        "local",
        &mlp_spec(),
        "--workers",
        "4",
        "--json",
        "--run-dir",
        &run_dir,
        "--set",
        "epochs=1",
        "--set",
        "max_steps=0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let baseline = last_json(&o)["test_accuracy"].as_f64().expect("accuracy");

    let mut cluster = Cluster::start(4);
    let job = cluster.submit(
        &mlp_spec(),
        &["workers=4", "epochs=1", "max_steps=0", "audit_samples=true"],
    );
    // A step chosen from the clock, so runs differ.
    let kill_at = 10 + (std::process::id() as u64 % 100);
    let victim = format!("worker-{}", std::process::id() % 4);
    let before = wait_for(
        "the job to reach the kill step",
        Duration::from_secs(120),
        || {
            let v = cluster.status(&job);
            (steps(&v) >= kill_at).then_some(v)
        },
    );
    let killed = Instant::now();
    cluster.signal(&victim, Signal::Kill);
    let recovery = next_step_of_new_ring(
        &cluster,
        &job,
        before["ring_generation"].as_u64().expect("gen"),
        killed,
    );
    eprintln!(
        "killed {victim} at step {}: next step of the new ring after {recovery:.2}s",
        steps(&before)
    );
    let end = wait_end(&cluster, &job);
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["epochs"], 1);
    let acc = end["test_accuracy"].as_f64().expect("accuracy");
    assert!(
        (acc - baseline).abs() <= 0.01,
        "accuracy {acc} vs {baseline} without faults"
    );
    let epochs = audited_epochs(&cluster);
    assert_eq!(epochs.len(), 1, "one epoch");
    assert_each_sample_once(&epochs[&0], 60_000);
}

#[test]
fn a_paused_worker_is_fenced_off_and_rejoins_as_a_new_member() {
    if skip_without_data() {
        return;
    }
    let mut cluster = Cluster::start(3);
    let job = cluster.submit(&mlp_spec(), &["workers=3", "max_steps=1000000"]);
    let before = wait_for("progress", Duration::from_secs(60), || {
        let v = cluster.status(&job);
        (steps(&v) >= 5).then_some(v)
    });
    cluster.signal("worker-2", Signal::Stop);
    let stopped = Instant::now();
    next_step_of_new_ring(
        &cluster,
        &job,
        before["ring_generation"].as_u64().expect("gen"),
        stopped,
    );
    let v = cluster.status(&job);
    assert_eq!(v["ring_workers"], 2, "the others go on without it: {v}");
    cluster.signal("worker-2", Signal::Cont);
    // It comes back under a new identity and joins at a step boundary.
    wait_for(
        "the paused worker to rejoin",
        Duration::from_secs(60),
        || {
            let v = cluster.status(&job);
            (v["ring_workers"] == 3).then_some(())
        },
    );
    let rejoined = steps(&cluster.status(&job));
    wait_for("steps with three workers", Duration::from_secs(60), || {
        (steps(&cluster.status(&job)) > rejoined + 5).then_some(())
    });
    assert_eq!(
        cluster.status(&job)["state"],
        "running",
        "replica hashes still agree"
    );
    assert!(
        cluster.log("worker-2").contains("registered again"),
        "fenced: came back as a new member"
    );
    let o = cluster.cli(&["cancel", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_worker_joining_mid_run_gets_the_state_and_the_job_finishes_with_three() {
    if skip_without_data() {
        return;
    }
    let mut cluster = Cluster::start(2);
    let job = cluster.submit(
        &mlp_spec(),
        &[
            "workers=2",
            "max_workers=3",
            "max_steps=600",
            "audit_samples=true",
        ],
    );
    let before = wait_for("progress", Duration::from_secs(60), || {
        let v = cluster.status(&job);
        (steps(&v) >= 20).then_some(v)
    });
    let started = Instant::now();
    cluster.start_worker();
    let join = next_step_of_new_ring(
        &cluster,
        &job,
        before["ring_generation"].as_u64().expect("gen"),
        started,
    );
    eprintln!("join: next step of the grown ring {join:.2}s after the worker started");
    let end = wait_end(&cluster, &job);
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["steps"], 600);
    let log = cluster.log("coordinator");
    assert!(
        log.contains("ring re-formed") && log.contains("w3"),
        "the ring grew to include the new worker"
    );
    // No version was skipped or taken twice across the re-formation.
    let epochs = audited_epochs(&cluster);
    let ids: Vec<u32> = epochs.values().flatten().copied().collect();
    let mut seen = std::collections::HashSet::new();
    for (epoch, ids) in &epochs {
        for id in ids {
            assert!(
                seen.insert((*epoch, *id)),
                "sample {id} used twice in epoch {epoch}"
            );
        }
    }
    assert!(
        ids.len() > 600 * 128,
        "steps after the join used three workers' batches"
    );
    // The TensorBoard curve goes on across the re-formation: every step
    // once, in order (the file is flushed as the job ends).
    let dir = std::path::PathBuf::from(end["checkpoint_dir"].as_str().expect("dir"));
    let loss_steps = || -> Vec<i64> {
        ringtrain_common::tensorboard::read_run(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.tag == "loss")
            .map(|s| s.step)
            .collect()
    };
    let want: Vec<i64> = (1..=600).collect();
    wait_for("the TensorBoard curve", Duration::from_secs(15), || {
        (loss_steps().last() == Some(&600)).then_some(())
    });
    assert_eq!(loss_steps(), want);
}

#[test]
fn the_job_survives_a_coordinator_killed_and_restarted() {
    if skip_without_data() {
        return;
    }
    let mut cluster = Cluster::start(2);
    let job = cluster.submit(&mlp_spec(), &["workers=2", "max_steps=1500"]);
    wait_for("progress", Duration::from_secs(60), || {
        (steps(&cluster.status(&job)) >= 30).then_some(())
    });
    cluster.signal("coordinator", Signal::Kill);
    cluster.restart_coordinator();
    let v = cluster.status(&job);
    assert!(
        ["waiting", "running"].contains(&v["state"].as_str().unwrap_or("")),
        "the restarted coordinator remembers the job: {v}"
    );
    let end = wait_end(&cluster, &job);
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["steps"], 1500);
    assert!(end["test_accuracy"].as_f64().is_some());
}
