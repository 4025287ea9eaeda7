//! What a peer can make the coordinator refuse, end to end against real
//! processes: spec values past their bounds, paths outside the roots,
//! names too long to echo, reports from outside a ring (sent with the
//! generated gRPC client directly, as a hostile peer would), and enough jobs
//! that `ListJobs` must page.

use std::time::Duration;

use ringtrain_common::security::CertRole;
use ringtrain_proto as pb;
use ringtrain_proto::coordinator_client::CoordinatorClient;
use ringtrain_proto::worker_control_client::WorkerControlClient;
use ringtrain_tests::{mlp_spec, skip_without_data, stderr, stdout, wait_for, with_token, Cluster};
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The example MLP spec with `top` keys first and `tables` last.
fn spec(top: &str, tables: &str) -> String {
    let base = std::fs::read_to_string(mlp_spec()).expect("example");
    format!("{top}\n{base}\n{tables}")
}

async fn submit(cluster: &Cluster, spec_toml: String) -> Result<String, tonic::Status> {
    let mut c = CoordinatorClient::new(cluster.channel(CertRole::Client).await);
    c.submit_job(with_token(
        pb::SubmitJobRequest {
            spec_toml,
            resume_from: String::new(),
        },
        Some(&cluster.admin_token()),
    ))
    .await
    .map(|r| r.into_inner().job_id)
}

#[test]
fn submissions_past_their_bounds_or_outside_the_roots_are_refused_naming_the_key() {
    let cluster = Cluster::start(0);
    let rt = runtime();
    let refused = |top: &str, tables: &str| {
        let e = rt
            .block_on(submit(&cluster, spec(top, tables)))
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        e.message().to_string()
    };
    let name = "n".repeat(900_000);
    let huge = spec("", "").replace("fashion-mlp", &name);
    let e = rt.block_on(submit(&cluster, huge)).expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    let m = e.message();
    assert!(
        m.contains("name must be at most 128 characters"),
        "{}",
        &m[..200.min(m.len())]
    );
    assert!(
        m.len() <= 300,
        "at most ~100 characters quoted: {} bytes",
        m.len()
    );
    let m = refused("", "[ring]\ntimeout_s = 1e300");
    assert!(m.contains("ring.timeout_s must be at most 3600"), "{m}");
    let m = refused("threads = 2147483648", "");
    assert!(m.contains("threads must be at most 256"), "{m}");
    let outside = cluster
        .dir
        .path()
        .parent()
        .expect("parent")
        .join("not-a-root");
    let m = refused(
        "",
        &format!("[checkpoint]\ndir = \"{}\"", outside.display()),
    );
    assert!(m.starts_with("checkpoint.dir: '"), "{m}");
    assert!(m.contains("outside the allowed directories"), "{m}");
    let with_data = spec("", "").replace("/usr/share/datasets/fashion-mnist", "/etc");
    let e = rt
        .block_on(submit(&cluster, with_data))
        .expect_err("refused");
    assert!(
        e.message().starts_with("dataset.path: '/etc'"),
        "{}",
        e.message()
    );
    let key = "k".repeat(100_000);
    let m = refused(&format!("{key} = 1"), "");
    assert!(
        m.len() < 600,
        "a 100 KB key is not echoed whole: {} bytes",
        m.len()
    );

    // The command line says the same in one line.
    let f = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(f.path(), spec("threads = 2147483648", "")).expect("write");
    let o = cluster.cli(&["submit", f.path().to_str().expect("path")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("threads must be at most 256"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn status_keeps_working_with_many_jobs_with_long_names() {
    let cluster = Cluster::start(0);
    let rt = runtime();
    let jobs = 250; // over two pages of ListJobs
    rt.block_on(async {
        for i in 0..jobs {
            let name = format!("{i:03}-{}", "x".repeat(124));
            let s = spec("", "").replace("fashion-mlp", &name);
            submit(&cluster, s).await.expect("accepted");
        }
    });
    let o = cluster.cli(&["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON document");
    let listed = v["jobs"].as_array().expect("jobs");
    assert_eq!(listed.len(), jobs, "every page followed");
    let o = cluster.cli(&["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).lines().count() > jobs, "a table line per job");
}

#[test]
fn reports_from_a_non_member_are_refused_and_change_nothing() {
    if skip_without_data() {
        return;
    }
    let cluster = Cluster::start(2);
    let job = cluster.submit(
        &mlp_spec(),
        &[
            "workers=2",
            "epochs=0",
            "max_steps=100000",
            "eval_every_steps=0",
        ],
    );
    let running = wait_for("the job to run", Duration::from_secs(60), || {
        let s = cluster.status(&job);
        (s["state"] == "running" && s["ring_generation"].as_u64().unwrap_or(0) > 0).then_some(s)
    });
    let generation = running["ring_generation"].as_u64().expect("generation");
    let evil = cluster.dir.path().join("evil");
    let rt = runtime();
    let (eval, ckpt, finish) = rt.block_on(async {
        // A worker certificate: the fake is a cluster member's identity, not
        // a member of this job's ring.
        let mut w = WorkerControlClient::new(cluster.channel(CertRole::Worker).await);
        // A registered but idle worker, and one the coordinator never saw.
        let fake = w
            .register_worker(pb::RegisterWorkerRequest {
                grpc_addr: "127.0.0.1:1".into(),
                ring_addr: "127.0.0.1:2".into(),
                hostname: "evil".into(),
                pid: 1,
            })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        let eval = w
            .report_eval(pb::EvalReport {
                worker_id: fake.clone(),
                job_id: job.clone(),
                param_version: 1,
                test_accuracy: 1.0,
                test_loss: 0.0,
                samples: 10_000,
                ring_generation: generation,
            })
            .await
            .expect_err("refused");
        let ckpt = w
            .report_checkpoint(pb::CheckpointReport {
                worker_id: "w999".into(),
                job_id: job.clone(),
                param_version: 1,
                dir: evil.to_string_lossy().into_owned(),
                ring_generation: generation,
            })
            .await
            .expect_err("refused");
        let finish = w
            .report_finish(pb::FinishReport {
                worker_id: fake,
                job_id: job.clone(),
                param_version: 1,
                error: "boom".into(),
                ring_generation: generation,
            })
            .await
            .expect_err("refused");
        (eval, ckpt, finish)
    });
    for e in [&eval, &ckpt, &finish] {
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("is not in gen"), "{}", e.message());
    }
    let s = cluster.status(&job);
    assert_eq!(s["state"], "running", "{s}");
    assert!(
        s["test_accuracy"].is_null(),
        "no accuracy from a non-member: {s}"
    );
    assert!(!evil.exists(), "nothing created where a peer pointed");
    let o = cluster.cli(&["cancel", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
}
