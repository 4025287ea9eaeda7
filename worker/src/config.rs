use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Worker settings: from a TOML file and `RINGTRAIN_*` variables.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The coordinator's gRPC URL, e.g. `http://coordinator:50051`.
    pub coordinator: String,
    /// gRPC listen address (ring service and health).
    pub listen: String,
    /// Raw TCP ring listen address.
    pub ring_listen: String,
    /// Host name or IP that ring neighbours use to reach this worker; empty =
    /// the address the coordinator connection leaves from.
    pub advertise_host: String,
    /// Prometheus `/metrics` listen address; empty disables it.
    pub metrics_listen: String,
    /// Plaintext grpc.health.v1-only listen address (Kubernetes gRPC
    /// probes); empty disables it.
    pub health_listen: String,
    /// How long to keep trying to reach the coordinator at start-up.
    pub connect_timeout_s: f64,
    /// TLS dir (`ringtrain certs init`): mutual TLS to the coordinator, for
    /// the worker's own services and the ring's gRPC plane. Empty: none.
    pub tls_dir: String,
    /// Run in the clear (must be asked for when there is no `tls_dir`).
    pub insecure: bool,
    /// OpenTelemetry collector (OTLP/gRPC URL, e.g. `http://collector:4317`)
    /// that spans are exported to; empty: `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// and when that is unset too, no export.
    pub otlp_endpoint: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:50051".into(),
            listen: "0.0.0.0:50052".into(),
            ring_listen: "0.0.0.0:50053".into(),
            advertise_host: String::new(),
            metrics_listen: "0.0.0.0:9091".into(),
            health_listen: String::new(),
            connect_timeout_s: 10.0,
            tls_dir: String::new(),
            insecure: false,
            otlp_endpoint: String::new(),
        }
    }
}

impl WorkerConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_s.max(0.0))
    }
}
