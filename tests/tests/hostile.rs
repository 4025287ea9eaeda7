//! A hostile client on the same network, against a coordinator and 2 workers
//! running over mutual TLS while a small job trains. It hammers every port
//! (each process's gRPC, ring and metrics listeners) with raw connections,
//! garbage and connections it never closes, speaks plaintext gRPC to TLS
//! servers, calls without a token, and sends bad requests with a valid client
//! identity. What a user of the cluster checks afterwards:
//! - every gRPC call is refused, bad requests with INVALID_ARGUMENT,
//!   NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED or RESOURCE_EXHAUSTED
//!   within 5 s, never UNKNOWN or INTERNAL;
//! - the job succeeds;
//! - no process logs a panic;
//! - file descriptors and memory come back to their baseline.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use ringtrain_common::security::{default_token, CertRole, Transport};
use ringtrain_proto as pb;
use ringtrain_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::Code;

const ALLOWED: [Code; 5] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::PermissionDenied,
    Code::ResourceExhausted,
];
/// The longest a refusal may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs one call and checks how it was refused: with an allowed code, in time.
async fn refused<T: std::fmt::Debug>(
    what: &str,
    allowed: &[Code],
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<(), String> {
    let started = Instant::now();
    let answer = tokio::time::timeout(ANSWER_WITHIN, call).await;
    match answer {
        Err(_) => Err(format!("{what}: no answer within {ANSWER_WITHIN:?}")),
        Ok(Ok(ok)) => Err(format!("{what}: accepted: {ok:?}")),
        Ok(Err(status)) if allowed.contains(&status.code()) => {
            assert!(started.elapsed() <= ANSWER_WITHIN);
            Ok(())
        }
        Ok(Err(status)) => Err(format!(
            "{what}: {:?} ({}), not one of {allowed:?}",
            status.code(),
            status.message()
        )),
    }
}

/// Raw TCP against one port: connect and leave, send garbage, and open
/// connections that say nothing (returned, held until the round ends).
async fn raw_attack(addr: &str, held: &mut Vec<TcpStream>) {
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for _ in 0..5 {
        if let Ok(s) = TcpStream::connect(addr).await {
            drop(s);
        }
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(&garbage).await;
            let _ = s.shutdown().await;
        }
        // An HTTP/2 preface followed by nonsense.
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let _ = s.write_all(&garbage[..512]).await;
        }
        if let Ok(s) = TcpStream::connect(addr).await {
            held.push(s);
        }
    }
}

struct Targets {
    coordinator: String,
    /// host:port of every gRPC, ring and metrics listener.
    ports: Vec<String>,
    /// Workers' gRPC addresses.
    worker_grpc: Vec<String>,
}

async fn channel(transport: &Transport, addr: &str, role: CertRole, server: CertRole) -> Channel {
    transport
        .endpoint(addr, role, Some(server))
        .expect("endpoint")
        .connect_timeout(ANSWER_WITHIN)
        .connect()
        .await
        .expect("a TLS connection with a valid client certificate")
}

