use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Coordinator settings: from a TOML file and `RINGTRAIN_*` variables.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address (client and worker APIs).
    pub listen: String,
    /// Prometheus `/metrics` listen address; empty disables it.
    pub metrics_listen: String,
    /// Plaintext grpc.health.v1-only listen address (Kubernetes gRPC
    /// probes); empty disables it.
    pub health_listen: String,
    /// Where jobs without a checkpoint dir of their own write checkpoints.
    pub data_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is declared lost.
    pub worker_timeout_ms: u64,
    /// A worker named by a neighbour's ring failure and silent this long
    /// since is declared lost (fast detection of dead workers).
    pub suspect_timeout_ms: u64,
    /// The largest model file a client may upload.
    pub max_model_bytes: u64,
    /// Where a spec's data may come from (dataset, test file, model file,
    /// `init_from`). Empty: `$RINGTRAIN_DATA` if set, and /usr/share/datasets.
    /// The data dir and the checkpoint root are always allowed too.
    pub data_roots: Vec<PathBuf>,
    /// Where a spec's `checkpoint.dir` may be (the data dir, where jobs
    /// without one write, is always allowed). Empty: the data dir.
    pub checkpoint_root: PathBuf,
    /// Most workers registered at once, and most workers a job may ask for.
    pub max_workers: usize,
    /// A lost worker is forgotten (no longer listed) after this long.
    pub forget_lost_workers_ms: u64,
    /// Finished jobs kept in memory and in the job store.
    pub job_retention: JobRetention,
    /// Open `WatchJob` streams per client address.
    pub max_watch_streams_per_client: usize,
    /// TLS dir (`ringtrain certs init`): mutual TLS on every connection and
    /// the client tokens of its `tokens.toml`. Empty: none.
    pub tls_dir: String,
    /// Serve in the clear, without client authentication (must be asked for
    /// when there is no `tls_dir`).
    pub insecure: bool,
    /// OpenTelemetry collector (OTLP/gRPC URL, e.g. `http://collector:4317`)
    /// that spans are exported to; empty: `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// and when that is unset too, no export.
    pub otlp_endpoint: String,
}

/// How many finished jobs (succeeded, failed, cancelled) the coordinator
/// remembers: the newest `count`, none older than `max_age_s` (since
/// submission). Their checkpoints stay on disk; uploaded models no job
/// names any more are deleted.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobRetention {
    pub count: usize,
    pub max_age_s: u64,
}

impl Default for JobRetention {
    fn default() -> Self {
        Self {
            count: 1000,
            max_age_s: 30 * 24 * 3600,
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            metrics_listen: "0.0.0.0:9090".into(),
            health_listen: String::new(),
            data_dir: PathBuf::from("ringtrain-data"),
            heartbeat_interval_ms: 200,
            worker_timeout_ms: 3000,
            suspect_timeout_ms: 600,
            max_model_bytes: 512 << 20,
            data_roots: Vec::new(),
            checkpoint_root: PathBuf::new(),
            max_workers: 256,
            forget_lost_workers_ms: 10 * 60 * 1000,
            job_retention: JobRetention::default(),
            max_watch_streams_per_client: 64,
            tls_dir: String::new(),
            insecure: false,
            otlp_endpoint: String::new(),
        }
    }
}

impl CoordinatorConfig {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn worker_timeout(&self) -> Duration {
        Duration::from_millis(self.worker_timeout_ms)
    }

    pub fn suspect_timeout(&self) -> Duration {
        Duration::from_millis(self.suspect_timeout_ms)
    }

    /// Where spec data may come from, resolved (see [`ringtrain_common::paths`]).
    pub fn resolved_data_roots(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut roots = self.data_roots.clone();
        if roots.is_empty() {
            if let Some(data) = std::env::var_os("RINGTRAIN_DATA").filter(|d| !d.is_empty()) {
                roots.push(PathBuf::from(data));
            }
            roots.push(PathBuf::from("/usr/share/datasets"));
        }
        // Checkpoints are data too: `init_from` and resuming read them.
        roots.extend(self.checkpoint_roots_unresolved());
        ringtrain_common::paths::resolve_roots(&roots)
    }

    /// Where checkpoints may be written, resolved.
    pub fn resolved_checkpoint_roots(&self) -> std::io::Result<Vec<PathBuf>> {
        ringtrain_common::paths::resolve_roots(&self.checkpoint_roots_unresolved())
    }

    fn checkpoint_roots_unresolved(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.data_dir.clone()];
        if !self.checkpoint_root.as_os_str().is_empty() {
            roots.push(self.checkpoint_root.clone());
        }
        roots
    }
}
