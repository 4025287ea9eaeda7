//! The coordinator's gRPC edge: the client API and the worker API over one
//! [`Coordinator`]. Every handler is parse → lock → call a [`State`] method →
//! unlock → publish its effects (and wait for the store where the answer
//! promises durability). Protocol logic lives in [`crate::state`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::metrics::Metrics;
use ringtrain_common::worker_api::CheckpointReport;
use ringtrain_common::{curve, JobId};
use ringtrain_proto as pb;
use ringtrain_proto::convert::{parse_job, parse_worker, BadField};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::access::{self, Security};
use crate::config::CoordinatorConfig;
use crate::confine::{self, Roots};
use crate::convert;
use crate::models;
use crate::outbox::{Outbox, Sinks};
use crate::scheduler::Timeouts;
use crate::state::{Effects, EventKind, HeartbeatReply, JobEvent, State, StateError, StepVerdict};
use crate::store::{Store, StoreError, StoreWriter};

#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Uploaded models, by content hash.
    blobs: crate::blobs::BlobStore,
    outbox: Mutex<Outbox>,
    sinks: Sinks,
    config: CoordinatorConfig,
    security: Security,
    /// Set at shutdown: open watch streams end with UNAVAILABLE.
    closing: watch::Sender<bool>,
    /// Where submissions may read and write.
    roots: Roots,
    /// Open watch streams by client address.
    watchers: Arc<Mutex<HashMap<String, usize>>>,
}

/// The largest spec a submission may carry.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// The largest message the client API accepts: a spec or a model chunk
/// (both at most 1 MiB), with room for their framing.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = MAX_SPEC_BYTES + (64 << 10);
/// The largest request of the client API other than a submission or an
/// upload: ids, page tokens.
pub const MAX_SMALL_REQUEST_BYTES: usize = 16 << 10;
/// The largest message of the worker API: registrations, heartbeats and
/// reports are small; a failure report carries one error message.
pub const MAX_WORKER_MESSAGE_BYTES: usize = 64 << 10;
/// An uploaded model no job names is kept this long for the submission
/// that uploaded it.
const MODEL_UPLOAD_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
/// A worker's advertised addresses and host name.
const MAX_ADDRESS_BYTES: usize = 256;
/// Jobs per `ListJobs` page: the default and the most.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// RESOURCE_EXHAUSTED for a request of a method larger than it needs.
fn small<T: prost::Message>(request: &Request<T>) -> Result<(), Status> {
    let len = request.get_ref().encoded_len();
    if len > MAX_SMALL_REQUEST_BYTES {
        return Err(Status::resource_exhausted(format!(
            "request of {len} bytes, at most {MAX_SMALL_REQUEST_BYTES} for this method"
        )));
    }
    Ok(())
}

/// Who a watch stream counts against: the client's address.
fn client_key<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "local".into())
}

/// One open watch stream of a client; dropping it frees the slot.
struct WatchSlot {
    watchers: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = lock(&self.watchers);
        if let Some(n) = w.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad_request(e: BadField) -> Status {
    Status::invalid_argument(e.to_string())
}

fn refused(e: StateError) -> Status {
    match e {
        StateError::NoJob(_) => Status::not_found(e.to_string()),
        StateError::NotMember { .. } | StateError::Ended { .. } => {
            Status::failed_precondition(e.to_string())
        }
        StateError::OutsideCheckpointDir { .. } => Status::invalid_argument(e.to_string()),
        StateError::TooManyWorkers(_) => Status::resource_exhausted(e.to_string()),
    }
}

/// A request's message converted to the coordinator's own type.
fn parse<P, T: TryFrom<P, Error = BadField>>(request: Request<P>) -> Result<T, Status> {
    T::try_from(request.into_inner()).map_err(bad_request)
}

impl Coordinator {
    /// A coordinator over `store`, with the jobs it holds: unfinished jobs
    /// wait for their workers to come back and resume.
    pub fn new(
        config: CoordinatorConfig,
        metrics: Metrics,
        store: Store,
    ) -> Result<Self, StoreError> {
        Self::with_security(config, metrics, store, Security::open())
    }