/// One round of every attack; returns the refusals that were wrong.
async fn attack_round(t: &Targets, tls: &Transport, token: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut held = Vec::new();
    for port in &t.ports {
        raw_attack(port, &mut held).await;
    }

    // Plaintext gRPC to TLS servers: nothing is answered.
    let plain = Transport::Insecure;
    for addr in std::iter::once(&t.coordinator).chain(&t.worker_grpc) {
        let attempt = async {
            let ch = plain
                .endpoint(addr, CertRole::Client, None)
                .map_err(|e| e.to_string())?
                .connect_timeout(ANSWER_WITHIN)
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            pb::coordinator_client::CoordinatorClient::new(ch)
                .list_jobs(pb::ListJobsRequest::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(ANSWER_WITHIN, attempt).await {
            Ok(Ok(())) => wrong.push(format!("plaintext gRPC to {addr} was answered")),
            Ok(Err(_)) => {}
            Err(_) => wrong.push(format!("plaintext gRPC to {addr}: no refusal within 5 s")),
        }
    }

    // A valid client identity, without a token and with a wrong one.
    let ch = channel(tls, &t.coordinator, CertRole::Client, CertRole::Coordinator).await;
    let mut client = pb::coordinator_client::CoordinatorClient::new(ch.clone());
    for token in [None, Some("not-the-token")] {
        let r = client
            .list_jobs(with_token(pb::ListJobsRequest::default(), token))
            .await;
        if !matches!(&r, Err(s) if s.code() == Code::Unauthenticated) {
            wrong.push(format!("ListJobs with token {token:?}: {r:?}"));
        }
    }

    // Bad requests with the admin token.
    let tok = Some(token);
    let spec = |extra: &str| {
        format!(
            "{extra}\nname = \"x\"\nmodel = \"mlp\"\nworkers = 1\nbatch_size = 8\n[dataset]\nformat = \"idx\"\npath = \"/usr/share/datasets/fashion-mnist\"\n"
        )
    };
    let submit = |spec_toml: String| pb::SubmitJobRequest {
        spec_toml,
        resume_from: String::new(),
    };
    let mut checks: Vec<Result<(), String>> = vec![
        refused(
            "GetJob of a bad id",
            &ALLOWED,
            client.clone().get_job(with_token(
                pb::GetJobRequest {
                    job_id: "../../etc".into(),
                },
                tok,
            )),
        )
        .await,
        refused(
            "GetJob of an unknown job",
            &ALLOWED,
            client.clone().get_job(with_token(
                pb::GetJobRequest {
                    job_id: "0123456789abcdef".into(),
                },
                tok,
            )),
        )
        .await,
        refused(
            "GetJob of a 100 KB id",
            &ALLOWED,
            client.clone().get_job(with_token(
                pb::GetJobRequest {
                    job_id: "a".repeat(100_000),
                },
                tok,
            )),
        )
        .await,
        refused(
            "CancelJob of an unknown job",
            &ALLOWED,
            client.clone().cancel_job(with_token(
                pb::CancelJobRequest {
                    job_id: "ffffffffffffffff".into(),
                },
                tok,
            )),
        )
        .await,
        refused(
            "WatchJob of a bad id",
            &ALLOWED,
            client.clone().watch_job(with_token(
                pb::WatchJobRequest {
                    job_id: "zz".into(),
                },
                tok,
            )),
        )
        .await,
        refused(
            "GetJobMetrics of an unknown job",
            &ALLOWED,
            client.clone().get_job_metrics(with_token(
                pb::GetJobRequest {
                    job_id: "0123456789abcdef".into(),
                },
                tok,
            )),
        )
        .await,
        refused(
            "ListJobs with a bad page token",
            &ALLOWED,
            client.clone().list_jobs(with_token(
                pb::ListJobsRequest {
                    page_token: "garbage".into(),
                    ..Default::default()
                },
                tok,
            )),
        )
        .await,
        refused(
            "SubmitJob of garbage",
            &ALLOWED,
            client
                .clone()
                .submit_job(with_token(submit("=== not toml [[[".into()), tok)),
        )
        .await,
        refused(
            "SubmitJob with ring.timeout_s = 1e300",
            &ALLOWED,
            client
                .clone()
                .submit_job(with_token(submit(spec("[ring]\ntimeout_s = 1e300")), tok)),
        )
        .await,
        refused(
            "SubmitJob with threads = 2^31",
            &ALLOWED,
            client
                .clone()
                .submit_job(with_token(submit(spec("threads = 2147483648")), tok)),
        )
        .await,
        refused(
            "SubmitJob with a 900 KB name",
            &ALLOWED,
            client.clone().submit_job(with_token(
                submit(format!(
                    "name = \"{}\"\nmodel = \"mlp\"",
                    "n".repeat(900_000)
                )),
                tok,
            )),
        )
        .await,
        refused(
            "SubmitJob of 3 MB",
            &ALLOWED,
            client
                .clone()
                .submit_job(with_token(submit("#".repeat(3 << 20)), tok)),
        )
        .await,
        refused(
            "SubmitJob reading /etc",
            &ALLOWED,
            client.clone().submit_job(with_token(
                submit(spec("").replace("/usr/share/datasets/fashion-mnist", "/etc")),
                tok,
            )),
        )
        .await,
        refused(
            "SubmitJob writing checkpoints to /tmp/evil",
            &ALLOWED,
            client.clone().submit_job(with_token(
                submit(spec("[checkpoint]\ndir = \"/tmp/ringtrain-hostile\"")),
                tok,
            )),
        )
        .await,
    ];

    // The worker API with a client certificate.
    let mut control = pb::worker_control_client::WorkerControlClient::new(ch);
    checks.push(
        refused(
            "RegisterWorker with a client certificate",
            &ALLOWED,
            control.register_worker(pb::RegisterWorkerRequest::default()),
        )
        .await,
    );
    checks.push(
        refused(
            "ReportEval with a client certificate",
            &ALLOWED,
            control.report_eval(pb::EvalReport::default()),
        )
        .await,
    );
    checks.push(
        refused(
            "ReportCheckpoint with a client certificate",
            &ALLOWED,
            control.report_checkpoint(pb::CheckpointReport {
                dir: "/tmp/ringtrain-hostile".into(),
                ..Default::default()
            }),
        )
        .await,
    );
    // Each worker's agent and ring services with a client certificate.
    for addr in &t.worker_grpc {
        let ch = channel(tls, addr, CertRole::Client, CertRole::Worker).await;
        checks.push(
            refused(
                &format!("DryRun on {addr}"),
                &ALLOWED,
                pb::worker_agent_client::WorkerAgentClient::new(ch.clone())
                    .dry_run(pb::DryRunRequest::default()),
            )
            .await,
        );
        let frames = tokio_stream::iter(vec![pb::RingFrame::default(); 3]);
        let ring = async {
            let mut replies = pb::ring_client::RingClient::new(ch)
                .stream(frames)
                .await?
                .into_inner();
            // A refusal may come as the stream's first message.
            match replies.message().await {
                Ok(m) => Ok(m),
                Err(s) => Err(s),
            }
        };
        checks.push(refused(&format!("Ring stream on {addr}"), &ALLOWED, ring).await);
    }
    wrong.extend(checks.into_iter().filter_map(Result::err));
    drop(held);
    wrong
}

#[test]
fn a_job_trains_while_a_hostile_client_hammers_every_port() {
    if skip_without_data() {
        return;
    }
    let cluster = Cluster::start(2);
    let names = ["coordinator", "worker-0", "worker-1"];
    let mut ports = Vec::new();
    let mut worker_grpc = Vec::new();
    for name in names {
        let ready = cluster.ready(name);
        for key in ["grpc", "ring", "metrics"] {
            if let Some(addr) = ready[key].as_str() {
                ports.push(addr.replace("0.0.0.0", "127.0.0.1"));
                if key == "grpc" && name != "coordinator" {
                    worker_grpc.push(addr.replace("0.0.0.0", "127.0.0.1"));
                }
            }
        }
    }
    assert_eq!(worker_grpc.len(), 2, "workers' addresses: {ports:?}");
    let targets = Targets {
        coordinator: cluster.coordinator.clone(),
        ports,
        worker_grpc,
    };
    let tls = Transport::from_flags(Some(cluster.tls_dir()), false).expect("tls dir");
    let token = default_token(cluster.tls_dir()).expect("admin token");

    let job = cluster.submit(&mlp_spec(), &["max_steps=300"]);
    // Baseline once the job trains: every process has what it needs open.
    wait_for("the job's first steps", Duration::from_secs(60), || {
        let s = cluster.status(&job);
        (s["steps"].as_u64().unwrap_or(0) >= 5).then_some(())
    });
    let pids: BTreeMap<&str, u32> = names.iter().map(|n| (*n, cluster.pid(n))).collect();
    let baseline: BTreeMap<&str, (usize, u64)> = pids
        .iter()
        .map(|(n, pid)| (*n, (fd_count(*pid), rss_kib(*pid))))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rounds = 0;
    let mut wrong = Vec::new();
    let started = Instant::now();
    // At least two rounds, and on while the job trains (at most 60 s).
    while rounds < 2
        || (started.elapsed() < Duration::from_secs(60)
            && cluster.status(&job)["state"].as_str() == Some("running"))
    {
        wrong.extend(rt.block_on(attack_round(&targets, &tls, &token)));
        rounds += 1;
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers in {rounds} rounds:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    let done = wait_for("the job to end", Duration::from_secs(180), || {
        let s = cluster.status(&job);
        (s["state"].as_str() != Some("running") && s["state"].as_str() != Some("pending"))
            .then_some(s)
    });
    assert_eq!(
        done["state"],
        "succeeded",
        "the job under attack: {done}\n{}",
        cluster.tails(30)
    );
    for name in names {
        let log = cluster.log(name);
        assert!(
            !log.contains("panicked"),
            "{name} logged a panic:\n{}",
            cluster.tails(30)
        );
    }
    // Everything the attack opened is closed again, and memory did not grow
    // with it (allocator slack allowed).
    for (name, pid) in &pids {
        let (fds, rss) = baseline[name];
        let back = wait_for_opt(Duration::from_secs(15), || fd_count(*pid) <= fds + 2);
        assert!(
            back,
            "{name}: {} file descriptors open, {fds} before the attack",
            fd_count(*pid)
        );
        let now = rss_kib(*pid);
        assert!(
            now <= rss + rss / 2 + 64 * 1024,
            "{name}: {now} KiB resident, {rss} KiB before the attack"
        );
    }
    eprintln!("hostile client: {rounds} rounds, every call refused as it should be");
}

/// Polls `check` until true or `timeout`; false if it never became true.
fn wait_for_opt(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
