//! The worker process: serves its ring endpoints, registers with the
//! coordinator, heartbeats, and converges to the coordinator's desired
//! assignment by starting or stopping a trainer thread.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringtrain_common::metrics::Metrics;
use ringtrain_common::retry::{retry, Backoff, GaveUp};
use ringtrain_common::security::{non_empty, CertRole, TlsError, Transport};
use ringtrain_common::worker_api::{Assignment, Registration};
use ringtrain_common::{JobId, RingGeneration, WorkerId};
use ringtrain_proto as pb;
use ringtrain_proto::convert::parse_worker;
use ringtrain_proto::worker_control_client::WorkerControlClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::config::WorkerConfig;
use crate::ring::{grpc, tcp, RingEndpoints};
use crate::trainer::{self, AbortSlot, StateSlot, TrainerContext};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the coordinator at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("coordinator at {url} refused registration: {cause}")]
    Registration { url: String, cause: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
}

/// The worker's already-bound listeners.
pub struct Listeners {
    pub grpc: TcpListener,
    pub ring: TcpListener,
    /// grpc.health.v1 alone, in the clear (config `health_listen`).
    pub health: Option<TcpListener>,
}

/// The addresses this worker serves on, once it is up.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ready {
    pub grpc: SocketAddr,
    pub ring: SocketAddr,
    pub worker_id: WorkerId,
}

/// How long shutdown waits for a trainer to stop (it stops at its next step
/// boundary, or after its current checkpoint or report).
const TRAINER_STOP_TIMEOUT: Duration = Duration::from_secs(30);

struct Running {
    key: (JobId, RingGeneration),
    cancel: Arc<AtomicBool>,
    abort: AbortSlot,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    /// Leaves the generation: the trainer stops at its next check, and a
    /// blocked all-reduce is broken now rather than at its timeout. Returns
    /// the thread, which the next trainer joins before taking the state.
    fn stop(self) -> std::thread::JoinHandle<()> {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(abort) = self
            .abort
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            abort.abort();
        }
        self.thread
    }
}

async fn connect(
    url: &str,
    timeout: Duration,
    transport: &Transport,
) -> Result<Channel, WorkerError> {
    let unreachable = |cause: String| WorkerError::Unreachable {
        url: url.to_string(),
        cause,
    };
    let endpoint = transport
        .endpoint(url, CertRole::Worker, Some(CertRole::Coordinator))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        // A coordinator that hangs must not hang heartbeats or the trainer.
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let backoff = Backoff {
        first: Duration::from_millis(50),
        max: Duration::from_secs(1),
    };
    retry(
        deadline,
        backoff,
        || endpoint.connect(),
        |e| tracing::debug!(error = %e, "coordinator not reachable yet"),
    )
    .await
    .map_err(|gave_up| {
        let cause = match gave_up {
            GaveUp::Failed(e) => std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string()),
            GaveUp::Deadline => "no answer".to_string(),
        };
        unreachable(format!("{cause} (gave up after {timeout:?})"))
    })
}

