//! Prometheus text exposition on a plain HTTP port, without a framework.
//!
//! Counters and gauges live in one registry; `serve` answers `GET /metrics`
//! (text format 0.0.4) and `GET /healthz` on an already-bound listener.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

struct Family {
    kind: Kind,
    help: &'static str,
    /// Rendered label set (`{a="b"}` or empty) -> value.
    values: BTreeMap<String, f64>,
}

/// A registry of metric families. Cheap to clone; share one per process.
#[derive(Clone, Default)]
pub struct Metrics {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    fn with(
        &self,
        name: &'static str,
        kind: Kind,
        help: &'static str,
        f: impl FnOnce(&mut Family),
    ) {
        let mut fams = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let fam = fams.entry(name).or_insert_with(|| Family {
            kind,
            help,
            values: BTreeMap::new(),
        });
        f(fam);
    }

    /// Adds to a counter (names end in `_total` by convention).
    pub fn inc(&self, name: &'static str, help: &'static str, lbl: &[(&str, &str)], by: f64) {
        self.with(name, Kind::Counter, help, |f| {
            *f.values.entry(labels(lbl)).or_default() += by;
        });
    }

    pub fn set(&self, name: &'static str, help: &'static str, lbl: &[(&str, &str)], value: f64) {
        self.with(name, Kind::Gauge, help, |f| {
            f.values.insert(labels(lbl), value);
        });
    }

    /// Drops every series of a gauge family (before re-setting a changing label set).
    pub fn clear(&self, name: &'static str) {
        let mut fams = self.families.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fams.get_mut(name) {
            f.values.clear();
        }
    }

    pub fn render(&self) -> String {
        let fams = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, fam) in fams.iter() {
            let kind = match fam.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", fam.help);
            for (lbl, v) in &fam.values {
                let _ = writeln!(out, "{name}{lbl} {v}");
            }
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    // Read until the end of the request head (clients may send it in pieces).
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 1024];
                    let head = async {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                            let n = stream.read(&mut chunk).await?;
                            if n == 0 {
                                break;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        Ok::<_, std::io::Error>(())
                    };
                    if !matches!(tokio::time::timeout(std::time::Duration::from_secs(5), head).await, Ok(Ok(()))) {
                        return;
                    }
                    let n = buf.len();
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let path = req.split_whitespace().nth(1).unwrap_or("/");
                    let (status, ctype, body) = match path {
                        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            text.contains("ringtrain_steps_total{job=\"a\"} 3"),
            "{text}"
        );
        assert!(text.contains("ringtrain_loss 0.5"), "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::default();
        m.set("ringtrain_workers_alive", "Workers.", &[], 3.0);
        tokio::spawn(serve(listener, m, std::future::pending()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("ringtrain_workers_alive 3"), "{body}");
    }
}
