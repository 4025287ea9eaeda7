//! The coordinator's checks of what workers report, driven through its gRPC
//! service methods directly (no sockets): replicas that diverge fail the job
//! with a clear error, and jobs survive a coordinator restart.

use ringtrain_common::metrics::Metrics;
use ringtrain_coordinator::service::Coordinator;
use ringtrain_coordinator::store::Store;
use ringtrain_coordinator::CoordinatorConfig;
use ringtrain_proto as pb;
use ringtrain_proto::coordinator_server::Coordinator as _;
use ringtrain_proto::worker_control_server::WorkerControl as _;
use tonic::Request;

const SPEC: &str = r#"
name = "t"
model = "mlp"
batch_size = 8
workers = 2
max_steps = 5
[dataset]
format = "idx"
path = "/data"
[optimizer]
kind = "sgd"
lr = 0.1
"#;

fn coordinator(dir: &std::path::Path) -> Coordinator {
    let config = CoordinatorConfig {
        data_dir: dir.to_path_buf(),
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

async fn job_status(c: &Coordinator, job: &str) -> pb::JobStatus {
    c.get_job(Request::new(pb::GetJobRequest { job_id: job.into() }))
        .await
        .expect("get job")
        .into_inner()
}

#[tokio::test]
async fn replicas_that_diverge_fail_the_job_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(dir.path());
    let (w1, w2) = (register(&c, 1000).await, register(&c, 2000).await);
    let job = c
        .submit_job(Request::new(pb::SubmitJobRequest {
            spec_toml: SPEC.into(),
            resume_from: String::new(),
        }))
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let (a1, a2) = (
        assignment(&c, &w1).await.expect("w1 assigned"),
        assignment(&c, &w2).await.expect("w2 assigned"),
    );
    assert_eq!(
        a1.members,
        vec!["127.0.0.1:1001", "127.0.0.1:2001"],
        "ring addresses by rank"
    );

    // Version 1: the same hash from both replicas.
    for (w, a) in [(&w1, &a1), (&w2, &a2)] {
        let reply = c
            .report_step(Request::new(step(w, a, 1, 0xabc)))
            .await
            .expect("step");
        assert!(reply.into_inner().continue_job);
    }
    assert_eq!(job_status(&c, &job).await.step, 1);

    // Version 2: rank 1 holds different parameters.
    c.report_step(Request::new(step(&w1, &a1, 2, 0xabc)))
        .await
        .expect("step");
    let reply = c
        .report_step(Request::new(step(&w2, &a2, 2, 0xdef)))
        .await
        .expect("step");
    assert!(
        !reply.into_inner().continue_job,
        "the diverged worker is told to stop"
    );
    let s = job_status(&c, &job).await;
    assert_eq!(s.state, pb::JobState::Failed as i32);
    assert!(
        s.error.contains("replicas diverged at parameter version 2"),
        "{}",
        s.error
    );
    assert!(assignment(&c, &w1).await.is_none(), "workers are freed");
}

#[tokio::test]
async fn an_unfinished_job_survives_a_restart_and_waits_for_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = {
        let c = coordinator(dir.path());
        let (w1, w2) = (register(&c, 1000).await, register(&c, 2000).await);
        let job = c
            .submit_job(Request::new(pb::SubmitJobRequest {
                spec_toml: SPEC.into(),
                resume_from: String::new(),
            }))
            .await
            .expect("submit")
            .into_inner()
            .job_id;
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
