//! The coordinator's gRPC services driven through their methods directly (no
//! sockets): jobs survive a coordinator restart through the real store, bad
//! requests get the status that names them, and watch streams end at
//! shutdown. (The protocol itself is tested on `State` in `src/state/tests.rs`.)

use futures::StreamExt;
use ringtrain_common::metrics::Metrics;
use ringtrain_coordinator::service::Coordinator;
use ringtrain_coordinator::store::Store;
use ringtrain_coordinator::CoordinatorConfig;
use ringtrain_proto as pb;
use ringtrain_proto::coordinator_server::Coordinator as _;
use ringtrain_proto::worker_control_server::WorkerControl as _;
use tonic::{Code, Request};

use ringtrain_common::testing::MINIMAL_SPEC as SPEC;

fn coordinator(dir: &std::path::Path) -> Coordinator {
    let config = CoordinatorConfig {
        data_dir: dir.to_path_buf(),
        // MINIMAL_SPEC's data set.
        data_roots: vec!["/data".into()],
        ..CoordinatorConfig::default()
    };
    let store = Store::open(&dir.join("coordinator.redb")).expect("store");
    Coordinator::new(config, Metrics::default(), store).expect("coordinator")
}

async fn register(c: &Coordinator, n: u16) -> String {
    c.register_worker(Request::new(pb::RegisterWorkerRequest {
        grpc_addr: format!("127.0.0.1:{n}"),
        ring_addr: format!("127.0.0.1:{}", n + 1),
        hostname: String::new(),
        pid: 1,
    }))
    .await
    .expect("register")
    .into_inner()
    .worker_id
}

async fn assignment(c: &Coordinator, worker: &str) -> Option<pb::Assignment> {
    c.heartbeat(Request::new(pb::HeartbeatRequest {
        worker_id: worker.into(),
        ..Default::default()
    }))
    .await
    .expect("heartbeat")
    .into_inner()
    .assignment
}

fn step(worker: &str, a: &pb::Assignment, version: u64, hash: u64) -> pb::StepReport {
    pb::StepReport {
        worker_id: worker.into(),
        job_id: a.job_id.clone(),
        ring_generation: a.ring_generation,
        param_version: version,
        param_hash: hash,
        loss: 1.0,
        samples: 8,
        step_seconds: 0.1,
        rank: a.rank,
        total_steps: 5,
        ..Default::default()
    }
}

async fn submit(c: &Coordinator) -> String {
    c.submit_job(Request::new(pb::SubmitJobRequest {
        spec_toml: SPEC.into(),
        resume_from: String::new(),
    }))
    .await
    .expect("submit")
    .into_inner()
    .job_id
}

async fn job_status(c: &Coordinator, job: &str) -> pb::JobStatus {
    c.get_job(Request::new(pb::GetJobRequest { job_id: job.into() }))
        .await
        .expect("get job")
        .into_inner()
}

#[tokio::test]
async fn an_unfinished_job_survives_a_restart_and_waits_for_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = {
        let c = coordinator(dir.path());
        let (w1, w2) = (register(&c, 1000).await, register(&c, 2000).await);
        let job = submit(&c).await;
        let (a1, a2) = (
            assignment(&c, &w1).await.expect("assigned"),
            assignment(&c, &w2).await.expect("assigned"),
        );
        for (w, a) in [(&w1, &a1), (&w2, &a2)] {
            c.report_step(Request::new(step(w, a, 1, 7)))
                .await
                .expect("step");
        }
        job
    };
    // A new coordinator on the same data dir.
    let c = coordinator(dir.path());
    let s = job_status(&c, &job).await;
    assert_eq!(
        s.state,
        pb::JobState::Waiting as i32,
        "remembered, waiting for workers"
    );
    assert_eq!(s.step, 1);
    // The old workers are unknown now and must register again.
    let stale = c
        .heartbeat(Request::new(pb::HeartbeatRequest {
            worker_id: "w1".into(),
            ..Default::default()
        }))
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(stale.unknown_worker);
    let (w3, w4) = (register(&c, 3000).await, register(&c, 4000).await);
    assert_ne!(w3, "w1", "worker ids are not reused across restarts");
    let a = assignment(&c, &w3)
        .await
        .expect("the job resumes on the new registrations");
    assert!(
        a.ring_generation > 1,
        "a newer ring generation than before the restart"
    );
    assert!(assignment(&c, &w4).await.is_some());
    assert_eq!(
        job_status(&c, &job).await.state,
        pb::JobState::Running as i32
    );
}

