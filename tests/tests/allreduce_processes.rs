//! The ring all-reduce across real processes: a killed neighbour makes the
//! survivors fail fast, naming it.

use std::time::{Duration, Instant};

use ringtrain_tests::{ringtrain_bin, wait_for, Supervisor};

#[test]
fn bench_allreduce_prints_the_gloo_fields() {
    let o = ringtrain_tests::run(&[
        "bench",
        "allreduce",
        "--world",
        "3",
        "--elements",
        "100003",
        "--reps",
        "3",
    ]);
    assert!(o.status.success(), "{}", ringtrain_tests::stderr(&o));
    let v = ringtrain_tests::last_json(&o);
    for key in [
        "impl",
        "world",
        "elements",
        "bytes",
        "median_s",
        "algbw_gbps",
        "busbw_gbps",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["world"], 3);
    assert_eq!(v["bytes"], 400_012);
    assert!(v["median_s"].as_f64().expect("median") > 0.0);
}

#[test]
fn killing_a_rank_fails_its_neighbours_within_the_deadline() {
    let (world, deadline_s) = (3, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ranks = Supervisor::new(dir.path()).expect("supervisor");
    let peers = dir.path().join("peers.json");
    let ring_key = "ab".repeat(32);
    for rank in 0..world {
        let (rank_arg, result) = (
            rank.to_string(),
            dir.path().join(format!("rank-{rank}.json")),
        );
        let args = [
            "bench",
            "allreduce-rank",
            "--rank",
            &rank_arg,
            "--world",
            "3",
            "--elements",
            "2000000",
            "--reps",
            "100000",
            "--timeout-s",
            "3",
            "--progress",
            "--peers-file",
            peers.to_str().expect("path"),
            "--result-file",
            result.to_str().expect("path"),
            "--ring-key",
            &ring_key,
        ];
        ranks
            .spawn(&format!("rank-{rank}"), &[], &ringtrain_bin(), &args)
            .expect("spawn rank");
    }
    let addrs: Vec<String> = (0..world)
        .map(|rank| {
            let ready = ranks
                .wait_ready(&format!("rank-{rank}"), Duration::from_secs(30))
                .expect("rank ready");
            ready["addr"].as_str().expect("addr").to_string()
        })
        .collect();
    std::fs::write(
        dir.path().join("peers.tmp"),
        serde_json::to_vec(&addrs).expect("json"),
    )
    .expect("peers");
    std::fs::rename(dir.path().join("peers.tmp"), &peers).expect("peers");
    // Wait until every rank is mid-run.
    for rank in 0..world {
        let log = ranks
            .get(&format!("rank-{rank}"))
            .expect("rank")
            .log
            .clone();
        wait_for("the ranks to be mid-run", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines().any(|l| l == "REP 2").then_some(())
        });
    }
    ranks.kill("rank-2").expect("kill -9 rank 2");
    let killed_at = Instant::now();
    for rank in 0..2 {
        let name = format!("rank-{rank}");
        let status = ranks
            .wait_exit(&name, Duration::from_secs(deadline_s + 5))
            .expect("wait")
            .unwrap_or_else(|| panic!("rank {rank} still running after the deadline"));
        assert!(killed_at.elapsed() < Duration::from_secs(deadline_s + 5));
        assert!(!status.success(), "rank {rank} must fail");
        let err = std::fs::read_to_string(&ranks.get(&name).expect("rank").log).expect("log");
        assert!(err.contains("error:"), "rank {rank}: {err}");
        if rank == 0 {
            // Rank 0 receives from rank 2.
            assert!(
                err.contains("rank 2"),
                "rank 0 names the dead neighbour: {err}"
            );
        }
    }
}
