//! The ring all-reduce across real processes: a killed neighbour makes the
//! survivors fail fast, naming it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringtrain_tests::ringtrain_bin;

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
    let world = 3;
    let deadline_s = 3;
    let mut ranks = Vec::new();
    let mut readers = Vec::new();
    let mut addrs = Vec::new();
    for rank in 0..world {
        let mut child = Command::new(ringtrain_bin())
            .args(["bench", "allreduce-rank", "--rank", &rank.to_string()])
            .args([
                "--world",
                &world.to_string(),
                "--elements",
                "2000000",
                "--reps",
                "100000",
            ])
            .args(["--timeout-s", &deadline_s.to_string(), "--progress"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rank");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("READY");
        addrs.push(
            line.trim()
                .strip_prefix("READY ")
                .expect("READY line")
                .to_string(),
        );
        readers.push(out);
        ranks.push(child);
    }
    let peers = format!("PEERS {}\n", addrs.join(" "));
    for r in &mut ranks {
        r.stdin
            .as_mut()
            .expect("stdin")
            .write_all(peers.as_bytes())
            .expect("peers");
    }
    // Wait until every rank is mid-run.
    for out in &mut readers {
        let mut line = String::new();
        while !line.starts_with("REP 2") {
            line.clear();
            assert!(
                out.read_line(&mut line).expect("progress") > 0,
                "rank exited early"
            );
        }
    }
    let mut victim = ranks.pop().expect("rank 2");
    victim.kill().expect("kill -9 rank 2");
    let killed_at = Instant::now();
    for (rank, child) in ranks.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(deadline_s + 5),
                "rank {rank} still running after the deadline"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "rank {rank} must fail");
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err)
            .expect("stderr");
        assert!(err.contains("error:"), "rank {rank}: {err}");
        if rank == 0 {
            // Rank 0 receives from rank 2.
            assert!(
                err.contains("rank 2"),
                "rank 0 names the dead neighbour: {err}"
            );
        }
    }
    let _ = victim.wait();
}
