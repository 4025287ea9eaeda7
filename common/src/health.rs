//! grpc.health.v1 alone, in the clear, on its own port.
//!
//! Kubernetes' native gRPC probes (and most load balancers' health checks)
//! speak no TLS, while every ringtrain server requires mutual TLS. This
//! listener answers only the health service (whether the server is up), so
//! it reveals nothing else and accepts no request that changes anything.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_server::{Health, HealthServer};

/// The running listener: stops when dropped, with the server it reports for.
pub struct HealthInClear {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HealthInClear {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `health` alone on `listener` until the returned guard drops.
pub fn serve_in_clear<H: Health>(
    listener: TcpListener,
    health: HealthServer<H>,
) -> std::io::Result<HealthInClear> {
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "plaintext health listener stopped");
        }
    });
    tracing::info!(health = %local, "plaintext health checks (grpc.health.v1 only)");
    Ok(HealthInClear { addr: local, task })
}
