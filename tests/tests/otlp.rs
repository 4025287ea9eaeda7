//! OpenTelemetry: with `otlp_endpoint` set (here through
//! `RINGTRAIN_OTLP_ENDPOINT`), the coordinator and the workers export their
//! spans over OTLP/gRPC. An OTLP trace receiver in this test collects them,
//! and they are checked by content: every step of the job has a `step` span
//! from each worker, the two in one trace, with the job's attributes, and
//! the phases (data, forward/backward, all-reduce, optimizer) as its
//! children; the coordinator's spans come as `ringtrain-coordinator`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use ringtrain_tests::{mlp_spec, skip_without_data, wait_for, Cluster};
use tonic::{Request, Response, Status};

/// One span as the receiver got it.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attributes
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("span {} has no attribute {key}: {self:?}", self.name))
    }
}

/// An OTLP/gRPC trace collector that keeps every span.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| text(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for s in scope.spans {
                    got.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace: s.trace_id,
                        id: s.span_id,
                        parent: s.parent_span_id,
                        attributes: text(&s.attributes),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(got);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const STEPS: u64 = 3;
const PHASES: [&str; 3] = ["forward_backward", "allreduce", "optimizer"];

#[test]
fn spans_reach_an_otlp_collector_and_a_step_is_one_trace_across_workers() {
    if skip_without_data() {
        return;
    }
    // The receiver's port goes into the environment the cluster's processes
    // inherit (this binary holds this one test).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    std::env::set_var(
        "RINGTRAIN_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("OTLP receiver");
    });

    let cluster = Cluster::start(2);
    let steps = format!("max_steps={STEPS}");
    let v = cluster.submit_and_watch(&mlp_spec(), &[&steps]);
    assert_eq!(v["state"], "succeeded", "{v}");
    let job = v["job"].as_str().expect("job").to_string();

    // The batches come within the exporters' delay (5 s).
    let worker_steps = |spans: &[Span]| -> BTreeMap<u64, Vec<Span>> {
        let mut by_step: BTreeMap<u64, Vec<Span>> = BTreeMap::new();
        for s in spans
            .iter()
            .filter(|s| s.name == "step" && s.service == "ringtrain-worker")
        {
            by_step
                .entry(s.attr("step").parse().expect("step attribute"))
                .or_default()
                .push(s.clone());
        }
        by_step
    };
    let spans = wait_for(
        "every step's spans from both workers",
        Duration::from_secs(60),
        || {
            let spans = receiver.spans();
            let by_step = worker_steps(&spans);
            let complete = (1..=STEPS).all(|step| {
                by_step.get(&step).is_some_and(|s| s.len() == 2)
                    && spans
                        .iter()
                        .filter(|s| PHASES.contains(&s.name.as_str()) || s.name == "data")
                        .count()
                        >= 2 * 4 * STEPS as usize
            });
            let coordinator = spans.iter().any(|s| {
                s.service == "ringtrain-coordinator"
                    && s.name == "submit_job"
                    && s.attributes.get("job") == Some(&job)
            });
            (complete && coordinator).then_some(spans)
        },
    );
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for s in &spans {
        *seen
            .entry((s.service.as_str(), s.name.as_str()))
            .or_default() += 1;
    }
    eprintln!("spans received, by (service, name): {seen:?}");
    let by_step = worker_steps(&spans);
    let mut workers = BTreeSet::new();
    let mut traces = BTreeSet::new();
    for step in 1..=STEPS {
        let pair = &by_step[&step];
        assert_eq!(pair.len(), 2, "step {step}: one span per worker: {pair:?}");
        let (a, b) = (&pair[0], &pair[1]);
        assert_eq!(a.trace.len(), 16, "{a:?}");
        assert_eq!(
            a.trace, b.trace,
            "step {step}: both workers' spans in one trace"
        );
        assert_eq!(a.parent, b.parent, "step {step}: one (remote) parent");
        assert!(
            traces.insert(a.trace.clone()),
            "step {step}: a trace of its own"
        );
        assert_ne!(a.attr("worker"), b.attr("worker"), "two workers");
        assert_ne!(a.attr("rank"), b.attr("rank"), "two ranks");
        for s in pair {
            assert_eq!(s.attr("job"), job);
            assert_eq!(s.attr("generation"), a.attr("generation"));
            workers.insert(s.attr("worker").to_string());
            // The phases: children of this step span, in its trace.
            let children: Vec<&Span> = spans.iter().filter(|c| c.parent == s.id).collect();
            for phase in PHASES {
                assert!(
                    children
                        .iter()
                        .any(|c| c.name == phase && c.trace == s.trace && c.service == s.service),
                    "step {step} of worker {}: no {phase} child in {children:?}",
                    s.attr("worker")
                );
            }
            let fb = children
                .iter()
                .find(|c| c.name == "forward_backward")
                .expect("forward_backward");
            assert!(
                spans
                    .iter()
                    .any(|d| d.name == "data" && d.parent == fb.id && d.trace == s.trace),
                "step {step}: the data span is a child of forward_backward"
            );
        }
    }
    assert_eq!(workers.len(), 2, "step spans of two workers: {workers:?}");
    let coordinator: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "ringtrain-coordinator")
        .collect();
    assert!(
        coordinator.iter().any(|s| s.name == "register_worker"),
        "the coordinator's registrations: {coordinator:?}"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.service != "ringtrain-coordinator")
            .all(|s| s.service == "ringtrain-worker"),
        "every span names its service"
    );
    drop(cluster);
    rt.shutdown_timeout(Duration::from_secs(1));
}