/// The local IP that traffic to the coordinator leaves from: what ring
/// neighbours on the same network can reach.
fn local_ip_towards(url: &str) -> Option<std::net::IpAddr> {
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .ok()?
        .next()?;
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Runs the worker until `shutdown` resolves. `on_ready` is called once the
/// worker is registered (the binary writes its ready file there).
pub async fn run(
    config: WorkerConfig,
    listeners: Listeners,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), WorkerError> {
    let transport = Transport::from_flags(non_empty(&config.tls_dir).as_deref(), config.insecure)?;
    // The ring's gRPC dialer and the agent read it from here.
    ringtrain_common::security::install(transport.clone());
    let (grpc_addr, ring_addr) = (listeners.grpc.local_addr()?, listeners.ring.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Ring endpoints first: neighbours may dial as soon as we are in a ring.
    let grpc_inbox = Arc::new(grpc::GrpcInbox::default());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::ring_server::RingServer<grpc::RingService>>()
        .await;
    // Held until `run` returns.
    let _health_in_clear = match listeners.health {
        Some(l) => Some(ringtrain_common::health::serve_in_clear(l, health.clone())?),
        None => None,
    };
    let agent = crate::agent::AgentService::default();
    let server = transport
        .server(grpc::server_builder(), CertRole::Worker)?
        .layer(ringtrain_common::grpc_status::oversize_layer())
        .add_service(health)
        .add_service(pb::reflection::v1().map_err(|e| WorkerError::Reflection(e.to_string()))?)
        .add_service(pb::reflection::v1alpha().map_err(|e| WorkerError::Reflection(e.to_string()))?)
        .add_service(grpc::RingService::new(grpc_inbox.clone()).into_server())
        .add_service(agent.clone().into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc),
            stopped(),
        );
    let server = tokio::spawn(server);
    let endpoints = RingEndpoints {
        tcp: Some(tcp::TcpInbox::serve(listeners.ring, stopped())?),
        grpc: Some(grpc_inbox),
    };

    let url = config.coordinator.clone();
    let channel = connect(&url, config.connect_timeout(), &transport).await?;
    let mut client = WorkerControlClient::new(channel);
    let model_files = Arc::new(crate::model_files::ModelFiles::new(client.clone()));
    agent.set_model_files(model_files.clone());
    let host = if config.advertise_host.is_empty() {
        local_ip_towards(&url)
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "127.0.0.1".into())
    } else {
        config.advertise_host.clone()
    };
    let registration = Registration {
        grpc_addr: format!("{host}:{}", grpc_addr.port()),
        ring_addr: format!("{host}:{}", ring_addr.port()),
        hostname: std::env::var("HOSTNAME").unwrap_or_default(),
        pid: std::process::id(),
    };
    let register = pb::RegisterWorkerRequest::from(&registration);
    let registration_error = |cause: String| WorkerError::Registration {
        url: url.clone(),
        cause,
    };
    let reg = client
        .register_worker(register.clone())
        .await
        .map_err(|e| registration_error(e.message().to_string()))?
        .into_inner();
    let mut worker_id =
        parse_worker(&reg.worker_id).map_err(|e| registration_error(e.to_string()))?;
    info!(worker = %worker_id, grpc = %registration.grpc_addr, ring = %registration.ring_addr, "registered with coordinator");
    on_ready(&Ready {
        grpc: grpc_addr,
        ring: ring_addr,
        worker_id,
    });

    let progress = Arc::new(AtomicU64::new(0));
    let state: StateSlot = Arc::default();
    let mut current: Option<Running> = None;
    // The last trainer that was told to stop; the next one joins it first.
    let mut previous: Option<std::thread::JoinHandle<()>> = None;
    let mut every = tokio::time::interval(Duration::from_millis(u64::from(
        reg.heartbeat_interval_ms.max(20),
    )));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = every.tick() => {}
        }
        let beat = pb::HeartbeatRequest {
            worker_id: worker_id.to_string(),
            job_id: current
                .as_ref()
                .map(|r| r.key.0.to_string())
                .unwrap_or_default(),
            ring_generation: current.as_ref().map_or(0, |r| r.key.1 .0),
            param_version: progress.load(Ordering::Relaxed),
        };
        let resp = match client.heartbeat(beat).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                warn!(error = %e.message(), "heartbeat failed; coordinator unavailable?");
                continue;
            }
        };
        if resp.unknown_worker {
            // The coordinator restarted or declared us lost: leave the ring
            // and come back as a new member, keeping the training state (a
            // restarted coordinator resumes jobs from what workers hold).
            if let Some(r) = current.take() {
                previous = Some(r.stop());
            }
            match client.register_worker(register.clone()).await {
                Ok(r) => match parse_worker(&r.into_inner().worker_id) {
                    Ok(id) => {
                        worker_id = id;
                        info!(worker = %worker_id, "registered again");
                    }
                    Err(e) => warn!(error = %e, "re-registration answered with a bad id"),
                },
                Err(e) => warn!(error = %e.message(), "re-registration failed"),
            }
            continue;
        }
        let desired = match resp.assignment.map(Assignment::try_from).transpose() {
            Ok(a) => a.map(|a| ((a.job, a.generation), a)),
            Err(e) => {
                error!(error = %e, "unusable assignment");
                continue;
            }
        };
        let same = match (&current, &desired) {
            (Some(r), Some((key, _))) => &r.key == key,
            (None, None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        if let Some(r) = current.take() {
            info!(job = %r.key.0, generation = %r.key.1, "leaving ring generation");
            previous = Some(r.stop());
        }
        let Some((key, assignment)) = desired else {
            continue;
        };
        info!(job = %assignment.job, generation = %assignment.generation, rank = %assignment.rank, world = assignment.members.len(), "joining ring");
        let cancel = Arc::new(AtomicBool::new(false));
        let abort: AbortSlot = Arc::default();
        let ctx = TrainerContext {
            worker_id,
            assignment,
            client: client.clone(),
            runtime: tokio::runtime::Handle::current(),
            endpoints: endpoints.clone(),
            cancel: cancel.clone(),
            abort: abort.clone(),
            state: state.clone(),
            metrics: metrics.clone(),
            progress: progress.clone(),
            model_files: model_files.clone(),
        };
        let before = previous.take();
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                // The state is back in its slot once the previous trainer ends.
                if let Some(t) = before {
                    let _ = t.join();
                }
                // Training panics are caught and reported inside; this
                // catches one in the reporting itself, so that no panic ends
                // the worker: the job fails with its message, this job's
                // state is dropped, and the worker takes new work.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    trainer::run_and_report(&ctx)
                }));
                if let Err(payload) = run {
                    let message = crate::panic_payload_message(payload.as_ref());
                    ctx.state.lock().unwrap_or_else(|p| p.into_inner()).take();
                    trainer::report_failure(
                        &ctx,
                        Default::default(),
                        format!("trainer panicked: {message}"),
                    );
                }
            })?;
        current = Some(Running {
            key,
            cancel,
            abort,
            thread,
        });
    }
    info!("shutting down");
    // Stop the trainers and wait for them: a checkpoint being written is
    // finished, and no thread is left writing as the process exits.
    let trainers: Vec<_> = current
        .take()
        .map(Running::stop)
        .into_iter()
        .chain(previous)
        .collect();
    let joined = tokio::task::spawn_blocking(move || {
        for t in trainers {
            let _ = t.join();
        }
    });
    if tokio::time::timeout(TRAINER_STOP_TIMEOUT, joined)
        .await
        .is_err()
    {
        warn!(timeout = ?TRAINER_STOP_TIMEOUT, "the trainer did not stop in time; exiting without it");
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}
