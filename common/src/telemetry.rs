//! Tracing setup shared by every role of the `ringtrain` binary.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event.
    #[default]
    Text,
    /// One JSON object per event, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format '{other}' (expected text or json)"
            )),
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
/// Calling it twice is harmless (the second call is ignored).
pub fn init(format: LogFormat, default_filter: &str) {
    install(format, default_filter, None);
}

/// Installs the global subscriber as [`init`] does and, when `otlp` names an
/// endpoint, exports spans there as well (OTLP over gRPC, batched on a
/// thread of the exporter's own, off the hot path). Must run inside a Tokio
/// runtime (the gRPC channel's tasks live there). An exporter that cannot be
/// built is one warning, never an error: the role runs on without it.
/// Keep the returned [`Telemetry`] and call [`Telemetry::shutdown`] at the
/// end, which flushes the spans not sent yet.
pub fn init_with_otlp(format: LogFormat, default_filter: &str, otlp: &OtlpConfig) -> Telemetry {
    let endpoint = otlp.endpoint.trim();
    if endpoint.is_empty() {
        install(format, default_filter, None);
        return Telemetry { provider: None };
    }
    match otlp_provider(endpoint, otlp) {
        Ok(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            let tracer = provider.tracer("ringtrain");
            install(format, default_filter, Some(tracer));
            tracing::info!(
                endpoint,
                service = otlp.service,
                "exporting spans over OTLP"
            );
            Telemetry {
                provider: Some(provider),
            }
        }
        Err(e) => {
            install(format, default_filter, None);
            tracing::warn!(endpoint, error = %e, "OTLP exporter not started: spans are not exported");
            Telemetry { provider: None }
        }
    }
}

/// Where and as what a role exports its spans.
#[derive(Clone, Debug, Default)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC URL, e.g. `http://127.0.0.1:4317`; empty:
    /// no exporter at all.
    pub endpoint: String,
    /// The `service.name` resource: `ringtrain-coordinator` or `ringtrain-worker`.
    pub service: &'static str,
}

impl OtlpConfig {
    /// `configured` (the role's `otlp_endpoint`) or, when that is empty,
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn new(configured: &str, service: &'static str) -> Self {
        let endpoint = if configured.trim().is_empty() {
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
        } else {
            configured.to_string()
        };
        Self { endpoint, service }
    }
}

/// The span exporter of a role, when it has one.
#[must_use = "spans are flushed by Telemetry::shutdown"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans not sent yet and stops the exporter. Blocks (at
    /// most the exporter's timeout): call it outside async code, with the
    /// runtime the exporter was made in still running.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "OTLP exporter: spans may be lost at shutdown");
            }
        }
    }
}

fn otlp_provider(
    endpoint: &str,
    otlp: &OtlpConfig,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .map_err(|e| format!("'{}' is not a URL: {e}", crate::quote(endpoint)))?;
    if uri.scheme().is_none() || uri.host().is_none() {
        return Err(format!(
            "'{}' is not a URL like http://collector:4317",
            crate::quote(endpoint)
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(otlp.service)
        .with_attribute(opentelemetry::KeyValue::new(
            "process.pid",
            i64::from(std::process::id()),
        ))
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

fn install(
    format: LogFormat,
    default_filter: &str,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colour only for people at a terminal: not in files, pipes or `docker logs`.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    // The exporter's own stack (tonic, hyper, h2) is never exported: with
    // RUST_LOG=debug each batch would otherwise make spans for the next.
    // (Targets match by prefix: "hyper" is hyper_util too.)
    use tracing_subscriber::filter::LevelFilter;
    let own = ["h2", "hyper", "tonic", "tower", "opentelemetry"]
        .into_iter()
        .fold(
            tracing_subscriber::filter::Targets::new().with_default(LevelFilter::TRACE),
            |t, target| t.with_target(target, LevelFilter::OFF),
        );
    let otel = tracer.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t)
            .with_filter(own)
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.compact().boxed(),
        LogFormat::Json => fmt.json().with_current_span(true).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .with(filter)
        .try_init();
}

/// The OpenTelemetry parent of step `step` of generation `generation` of
/// job `job`: a remote span context whose trace id is a hash of the three,
/// so every member of the ring puts its `step` span in the same trace
/// without a message more. Set it with [`set_step_parent`].
pub fn step_parent(job: &str, generation: u64, step: u64) -> opentelemetry::trace::SpanContext {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let mut h = blake3::Hasher::new_derive_key("ringtrain step trace v1");
    h.update(job.as_bytes());
    h.update(&generation.to_le_bytes());
    h.update(&step.to_le_bytes());
    let digest = h.finalize();
    let bytes = digest.as_bytes();
    let mut trace = [0u8; 16];
    trace.copy_from_slice(&bytes[..16]);
    let mut span = [0u8; 8];
    span.copy_from_slice(&bytes[16..24]);
    // All-zero ids are invalid; a hash makes them as likely as never.
    trace[0] |= u8::from(trace == [0; 16]);
    span[0] |= u8::from(span == [0; 8]);
    SpanContext::new(
        TraceId::from_bytes(trace),
        SpanId::from_bytes(span),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// Makes `span` (just created, not entered yet) a child of
/// [`step_parent`]`(job, generation, step)` in OpenTelemetry. Nothing when
/// spans are not exported.
pub fn set_step_parent(span: &tracing::Span, job: &str, generation: u64, step: u64) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx =
        opentelemetry::Context::new().with_remote_span_context(step_parent(job, generation, step));
    // Without the OpenTelemetry layer (no exporter) or with the span
    // filtered out there is nothing to set.
    let _ = span.set_parent(cx);
}

/// Reports panics through tracing, one line each (thread, place, the
/// message's first line), in place of the default report on stderr: a panic
/// then reads as one error in the process's log format, and input from
/// outside never fills a log with a backtrace. With `RUST_BACKTRACE` set
/// (a developer asking for it) the default report follows.
pub fn log_panics() {
    let default_report = std::panic::take_hook();
    let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            at,
            "panic: {}",
            panic_message(info.payload())
        );
        if backtrace {
            default_report(info);
        }
    }));
}

/// The first non-empty line of a panic payload's message, at most 300
/// characters.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("panicked");
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("panicked");
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{panic_message, step_parent};

    #[test]
    fn a_step_trace_is_the_same_for_its_job_generation_and_step_only() {
        let a = step_parent("job-1", 3, 7);
        assert_eq!(a, step_parent("job-1", 3, 7));
        assert!(a.is_valid() && a.is_remote() && a.is_sampled());
        for other in [
            step_parent("job-2", 3, 7),
            step_parent("job-1", 4, 7),
            step_parent("job-1", 3, 8),
        ] {
            assert_ne!(a.trace_id(), other.trace_id());
        }
    }

    #[test]
    fn a_panic_message_is_its_first_line_cut_short() {
        let payload: Box<dyn std::any::Any + Send> = Box::new(String::from("\n  first\nsecond"));
        assert_eq!(panic_message(payload.as_ref()), "first");
        let payload: Box<dyn std::any::Any + Send> = Box::new("static text");
        assert_eq!(panic_message(payload.as_ref()), "static text");
        let payload: Box<dyn std::any::Any + Send> = Box::new(42u8);
        assert_eq!(panic_message(payload.as_ref()), "panicked");
        let payload: Box<dyn std::any::Any + Send> = Box::new("é".repeat(1000));
        let cut = panic_message(payload.as_ref());
        assert_eq!(cut.chars().count(), 301, "300 characters and an ellipsis");
        assert!(cut.ends_with('…'));
    }
}
