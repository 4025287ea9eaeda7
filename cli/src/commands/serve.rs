//! `ringtrain coordinator` and `ringtrain worker`: bind, serve until a
//! shutdown signal, drain.

use std::path::PathBuf;

use anyhow::Context;
use ringtrain_common::metrics::{self, Metrics};
use ringtrain_common::telemetry::{self, LogFormat, OtlpConfig};
use ringtrain_coordinator::CoordinatorConfig;
use ringtrain_worker::config::WorkerConfig;
use tokio::net::TcpListener;
use tracing::info;

use crate::settings::{self, shutdown_signal};

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// TOML config file (keys: listen, metrics_listen, data_dir, data_roots, checkpoint_root,
    /// max_workers, job_retention = { count, max_age_s }, heartbeat_interval_ms, worker_timeout_ms,
    /// tls_dir, insecure, ...).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the config).
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Plaintext listen address serving grpc.health.v1 only (Kubernetes
    /// gRPC probes speak no TLS); unset: none.
    #[arg(long)]
    health_listen: Option<String>,
    #[arg(long)]
    data_dir: Option<String>,
    /// A directory a job's data may come from (repeat for several;
    /// replaces the config's data_roots). Default: $RINGTRAIN_DATA, or
    /// /usr/share/datasets.
    #[arg(long = "data-root", value_name = "DIR")]
    data_roots: Vec<PathBuf>,
    /// Where a job's checkpoint.dir may be (besides the data dir).
    #[arg(long)]
    checkpoint_root: Option<String>,
    /// Most workers registered at once, and most a job may ask for.
    #[arg(long)]
    max_workers: Option<String>,
    /// Write {"grpc": addr, "metrics": addr} here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// OpenTelemetry collector to export spans to (OTLP/gRPC), e.g.
    /// http://127.0.0.1:4317 (config key otlp_endpoint; default
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; unset: none).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    security: ServerSecurity,
}

/// `--tls-dir` / `--insecure` of a server (config keys tls_dir, insecure;
/// env RINGTRAIN_TLS_DIR, RINGTRAIN_INSECURE).
#[derive(clap::Args)]
pub struct ServerSecurity {
    /// TLS dir (`ringtrain certs init`): mutual TLS with the cluster CA.
    #[arg(long)]
    tls_dir: Option<String>,
    /// Serve and connect in the clear, without authentication.
    #[arg(long)]
    insecure: bool,
}

impl ServerSecurity {
    fn overrides(&self) -> [(&'static str, Option<String>); 2] {
        [
            ("tls_dir", self.tls_dir.clone()),
            ("insecure", self.insecure.then(|| "true".to_string())),
        ]
    }
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// TOML config file (keys: coordinator, listen, ring_listen, advertise_host, metrics_listen, connect_timeout_s, tls_dir, insecure).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Coordinator URL, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    coordinator: Option<String>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    ring_listen: Option<String>,
    #[arg(long)]
    advertise_host: Option<String>,
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Plaintext listen address serving grpc.health.v1 only (Kubernetes
    /// gRPC probes speak no TLS); unset: none.
    #[arg(long)]
    health_listen: Option<String>,
    #[arg(long)]
    connect_timeout_s: Option<String>,
    /// Write {"grpc", "ring", "worker_id", "metrics"} here once registered.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// OpenTelemetry collector to export spans to (OTLP/gRPC), e.g.
    /// http://127.0.0.1:4317 (config key otlp_endpoint; default
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; unset: none).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    security: ServerSecurity,
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// The plaintext health listener, when `addr` names one.
async fn bind_health(addr: &str) -> anyhow::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(bind("health checks", addr).await?))
}

fn local(listener: &Option<TcpListener>) -> Option<String> {
    listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
}

async fn start_metrics(addr: &str, metrics: &Metrics) -> anyhow::Result<Option<String>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = bind("metrics", addr).await?;
    let local = listener.local_addr()?.to_string();
    tokio::spawn(metrics::serve(listener, metrics.clone(), shutdown_signal()));
    Ok(Some(local))
}

