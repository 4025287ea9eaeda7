//! Prometheus metrics through the official `prometheus-client` crate, served
//! by axum.
//!
//! [`Metrics`] is one process's registry. Counters and gauges are created on
//! first use under the names their call sites give (the names dashboards rely
//! on); the histograms are typed and always present:
//!
//! - `ringtrain_step_seconds`: a worker's whole training step;
//! - `ringtrain_step_phase_seconds{phase="data|forward_backward|allreduce|optimizer"}`;
//! - `ringtrain_ring_wait_seconds`: per step, the time the rank's ring receiver
//!   was blocked waiting for its left neighbour's frames (the all-reduce's
//!   time less the local summing, decoding and sending);
//! - `ringtrain_rpc_seconds{service,method,code}`: the coordinator's gRPC
//!   handling time, from a request's arrival to its response headers.
//!
//! `serve` answers `GET /metrics` (Prometheus text 0.0.4, or OpenMetrics 1.0
//! when the scraper's `Accept` asks for it) and `GET /healthz` on an
//! already-bound listener.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::{prometheus_text, text as openmetrics_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::codegen::http;

type Labels = Vec<(&'static str, String)>;
type CounterF = Counter<f64, AtomicU64>;
type GaugeF = Gauge<f64, AtomicU64>;
type RpcLabels = [(&'static str, String); 3];
type PhaseLabels = [(&'static str, &'static str); 1];

/// Histogram buckets in seconds: 1 ms doubling up to ~65 s (17 buckets).
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// A phase of a training step, as `ringtrain_step_phase_seconds` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Data,
    ForwardBackward,
    Allreduce,
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Data,
        Phase::ForwardBackward,
        Phase::Allreduce,
        Phase::Optimizer,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::ForwardBackward => "forward_backward",
            Phase::Allreduce => "allreduce",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// The families created on first use, by name, and the registry holding them.
struct Dynamic {
    registry: Registry,
    counters: HashMap<&'static str, Family<Labels, CounterF>>,
    gauges: HashMap<&'static str, Family<Labels, GaugeF>>,
}

struct Inner {
    dynamic: Mutex<Dynamic>,
    step: Histogram,
    /// One handle per [`Phase`], in `Phase::ALL` order.
    phases: [Histogram; 4],
    ring_wait: Histogram,
    rpc: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

/// A registry of metric families. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let step = seconds_histogram();
        registry.register(
            "ringtrain_step_seconds",
            "Seconds of a worker's whole training step",
            step.clone(),
        );
        let phase_family: Family<PhaseLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "ringtrain_step_phase_seconds",
            "Seconds of each phase of a training step (data, forward_backward, allreduce, optimizer)",
            phase_family.clone(),
        );
        let phases = Phase::ALL.map(|p| phase_family.get_or_create_owned(&[("phase", p.label())]));
        let ring_wait = seconds_histogram();
        registry.register(
            "ringtrain_ring_wait_seconds",
            "Seconds per step a rank's ring receiver waited on its left neighbour's frames (all-reduce time less local summing and sending)",
            ring_wait.clone(),
        );
        let rpc: Family<RpcLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "ringtrain_rpc_seconds",
            "Seconds the coordinator took to answer a gRPC call, from its arrival to the response headers, by service, method and status code",
            rpc.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                dynamic: Mutex::new(Dynamic {
                    registry,
                    counters: HashMap::new(),
                    gauges: HashMap::new(),
                }),
                step,
                phases,
                ring_wait,
                rpc,
            }),
        }
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