#[tokio::test]
async fn bad_requests_get_the_status_that_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(dir.path());
    let err = c
        .submit_job(Request::new(pb::SubmitJobRequest {
            spec_toml: "name = 'x'".into(),
            resume_from: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("missing field"), "{}", err.message());
    let err = c
        .get_job(Request::new(pb::GetJobRequest {
            job_id: "00000000000000ff".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no job 00000000000000ff");
    let err = c
        .get_job(Request::new(pb::GetJobRequest {
            job_id: "x".repeat(10_000),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 200, "input is not echoed whole");
    let err = c
        .heartbeat(Request::new(pb::HeartbeatRequest {
            worker_id: "nobody".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("worker_id:"), "{}", err.message());
}

#[tokio::test]
async fn watch_streams_end_when_the_coordinator_shuts_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(dir.path());
    let job = submit(&c).await;
    let mut events = c
        .watch_job(Request::new(pb::WatchJobRequest {
            job_id: job.clone(),
        }))
        .await
        .expect("watch")
        .into_inner();
    let first = events.next().await.expect("a snapshot").expect("ok");
    assert_eq!(first.kind, "snapshot");
    // The job is pending (no workers): the stream would wait for ever.
    c.close_streams();
    let last = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
        .await
        .expect("the stream ends promptly");
    let status = last.expect("a final item").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(events.next().await.is_none());
}

fn checkpoint(worker: &str, a: &pb::Assignment, dir: &str) -> pb::CheckpointReport {
    pb::CheckpointReport {
        worker_id: worker.into(),
        job_id: a.job_id.clone(),
        param_version: 1,
        dir: dir.into(),
        ring_generation: a.ring_generation,
    }
}

#[tokio::test]
async fn reports_from_outside_the_ring_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(dir.path());
    let (w1, w2) = (register(&c, 1000).await, register(&c, 2000).await);
    let job = submit(&c).await;
    let a1 = assignment(&c, &w1).await.expect("assigned");
    assignment(&c, &w2).await.expect("assigned");
    let outsider = register(&c, 3000).await;
    let err = c
        .report_eval(Request::new(pb::EvalReport {
            worker_id: outsider.clone(),
            job_id: job.clone(),
            param_version: 1,
            test_accuracy: 1.0,
            test_loss: 0.0,
            samples: 10,
            ring_generation: a1.ring_generation,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let evil = dir.path().join("evil");
    let err = c
        .report_checkpoint(Request::new(checkpoint(
            &outsider,
            &a1,
            evil.to_str().expect("path"),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    // A member naming a directory it was not given.
    let err = c
        .report_checkpoint(Request::new(checkpoint(&w1, &a1, "/etc")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = c
        .report_checkpoint(Request::new(checkpoint(
            &w1,
            &a1,
            evil.to_str().expect("path"),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = c
        .report_step(Request::new(step(&outsider, &a1, 1, 7)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let s = job_status(&c, &job).await;
    assert!(!s.has_eval, "no accuracy from a non-member");
    assert_eq!(s.step, 0);
    assert!(s
        .checkpoint_dir
        .starts_with(dir.path().to_str().expect("path")));
    assert!(!evil.exists(), "nothing created where a peer pointed");
    // The member's own directory is taken.
    let own = a1.checkpoint_dir.clone();
    std::fs::create_dir_all(&own).expect("mkdir");
    c.report_checkpoint(Request::new(checkpoint(&w1, &a1, &own)))
        .await
        .expect("a member's checkpoint");
}

#[tokio::test]
async fn submissions_past_the_bounds_or_outside_the_roots_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(dir.path());
    // Top-level keys go before the spec's tables, tables after.
    let submit_with = |extra: &str| {
        let spec = if extra.starts_with('[') {
            format!("{SPEC}\n{extra}")
        } else {
            format!("{extra}\n{SPEC}")
        };
        let c = c.clone();
        async move {
            c.submit_job(Request::new(pb::SubmitJobRequest {
                spec_toml: spec,
                resume_from: String::new(),
            }))
            .await
            .unwrap_err()
        }
    };
    let err = submit_with("[ring]\ntimeout_s = 1e300").await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("ring.timeout_s must be at most 3600"),
        "{}",
        err.message()
    );
    let err = submit_with("threads = 2147483648").await;
    assert!(
        err.message().contains("threads must be at most 256"),
        "{}",
        err.message()
    );
    let err = submit_with(&format!("{} = 1", "k".repeat(100_000))).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 600, "{}", err.message().len());
    let err = submit_with("[checkpoint]\ndir = \"/etc/cron.d\"").await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("checkpoint.dir: '/etc/cron.d' is outside"),
        "{}",
        err.message()
    );
    let err = c
        .submit_job(Request::new(pb::SubmitJobRequest {
            spec_toml: SPEC.into(),
            resume_from: "/root".into(),
        }))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("resume_from: '/root'"),
        "{}",
        err.message()
    );
    let err = c
        .submit_job(Request::new(pb::SubmitJobRequest {
            spec_toml: SPEC.replace("workers = 2", "workers = 1000"),
            resume_from: String::new(),
        }))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("this cluster's max_workers (256)"),
        "{}",
        err.message()
    );
    let err = c
        .submit_job(Request::new(pb::SubmitJobRequest {
            spec_toml: "#".repeat(2 << 20),
            resume_from: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn list_jobs_pages_and_bounds_what_it_is_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(dir.path());
    register(&c, 1000).await;
    for _ in 0..5 {
        submit(&c).await;
    }
    let page = |size: u32, token: String| {
        let c = c.clone();
        async move {
            c.list_jobs(Request::new(pb::ListJobsRequest {
                page_size: size,
                page_token: token,
            }))
            .await
        }
    };
    let first = page(2, String::new()).await.expect("page").into_inner();
    assert_eq!((first.jobs.len(), first.workers.len()), (2, 1));
    let second = page(2, first.next_page_token.clone())
        .await
        .expect("page")
        .into_inner();
    assert_eq!((second.jobs.len(), second.workers.len()), (2, 0));
    let third = page(2, second.next_page_token.clone())
        .await
        .expect("page")
        .into_inner();
    assert_eq!(third.jobs.len(), 1);
    assert!(third.next_page_token.is_empty());
    let all = page(0, String::new()).await.expect("page").into_inner();
    assert_eq!(all.jobs.len(), 5);
    let err = page(2, "x".repeat(20_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = page(2, "zz".into()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("page_token:"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn watch_streams_per_client_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = CoordinatorConfig {
        data_dir: dir.path().to_path_buf(),
        data_roots: vec!["/data".into()],
        max_watch_streams_per_client: 2,
        ..CoordinatorConfig::default()
    };
    let store = Store::open(&dir.path().join("coordinator.redb")).expect("store");
    let c = Coordinator::new(config, Metrics::default(), store).expect("coordinator");
    let job = submit(&c).await;
    let watch = || {
        c.watch_job(Request::new(pb::WatchJobRequest {
            job_id: job.clone(),
        }))
    };
    let a = watch().await.expect("first");
    let _b = watch().await.expect("second");
    let err = watch().await.err().expect("a third is refused");
    assert_eq!(err.code(), Code::ResourceExhausted);
    drop(a);
    watch()
        .await
        .expect("a slot is free again once a stream ends");
}
