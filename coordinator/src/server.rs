//! Wiring: serve both gRPC services (plus grpc.health.v1) on an
//! already-bound listener until `shutdown` resolves, with a periodic
//! scheduler tick so lost workers are noticed even when nobody calls.

use std::future::Future;

use ringtrain_common::metrics::Metrics;
use ringtrain_proto as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use ringtrain_common::security::certs::TOKENS_FILE;
use ringtrain_common::security::{non_empty, CertRole, Tokens, Transport};

use crate::access::Security;
use crate::config::CoordinatorConfig;
use crate::service::{Coordinator, MAX_CLIENT_MESSAGE_BYTES, MAX_WORKER_MESSAGE_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] ringtrain_common::security::TlsError),
    #[error(transparent)]
    Tokens(#[from] ringtrain_common::security::TokensError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Listen(#[from] std::io::Error),
}

/// The coordinator's security from its config: a TLS dir (with its tokens
/// file), or plaintext only when `insecure` says so.
pub fn security(config: &CoordinatorConfig) -> Result<Security, ServeError> {
    let transport = Transport::from_flags(non_empty(&config.tls_dir).as_deref(), config.insecure)?;
    let tokens = match transport.tls_dir() {
        Some(dir) => Some(Tokens::load(&dir.path().join(TOKENS_FILE))?),
        None => None,
    };
    Ok(Security { transport, tokens })
}

/// Serves until `shutdown`. Jobs persist in `<data_dir>/coordinator.redb`.
/// `health_listener`, if any, serves grpc.health.v1 alone in the clear
/// (config `health_listen`: Kubernetes' gRPC probes speak no TLS).
pub async fn serve(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    config: CoordinatorConfig,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let security = security(&config)?;
    let transport = security.transport.clone();
    let store = crate::store::Store::open(&config.data_dir.join("coordinator.redb"))?;
    let rpc_metrics = metrics.rpc_layer();
    let coordinator = Coordinator::with_security(config.clone(), metrics, store, security)?;
    let ticker = coordinator.clone();
    let tick = tokio::spawn(async move {
        let mut every = tokio::time::interval(config.heartbeat_interval());
        loop {
            every.tick().await;
            ticker.tick();
        }
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::coordinator_server::CoordinatorServer<Coordinator>>()
        .await;
    // Held until the server stops.
    let _health_in_clear = match health_listener {
        Some(l) => Some(ringtrain_common::health::serve_in_clear(l, health.clone())?),
        None => None,
    };
    let closer = coordinator.clone();
    // Watch streams would hold a graceful shutdown open until their jobs end.
    let shutdown = async move {
        shutdown.await;
        closer.close_streams();
    };
    let result = transport
        .server(tonic::transport::Server::builder(), CertRole::Coordinator)?
        // Outermost: the time and status code clients see.
        .layer(rpc_metrics)
        .layer(ringtrain_common::grpc_status::oversize_layer())
        .add_service(health)
        .add_service(pb::reflection::v1()?)
        .add_service(pb::reflection::v1alpha()?)
        .add_service(
            pb::coordinator_server::CoordinatorServer::new(coordinator.clone())
                .max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES),
        )
        .add_service(
            pb::worker_control_server::WorkerControlServer::new(coordinator.clone())
                .max_decoding_message_size(MAX_WORKER_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    tick.abort();
    // Store writes and reports of jobs that just ended are still queued.
    tokio::task::spawn_blocking(move || coordinator.finish_writes())
        .await
        .ok();
    Ok(result?)
}