    /// Like [`Coordinator::new`], checking callers as `security` says.
    pub fn with_security(
        config: CoordinatorConfig,
        metrics: Metrics,
        store: Store,
        security: Security,
    ) -> Result<Self, StoreError> {
        let (records, counters) = store.load()?;
        let timeouts = Timeouts {
            worker: config.worker_timeout(),
            suspect: config.suspect_timeout(),
        };
        let mut state = State::recover(Instant::now(), timeouts, records, counters, |dir| {
            curve::read_report(dir)
        });
        state.limits = crate::state::Limits {
            max_workers: config.max_workers,
            forget_lost_workers: std::time::Duration::from_millis(config.forget_lost_workers_ms),
            keep_finished_jobs: config.job_retention.count,
            keep_finished_for: std::time::Duration::from_secs(config.job_retention.max_age_s),
        };
        let store = StoreWriter::start(store).map_err(|e| StoreError::new(&config.data_dir, e))?;
        let roots = Roots {
            data: config
                .resolved_data_roots()
                .map_err(|e| StoreError::new(&config.data_dir, format!("data roots: {e}")))?,
            checkpoints: config
                .resolved_checkpoint_roots()
                .map_err(|e| StoreError::new(&config.data_dir, format!("checkpoint root: {e}")))?,
        };
        tracing::info!(data_roots = ?roots.data, checkpoint_roots = ?roots.checkpoints, "submissions are confined to these directories");
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                blobs: crate::blobs::BlobStore::new(
                    &config.data_dir.join("models"),
                    config.max_model_bytes,
                ),
                outbox: Mutex::new(Outbox::default()),
                sinks: Sinks {
                    metrics,
                    store,
                    reports: Default::default(),
                },
                config,
                security,
                closing: watch::channel(false).0,
                roots,
                watchers: Default::default(),
            }),
        })
    }

    /// Changes the state with `f`, publishes its effects in order once the
    /// state lock is released, and waits until its durable writes are on disk.
    async fn change<T>(
        &self,
        f: impl FnOnce(&mut State, Instant) -> Result<(T, Effects), StateError>,
    ) -> Result<T, Status> {
        let (value, durable) = {
            let mut st = lock(&self.inner.state);
            let (value, fx) = f(&mut st, Instant::now()).map_err(refused)?;
            let mut outbox = lock(&self.inner.outbox);
            drop(st);
            (value, outbox.publish(fx, &self.inner.sinks))
        };
        for written in durable {
            match written.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Status::unavailable(e.to_string())),
                Err(_) => return Err(Status::unavailable("the job store has stopped")),
            }
        }
        Ok(value)
    }

    /// A worker's report: parsed, applied to the state, answered with Empty.
    async fn report<P, R: TryFrom<P, Error = BadField>>(
        &self,
        request: Request<P>,
        apply: impl FnOnce(&mut State, Instant, &R) -> Result<Effects, StateError>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r: R = parse(request)?;
        self.change(|st, now| Ok(((), apply(st, now, &r)?))).await?;
        Ok(Response::new(pb::Empty {}))
    }

    /// Reads the state under its lock.
    fn read<T>(
        &self,
        f: impl FnOnce(&State, Instant) -> Result<T, StateError>,
    ) -> Result<T, Status> {
        f(&lock(&self.inner.state), Instant::now()).map_err(refused)
    }

    /// Runs the scheduler (the periodic tick; requests run it too).
    pub fn tick(&self) {
        let mut st = lock(&self.inner.state);
        let now = Instant::now();
        let mut fx = st.tick(now);
        let forgotten = st.forget_expired(now, SystemTime::now());
        let collect = !forgotten.forgotten.is_empty();
        let in_use = collect.then(|| st.models_in_use());
        fx.persist.extend(forgotten.persist);
        fx.forgotten.extend(forgotten.forgotten);
        let mut outbox = lock(&self.inner.outbox);
        drop(st);
        // Nobody waits on a tick: its durable writes land in order anyway.
        outbox.publish(fx, &self.inner.sinks);
        drop(outbox);
        if let (Some(in_use), Ok(rt)) = (in_use, tokio::runtime::Handle::try_current()) {
            let this = self.clone();
            // Off the runtime: it lists and deletes files.
            rt.spawn_blocking(move || {
                this.inner
                    .blobs
                    .collect_garbage(&in_use, MODEL_UPLOAD_GRACE)
            });
        }
    }

    /// Ends open watch streams (with UNAVAILABLE), so a graceful shutdown
    /// does not wait for the jobs they follow to end.
    pub fn close_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Writes what is still queued for the store and the reports (blocking;
    /// at shutdown).
    pub fn finish_writes(&self) {
        self.inner.sinks.store.finish();
        self.inner.sinks.reports.finish();
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Coordinator {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = self.inner.security.client(&request)?;
        let req = request.into_inner();
        if req.spec_toml.len() > MAX_SPEC_BYTES {
            return Err(Status::resource_exhausted(format!(
                "spec_toml: {} bytes, at most {MAX_SPEC_BYTES}",
                req.spec_toml.len()
            )));
        }
        let mut spec = JobSpec::parse(&req.spec_toml, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cluster_max = self.inner.config.max_workers;
        if spec.max_workers() > cluster_max {
            let key = if spec.max_workers > spec.workers {
                "max_workers"
            } else {
                "workers"
            };
            return Err(Status::invalid_argument(format!(
                "job spec: {key} must be at most this cluster's max_workers ({cluster_max}) (got {})",
                spec.max_workers()
            )));
        }
        let id = JobId::random();
        // Checked before anything reads a path, the dry run included.
        let default_dir = self
            .inner
            .config
            .data_dir
            .join(id.to_string())
            .join("checkpoint");
        let roots = self.inner.roots.clone();
        let (spec, confined) = tokio::task::spawn_blocking(move || {
            confine::submission(&mut spec, &req.resume_from, default_dir, &roots).map(|c| (spec, c))
        })
        .await
        .map_err(|_| Status::unavailable("the path check stopped"))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let worker = self.read(|st, _| Ok(st.dry_run_target()))?;
        models::check_submission(
            &self.inner.blobs,
            &spec,
            worker,
            &self.inner.security.transport,
        )
        .await?;
        let (resume_from, checkpoint_dir) = (confined.resume_from, confined.checkpoint_dir);
        let submitted = SystemTime::now();
        self.change(|st, now| {
            let fx = st.submit(
                now,
                id,
                spec,
                resume_from,
                checkpoint_dir,
                submitted,
                who.name,
            );
            Ok(((), fx))
        })
        .await?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.to_string(),
        }))
    }

    async fn upload_model(
        &self,
        request: Request<tonic::Streaming<pb::FileChunk>>,
    ) -> Result<Response<pb::UploadModelResponse>, Status> {
        self.inner.security.client(&request)?;
        let reply = models::upload(&self.inner.blobs, request.into_inner()).await?;
        Ok(Response::new(reply))
    }

    async fn get_job_metrics(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobMetrics>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        let owner = self.read(|st, _| st.snapshot(id))?.owner;
        access::require_owner(&who, &owner, &id.to_string())?;
        let (mut rows, on_disk) = self.read(|st, _| st.history(id))?;
        // A job that ended before this coordinator started: its metrics.csv.
        if let Some(dir) = on_disk {
            rows = tokio::task::spawn_blocking(move || curve::read_report(Path::new(&dir)))
                .await
                .unwrap_or_default();
        }
        let rows = rows.iter().map(pb::MetricRow::from).collect();
        Ok(Response::new(pb::JobMetrics { rows }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        let job = self.read(|st, _| st.snapshot(id))?;
        access::require_owner(&who, &job.owner, &id.to_string())?;
        Ok(Response::new(convert::job_status(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let req = request.into_inner();
        let size = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(
                parse_job(token)
                    .map_err(|e| Status::invalid_argument(format!("page_token: {}", e.problem)))?,
            ),
        };
        let (page, workers) = self.read(|st, now| {
            let page = st.snapshots_page(after, size)?;
            // Workers are few (bounded by max_workers): on the first page.
            let workers = after.is_none().then(|| st.worker_views(now));
            Ok((page, workers))
        })?;
        let jobs = page
            .jobs
            .iter()
            .map(|j| {
                let status = convert::job_status(j);
                if who.owns(&j.owner) {
                    status
                } else {
                    access::redact(status)
                }
            })
            .collect();
        // Which worker trains which job, and how fast, is for admins.
        let workers = match workers {
            Some(workers) if who.is_admin() => workers.iter().map(convert::worker_status).collect(),
            _ => Vec::new(),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            workers,
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        // A job's owner never changes: checked before the change, it holds.
        let owner = self.read(|st, _| st.snapshot(id))?.owner;
        access::require_owner(&who, &owner, &id.to_string())?;
        let job = self.change(|st, now| st.cancel(now, id)).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(convert::job_status(&job)),
        }))
    }

    type WatchJobStream = crate::watch::EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let key = client_key(&request);
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        let slot = {
            let most = self.inner.config.max_watch_streams_per_client;
            let mut w = lock(&self.inner.watchers);
            let open = w.entry(key.clone()).or_insert(0);
            if *open >= most {
                return Err(Status::resource_exhausted(format!(
                    "{most} watch streams are open from this client already (max_watch_streams_per_client)"
                )));
            }
            *open += 1;
            WatchSlot {
                watchers: self.inner.watchers.clone(),
                key,
            }
        };
        let (first, rx) = {
            let st = lock(&self.inner.state);
            let job = st.snapshot(id).map_err(refused)?;
            access::require_owner(&who, &job.owner, &id.to_string())?;
            // Subscribed while the state is locked: no event is missed or
            // seen twice around the snapshot (see `outbox`).
            let rx = (!job.state.is_terminal()).then(|| lock(&self.inner.outbox).subscribe(id));
            let first = JobEvent {
                kind: EventKind::Snapshot,
                message: String::new(),
                job,
            };
            (first, rx)
        };
        let this = self.clone();
        let snapshot = move || lock(&this.inner.state).snapshot(id).ok();
        let closing = self.inner.closing.subscribe();
        let stream = crate::watch::events(first, rx, closing, snapshot);
        // The slot is held for as long as the stream is.
        let stream = futures::StreamExt::map(stream, move |event| {
            let _held = &slot;
            event
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::worker_control_server::WorkerControl for Coordinator {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.inner.security.worker(&request)?;
        let registration = ringtrain_common::worker_api::Registration::from(request.into_inner());
        if registration.grpc_addr.is_empty() || registration.ring_addr.is_empty() {
            return Err(Status::invalid_argument(
                "a worker must advertise grpc_addr and ring_addr",
            ));
        }
        for (field, value) in [
            ("grpc_addr", &registration.grpc_addr),
            ("ring_addr", &registration.ring_addr),
            ("hostname", &registration.hostname),
        ] {
            if value.len() > MAX_ADDRESS_BYTES {
                return Err(Status::invalid_argument(format!(
                    "{field}: '{}' is longer than {MAX_ADDRESS_BYTES} bytes",
                    ringtrain_common::quote(value)
                )));
            }
        }
        let id = self
            .change(|st, now| st.register_worker(now, registration))
            .await?;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: self.inner.config.heartbeat_interval_ms as u32,
        }))
    }

    type FetchModelStream = models::ChunkStream;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        self.inner.security.worker(&request)?;
        let model = request.into_inner().model;
        Ok(Response::new(
            models::fetch(&self.inner.blobs, &model).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.inner.security.worker(&request)?;
        let worker = parse_worker(&request.into_inner().worker_id).map_err(bad_request)?;
        let reply = self.change(|st, now| Ok(st.heartbeat(now, worker))).await?;
        Ok(Response::new(match reply {
            HeartbeatReply::Assignment(a) => pb::HeartbeatResponse {
                assignment: a.as_deref().map(pb::Assignment::from),
                unknown_worker: false,
            },
            HeartbeatReply::Unknown => pb::HeartbeatResponse {
                assignment: None,
                unknown_worker: true,
            },
        }))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.inner.security.worker(&request)?;
        let r = parse(request)?;
        let verdict = self.change(|st, now| st.report_step(now, &r)).await?;
        Ok(Response::new(pb::StepReply {
            continue_job: verdict == StepVerdict::Continue,
        }))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        self.report(request, State::report_eval).await
    }

    async fn report_checkpoint(
        &self,
        request: Request<pb::CheckpointReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        let mut r: CheckpointReport = parse(request)?;
        // Fenced first: a non-member learns nothing about the file system.
        self.read(|st, _| st.check_member(r.job, r.worker, r.generation))?;
        // The coordinator writes the job's report into this directory: it
        // must resolve (symlinks followed) inside the checkpoint roots.
        let roots = self.inner.roots.checkpoints.clone();
        let dir = r.dir.to_string_lossy().into_owned();
        r.dir = tokio::task::spawn_blocking(move || {
            ringtrain_common::paths::confine("dir", &dir, &roots)
        })
        .await
        .map_err(|_| Status::unavailable("the path check stopped"))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.change(|st, now| Ok(((), st.report_checkpoint(now, &r)?)))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_finish(
        &self,
        request: Request<pb::FinishReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        self.report(request, State::report_finish).await
    }

    async fn report_ring_failure(
        &self,
        request: Request<pb::RingFailureReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        self.report(request, State::report_ring_failure).await
    }
}