pub fn coordinator(args: CoordinatorArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let [tls, insecure] = args.security.overrides();
    let mut config: CoordinatorConfig = settings::load(
        args.config.as_deref(),
        &[
            ("listen", args.listen),
            ("metrics_listen", args.metrics_listen),
            ("health_listen", args.health_listen),
            ("data_dir", args.data_dir),
            ("checkpoint_root", args.checkpoint_root),
            ("max_workers", args.max_workers),
            ("otlp_endpoint", args.otlp_endpoint),
            tls,
            insecure,
        ],
    )?;
    if !args.data_roots.is_empty() {
        config.data_roots = args.data_roots;
    }
    // Before binding anything: a clear error when neither is chosen.
    let rt = tokio::runtime::Runtime::new()?;
    let tracing = start_tracing(
        &rt,
        log_format,
        &config.otlp_endpoint,
        "ringtrain-coordinator",
    );
    ringtrain_coordinator::server::security(&config)?;
    config.data_dir = std::path::absolute(&config.data_dir)
        .with_context(|| format!("data dir {}", config.data_dir.display()))?;
    let result = rt.block_on(async move {
        let listener = bind("gRPC", &config.listen).await?;
        let grpc = listener.local_addr()?.to_string();
        let metrics = Metrics::default();
        let metrics_addr = start_metrics(&config.metrics_listen, &metrics).await?;
        let health = bind_health(&config.health_listen).await?;
        let health_addr = local(&health);
        info!(%grpc, metrics = ?metrics_addr, health = ?health_addr, data_dir = %config.data_dir.display(), "coordinator listening");
        if let Some(path) = &args.ready_file {
            settings::write_ready_file(
                path,
                &serde_json::json!({"grpc": grpc, "metrics": metrics_addr, "health": health_addr}),
            )?;
        }
        ringtrain_coordinator::serve(listener, health, config, metrics, shutdown_signal())
            .await
            .context("coordinator server")?;
        info!("coordinator stopped");
        Ok(())
    });
    // The drain's last step: the spans not exported yet.
    tracing.shutdown();
    result
}

/// Installs tracing for a serving role, exporting spans to `otlp_endpoint`
/// (or `$OTEL_EXPORTER_OTLP_ENDPOINT`) when one is set. The exporter's
/// gRPC channel lives on `rt`.
fn start_tracing(
    rt: &tokio::runtime::Runtime,
    log_format: LogFormat,
    otlp_endpoint: &str,
    service: &'static str,
) -> telemetry::Telemetry {
    let _in_runtime = rt.enter();
    telemetry::init_with_otlp(log_format, "info", &OtlpConfig::new(otlp_endpoint, service))
}

pub fn worker(args: WorkerArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let [tls, insecure] = args.security.overrides();
    let config: WorkerConfig = settings::load(
        args.config.as_deref(),
        &[
            tls,
            insecure,
            ("coordinator", args.coordinator),
            ("listen", args.listen),
            ("ring_listen", args.ring_listen),
            ("advertise_host", args.advertise_host),
            ("metrics_listen", args.metrics_listen),
            ("health_listen", args.health_listen),
            ("connect_timeout_s", args.connect_timeout_s),
            ("otlp_endpoint", args.otlp_endpoint),
        ],
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let tracing = start_tracing(&rt, log_format, &config.otlp_endpoint, "ringtrain-worker");
    let result = rt.block_on(async move {
        let listeners = ringtrain_worker::service::Listeners {
            grpc: bind("gRPC", &config.listen).await?,
            ring: bind("the ring", &config.ring_listen).await?,
            health: bind_health(&config.health_listen).await?,
        };
        let health_addr = local(&listeners.health);
        let metrics = Metrics::default();
        let metrics_addr = start_metrics(&config.metrics_listen, &metrics).await?;
        let ready_file = args.ready_file.clone();
        let mut ready_error = None;
        ringtrain_worker::service::run(config, listeners, metrics, shutdown_signal(), |ready| {
            if let Some(path) = &ready_file {
                let v = serde_json::json!({
                    "grpc": ready.grpc, "ring": ready.ring,
                    "worker_id": ready.worker_id.to_string(), "metrics": metrics_addr,
                    "health": health_addr,
                });
                ready_error = settings::write_ready_file(path, &v).err();
            }
        })
        .await?;
        match ready_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    tracing.shutdown();
    result
}
