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

mod client_api;
mod worker_api;

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
                    tensorboard: Default::default(),
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

    /// Writes what is still queued for the store, the reports and the
    /// TensorBoard files (blocking; at shutdown).
    pub fn finish_writes(&self) {
        self.inner.sinks.store.finish();
        self.inner.sinks.reports.finish();
        self.inner.sinks.tensorboard.finish();
    }
}
