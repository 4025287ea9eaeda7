//! Mutual TLS, tokens and roles, as a hostile or careless client meets them:
//! every call without a token or with a wrong one is UNAUTHENTICATED, a
//! submitter cannot touch another's job, a plaintext client and a client
//! certificate on the worker API are refused, and a process started without
//! --tls-dir or --insecure says so in one line.

use std::path::Path;

use ringtrain_common::security::{CertRole, Transport};
use ringtrain_proto as pb;
use ringtrain_tests::*;
use tonic::transport::Channel;
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A channel to the coordinator with `role`'s certificate from `dir`.
async fn channel(cluster: &Cluster, dir: &Path, role: CertRole) -> Channel {
    let transport = Transport::from_flags(Some(dir), false).expect("tls dir");
    transport
        .endpoint(&cluster.coordinator, role, Some(CertRole::Coordinator))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

type Client = pb::coordinator_client::CoordinatorClient<Channel>;

async fn list(c: &mut Client, token: Option<&str>) -> Result<pb::ListJobsResponse, tonic::Status> {
    c.list_jobs(with_token(pb::ListJobsRequest::default(), token))
        .await
        .map(tonic::Response::into_inner)
}

/// A job that waits (the cluster has no workers) submitted with `token`.
async fn submit(c: &mut Client, token: &str, name: &str) -> String {
    let spec = format!(
        "name = \"{name}\"\nmodel = \"mlp\"\nworkers = 1\nbatch_size = 8\nmax_steps = 5\n[optimizer]\nkind = \"sgd\"\nlr = 0.05\n[dataset]\nformat = \"idx\"\npath = \"{FASHION_MNIST}\"\n"
    );
    c.submit_job(with_token(
        pb::SubmitJobRequest {
            spec_toml: spec,
            resume_from: String::new(),
        },
        Some(token),
    ))
    .await
    .expect("submit")
    .into_inner()
    .job_id
}

fn admin_token(cluster: &Cluster) -> String {
    ringtrain_common::security::default_token(cluster.tls_dir()).expect("admin token")
}

#[test]
fn calls_without_a_token_or_with_a_wrong_one_are_unauthenticated() {
    let cluster = Cluster::start(0);
    runtime().block_on(async {
        let mut c = Client::new(channel(&cluster, cluster.tls_dir(), CertRole::Client).await);
        let none = list(&mut c, None).await.unwrap_err();
        assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
        assert!(none.message().contains("no token"), "{}", none.message());
        let wrong = list(&mut c, Some("0123456789abcdef0123456789abcdef"))
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
        let cancel = c
            .cancel_job(with_token(
                pb::CancelJobRequest {
                    job_id: "0123456789abcdef".into(),
                },
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(cancel.code(), Code::Unauthenticated);
        // The admin token works.
        list(&mut c, Some(&admin_token(&cluster)))
            .await
            .expect("admin lists");
    });
    // As the command line shows it.
    let o = cluster.cli(&["status", "--token", "0123456789abcdef0123456789abcdef"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown token"), "{}", stderr(&o));
}

#[test]
fn a_submitter_sees_others_jobs_by_name_and_state_only_and_cannot_cancel_them() {
    let mut cluster = Cluster::start(0);
    let o = run(&[
        "certs",
        "add-token",
        cluster.tls_dir().to_str().expect("path"),
        "--principal",
        "alice",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alice = stdout(&o).trim().to_string();
    // The coordinator reads its tokens when it starts.
    cluster.restart_coordinator();
    let admin = admin_token(&cluster);
    runtime().block_on(async {
        let mut c = Client::new(channel(&cluster, cluster.tls_dir(), CertRole::Client).await);
        let admins = submit(&mut c, &admin, "admins-job").await;
        let alices = submit(&mut c, &alice, "alices-job").await;

        let cancel = |job: &str, token: &str| {
            with_token(pb::CancelJobRequest { job_id: job.into() }, Some(token))
        };
        let denied = c.cancel_job(cancel(&admins, &alice)).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        let get = with_token(
            pb::GetJobRequest {
                job_id: admins.clone(),
            },
            Some(&alice),
        );
        let denied = c.get_job(get).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        let watch = with_token(
            pb::WatchJobRequest {
                job_id: admins.clone(),
            },
            Some(&alice),
        );
        let denied = c.watch_job(watch).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

        // Listed: the other's job by name and state, nothing else.
        let seen = list(&mut c, Some(&alice)).await.expect("alice lists");
        let other = seen
            .jobs
            .iter()
            .find(|j| j.job_id == admins)
            .expect("listed");
        assert_eq!(other.name, "admins-job");
        assert_eq!(other.state, pb::JobState::Pending as i32);
        assert!(
            other.checkpoint_dir.is_empty() && other.owner.is_empty() && other.workers_wanted == 0
        );
        let own = seen
            .jobs
            .iter()
            .find(|j| j.job_id == alices)
            .expect("listed");
        assert_eq!((own.owner.as_str(), own.workers_wanted), ("alice", 1));

        // Her own job she may cancel; the admin may cancel anyone's.
        c.cancel_job(cancel(&alices, &alice))
            .await
            .expect("own job");
        c.cancel_job(cancel(&admins, &admin)).await.expect("admin");
        let all = list(&mut c, Some(&admin)).await.expect("admin lists");
        let states: Vec<i32> = all.jobs.iter().map(|j| j.state).collect();
        assert_eq!(states, vec![pb::JobState::Cancelled as i32; 2]);
    });
    // The submitter is shown by status.
    let o = cluster.cli(&["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"owner\":\"alice\""), "{}", stdout(&o));
}

#[test]
fn a_plaintext_client_is_refused_by_a_tls_coordinator_with_a_clear_error() {
    let cluster = Cluster::start(0);
    let o = run(&[
        "status",
        "--insecure",
        "--coordinator",
        &cluster.coordinator,
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    // One error line (besides the --insecure warning), naming the likely fix.
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("--tls-dir"), "{err}");
}

#[test]
fn a_process_without_tls_dir_or_insecure_names_both_in_one_line() {
    for args in [
        vec!["status", "--coordinator", "https://127.0.0.1:1"],
        vec![
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
        ],
        vec!["health", "127.0.0.1:1"],
    ] {
        let o = std::process::Command::new(ringtrain_bin())
            .args(&args)
            .env_remove("RINGTRAIN_TLS_DIR")
            .env_remove("RINGTRAIN_INSECURE")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{args:?}: {err}");
        assert!(
            line.starts_with("error: ")
                && line.contains("--tls-dir")
                && line.contains("--insecure"),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn only_a_worker_certificate_may_call_the_worker_api() {
    let cluster = Cluster::start(0);
    runtime().block_on(async {
        let register = || pb::RegisterWorkerRequest {
            grpc_addr: "127.0.0.1:9".into(),
            ring_addr: "127.0.0.1:9".into(),
            ..Default::default()
        };
        let client = channel(&cluster, cluster.tls_dir(), CertRole::Client).await;
        let mut as_client = pb::worker_control_client::WorkerControlClient::new(client);
        let refused = as_client.register_worker(register()).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

        // A worker certificate cannot act as a client, admin token or not.
        let worker = channel(&cluster, cluster.tls_dir(), CertRole::Worker).await;
        let mut as_worker = Client::new(worker.clone());
        let refused = list(&mut as_worker, Some(&admin_token(&cluster)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        // ... and registers as a worker.
        pb::worker_control_client::WorkerControlClient::new(worker)
            .register_worker(register())
            .await
            .expect("a worker registers");
    });
}

#[test]
fn without_a_certificate_from_the_cluster_ca_nothing_gets_through() {
    let cluster = Cluster::start(0);
    // Another CA's complete set: the handshake fails both ways.
    let stranger = tempfile::tempdir().expect("tempdir");
    ringtrain_common::security::certs::init(stranger.path(), &[], false).expect("certs");
    let o = cluster
        .command(&["status", "--coordinator", &cluster.coordinator])
        .env("RINGTRAIN_TLS_DIR", stranger.path())
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot reach the coordinator"),
        "{}",
        stderr(&o)
    );

    // The cluster's CA but no certificate of one's own: refused.
    runtime().block_on(async {
        let ca = std::fs::read(cluster.tls_dir().join("ca.pem")).expect("ca");
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(CertRole::Coordinator.identity_name());
        let url = cluster.coordinator.replace("http://", "https://");
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .tls_config(tls)
            .expect("tls");
        let result = async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            list(&mut Client::new(channel), Some(&admin_token(&cluster)))
                .await
                .map_err(|s| s.to_string())
        }
        .await;
        assert!(
            result.is_err(),
            "a client without a certificate got through"
        );
    });
}
