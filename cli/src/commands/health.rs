//! `ringtrain health ADDR`: one `grpc.health.v1` check against a coordinator
//! or a worker. Exits 0 when the service is SERVING, otherwise fails with a
//! one-line error. Container healthchecks run it (no shell or curl needed).

use std::time::Duration;

use anyhow::{anyhow, bail};
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(clap::Args)]
pub struct HealthArgs {
    /// gRPC address: HOST:PORT or http://HOST:PORT.
    pub addr: String,
    /// Service name to check; empty (the default) is the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this many seconds (connecting and the call together).
    #[arg(long, default_value_t = 3.0)]
    pub timeout_s: f64,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let url = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let timeout = Duration::from_secs_f64(args.timeout_s.max(0.001));
    let what = if args.service.is_empty() {
        url.clone()
    } else {
        format!("{url} (service '{}')", args.service)
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| anyhow!("'{}' is not a gRPC address (expected HOST:PORT)", args.addr))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let check = async {
        let channel = endpoint.connect().await.map_err(|e| {
            // The innermost cause ("Connection refused") is the useful one.
            let mut cause: &dyn std::error::Error = &e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            anyhow!("{what}: cannot connect: {cause}")
        })?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|s| anyhow!("{what}: health check failed: {}", s.message()))?;
        anyhow::Ok(reply.into_inner().status)
    };
    let status = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| anyhow!("{what}: no answer within {:.1}s", args.timeout_s))??;
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => {
            println!("{what}: SERVING");
            Ok(())
        }
        Ok(other) => bail!("{what}: {}", other.as_str_name()),
        Err(_) => bail!("{what}: unknown status {status}"),
    }
}
