//! `ringtrain health ADDR`: one `grpc.health.v1` check against a coordinator
//! or a worker. Exits 0 when the service is SERVING, otherwise fails with a
//! one-line error. Container healthchecks run it (no shell or curl needed).

use std::time::Duration;

use anyhow::{anyhow, bail};
use ringtrain_common::security::{CertRole, Transport};
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
    /// TLS dir: connect with its client certificate (else its worker's or
    /// coordinator's: the one a container has), checking the server's.
    #[arg(long, env = "RINGTRAIN_TLS_DIR")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Connect in the clear.
    #[arg(long, env = "RINGTRAIN_INSECURE", value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure: bool,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let transport = Transport::from_flags(args.tls_dir.as_deref(), args.insecure)?;
    // Health checks run where only one role's certificate is (a worker's
    // container): use the first one present.
    let role = match &args.tls_dir {
        Some(dir) => CertRole::ALL
            .into_iter()
            .rev()
            .find(|r| dir.join(format!("{}.pem", r.file_stem())).is_file())
            .unwrap_or(CertRole::Client),
        None => CertRole::Client,
    };
    let endpoint = transport.endpoint(&args.addr, role, None)?;
    let url = endpoint.uri().to_string();
    let timeout = Duration::from_secs_f64(args.timeout_s.max(0.001));
    let what = if args.service.is_empty() {
        url.clone()
    } else {
        format!("{url} (service '{}')", args.service)
    };
    let endpoint = endpoint.connect_timeout(timeout).timeout(timeout);
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
