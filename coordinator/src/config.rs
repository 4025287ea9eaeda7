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
    /// TLS dir (`ringtrain certs init`): mutual TLS on every connection and
    /// the client tokens of its `tokens.toml`. Empty: none.
    pub tls_dir: String,
    /// Serve in the clear, without client authentication (must be asked for
    /// when there is no `tls_dir`).
    pub insecure: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            metrics_listen: "0.0.0.0:9090".into(),
            data_dir: PathBuf::from("ringtrain-data"),
            heartbeat_interval_ms: 200,
            worker_timeout_ms: 3000,
            suspect_timeout_ms: 600,
            max_model_bytes: 512 << 20,
            tls_dir: String::new(),
            insecure: false,
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
}