/// The registry appends the full stop itself.
fn help_text(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

impl Metrics {
    fn dynamic(&self) -> std::sync::MutexGuard<'_, Dynamic> {
        self.inner.dynamic.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds to a counter. `name` ends in `_total`, which the exposition
    /// adds to the family's name itself.
    pub fn inc(
        &self,
        name: &'static str,
        help: &'static str,
        lbl: &[(&'static str, &str)],
        by: f64,
    ) {
        let mut d = self.dynamic();
        let Dynamic {
            registry, counters, ..
        } = &mut *d;
        let family = counters.entry(name).or_insert_with(|| {
            let f = Family::default();
            let base = name.strip_suffix("_total").unwrap_or(name);
            registry.register(base, help_text(help), f.clone());
            f
        });
        family.get_or_create(&labels(lbl)).inc_by(by);
    }

    pub fn set(
        &self,
        name: &'static str,
        help: &'static str,
        lbl: &[(&'static str, &str)],
        value: f64,
    ) {
        let mut d = self.dynamic();
        let Dynamic {
            registry, gauges, ..
        } = &mut *d;
        let family = gauges.entry(name).or_insert_with(|| {
            let f = Family::default();
            registry.register(name, help_text(help), f.clone());
            f
        });
        family.get_or_create(&labels(lbl)).set(value);
    }

    /// Drops every series of a gauge family (before re-setting a changing label set).
    pub fn clear(&self, name: &'static str) {
        let d = self.dynamic();
        if let Some(f) = d.gauges.get(name) {
            f.clear();
        }
    }

    /// One training step's whole time (`ringtrain_step_seconds`).
    pub fn observe_step(&self, seconds: f64) {
        self.inner.step.observe(seconds);
    }

    /// One phase of a training step (`ringtrain_step_phase_seconds`).
    pub fn observe_phase(&self, phase: Phase, seconds: f64) {
        let i = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.inner.phases[i].observe(seconds);
    }

    /// A step's wait on the ring's neighbours (`ringtrain_ring_wait_seconds`).
    pub fn observe_ring_wait(&self, seconds: f64) {
        self.inner.ring_wait.observe(seconds);
    }

    /// One answered gRPC call (`ringtrain_rpc_seconds`).
    pub fn observe_rpc(&self, service: &str, method: &str, code: &str, seconds: f64) {
        self.inner
            .rpc
            .get_or_create(&[
                ("service", service.to_string()),
                ("method", method.to_string()),
                ("code", code.to_string()),
            ])
            .observe(seconds);
    }

    /// A tower layer timing every call of a tonic server into
    /// `ringtrain_rpc_seconds`.
    pub fn rpc_layer(&self) -> RpcLayer {
        RpcLayer {
            metrics: self.clone(),
        }
    }

    /// Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let d = self.dynamic();
        let mut out = String::new();
        let _ = prometheus_text::encode(&mut out, &d.registry);
        out
    }

    /// OpenMetrics 1.0 text (ends in `# EOF`).
    pub fn render_openmetrics(&self) -> String {
        let d = self.dynamic();
        let mut out = String::new();
        let _ = openmetrics_text::encode(&mut out, &d.registry);
        out
    }
}

/// See [`Metrics::rpc_layer`].
#[derive(Clone)]
pub struct RpcLayer {
    metrics: Metrics,
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcTimer<S>;

    fn layer(&self, inner: S) -> RpcTimer<S> {
        RpcTimer {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLayer`] wraps around a server.
#[derive(Clone)]
pub struct RpcTimer<S> {
    inner: S,
    metrics: Metrics,
}

/// A gRPC status code's name as grpc-go spells it (`OK`, `NotFound`, ...).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_string(),
        other => format!("{other:?}"),
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcTimer<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        // "/package.Service/Method"
        let (service, method) = request
            .uri()
            .path()
            .trim_start_matches('/')
            .split_once('/')
            .map(|(s, m)| (s.to_string(), m.to_string()))
            .unwrap_or_default();
        let metrics = self.metrics.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            if let Ok(response) = &result {
                // A handler's error comes back trailers-only, its status in
                // the headers; a success (or a stream's later error) sends it
                // in trailers, after the time measured here.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                // Paths no service knows would make a label value each.
                let (service, method) = if code == tonic::Code::Unimplemented
                    || service.is_empty()
                    || method.is_empty()
                {
                    ("unknown", "unknown")
                } else {
                    (service.as_str(), method.as_str())
                };
                metrics.observe_rpc(
                    service,
                    method,
                    &code_name(code),
                    started.elapsed().as_secs_f64(),
                );
            }
            result
        })
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` and `/healthz` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::http::header;
    use axum::routing::get;

    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let metrics = metrics.clone();
                async move {
                    let openmetrics = headers
                        .get_all(header::ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.contains("application/openmetrics-text"));
                    if openmetrics {
                        (
                            [(header::CONTENT_TYPE, OPENMETRICS)],
                            metrics.render_openmetrics(),
                        )
                    } else {
                        (
                            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                            metrics.render(),
                        )
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inc("ringtrain_steps_total", "Steps.", &[("job", "a")], 2.0);
        m.inc("ringtrain_steps_total", "Steps.", &[("job", "a")], 1.0);
        m.set("ringtrain_loss", "Loss.", &[], 0.5);
        let text = m.render();
        assert!(
            text.contains("# TYPE ringtrain_steps_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP ringtrain_steps_total Steps.\n"),
            "{text}"
        );
        assert!(
            text.contains("ringtrain_steps_total{job=\"a\"} 3"),
            "{text}"
        );
        assert!(text.contains("ringtrain_loss 0.5"), "{text}");
        m.clear("ringtrain_loss");
        assert!(!m.render().contains("ringtrain_loss 0.5"));
    }

    #[test]
    fn renders_the_histograms() {
        let m = Metrics::default();
        m.observe_step(0.25);
        for p in Phase::ALL {
            m.observe_phase(p, 0.01);
        }
        m.observe_ring_wait(0.002);
        m.observe_rpc("ringtrain.v1.WorkerControl", "ReportStep", "OK", 0.003);
        for text in [m.render(), m.render_openmetrics()] {
            for family in [
                "ringtrain_step_seconds",
                "ringtrain_step_phase_seconds",
                "ringtrain_ring_wait_seconds",
                "ringtrain_rpc_seconds",
            ] {
                assert!(
                    text.contains(&format!("# TYPE {family} histogram")),
                    "{text}"
                );
                for suffix in ["_bucket{", "_sum", "_count"] {
                    assert!(text.contains(&format!("{family}{suffix}")), "{text}");
                }
            }
            assert!(text.contains("ringtrain_step_seconds_count 1"), "{text}");
            assert!(
                text.contains("ringtrain_step_seconds_bucket{le=\"0.256\"} 1"),
                "{text}"
            );
            for p in Phase::ALL {
                let phase = p.label();
                assert!(
                    text.contains(&format!(
                        "ringtrain_step_phase_seconds_count{{phase=\"{phase}\"}} 1"
                    )),
                    "{text}"
                );
            }
            assert!(
                text.contains(
                    "ringtrain_rpc_seconds_count{service=\"ringtrain.v1.WorkerControl\",method=\"ReportStep\",code=\"OK\"} 1"
                ),
                "{text}"
            );
        }
        assert!(m.render_openmetrics().ends_with("# EOF\n"));
    }

    async fn get(addr: std::net::SocketAddr, head: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::default();
        m.set("ringtrain_workers_alive", "Workers.", &[], 3.0);
        tokio::spawn(serve(listener, m, std::future::pending()));
        let body = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("ringtrain_workers_alive 3"), "{body}");
        assert!(body.contains("ringtrain_step_seconds_bucket"), "{body}");
        let body = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(body.contains("application/openmetrics-text"), "{body}");
        assert!(body.contains("# EOF"), "{body}");
        let body = get(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            body.starts_with("HTTP/1.1 200 OK") && body.ends_with("ok\n"),
            "{body}"
        );
    }
}
