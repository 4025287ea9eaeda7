//! The gRPC edge of the coordinator: both services share one [`Coordinator`],
//! which owns the [`State`] behind one mutex. Handlers lock, change state,
//! apply the scheduler's decisions, and unlock before any `.await`.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::metrics::Metrics;
use ringtrain_common::{JobId, RingGeneration, WorkerId};
use ringtrain_proto as pb;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::CoordinatorConfig;
use crate::scheduler::{decide, Decision, Timeouts};
use crate::state::{Drain, Job, JobEvent, JobSnapshot, JobState, State, VersionTally, Worker};
use crate::store::{Counters, JobRecord, Store};

#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    config: CoordinatorConfig,
    metrics: Metrics,
    store: Store,
    /// Writes jobs' metrics.csv and metrics.png; drained before the process exits.
    reports: crate::report::ReportWriter,
}

fn parse_job(id: &str) -> Result<JobId, Status> {
    id.parse().map_err(Status::invalid_argument)
}

fn parse_worker(id: &str) -> Result<WorkerId, Status> {
    id.trim_start_matches('w')
        .parse()
        .map(WorkerId)
        .map_err(|_| Status::invalid_argument(format!("'{id}' is not a worker id")))
}

fn not_found(id: JobId) -> Status {
    Status::not_found(format!("no job {id}"))
}

/// The title of a job's metrics.png.
fn report_title(job: &Job) -> String {
    format!("{} ({}, job {})", job.spec.name, job.spec.model, job.id)
}

impl Coordinator {
    /// A coordinator over `store`, with the jobs it holds: unfinished jobs
    /// wait for workers to come back and resume.
    pub fn new(
        config: CoordinatorConfig,
        metrics: Metrics,
        store: Store,
    ) -> Result<Self, crate::store::StoreError> {
        let (records, counters) = store.load()?;
        let mut st = State {
            next_generation: counters.next_generation,
            next_worker: counters.next_worker,
            ..State::default()
        };
        let regroup = Instant::now() + config.worker_timeout() * 2;
        for r in records {
            let Some(mut job) = job_from_record(&r, regroup) else {
                warn!(
                    job = r.id,
                    "skipping a stored job whose spec no longer parses"
                );
                continue;
            };
            if !job.state.is_terminal() {
                info!(job = %job.id, state = ?job.state, step = job.step, "recovered job");
                // The curve up to the last checkpoint (finished jobs' curves
                // are read on demand, see `get_job_metrics`).
                job.history = crate::report::read_report(Path::new(&job.checkpoint_dir));
            }
            st.queue.push(job.id);
            st.jobs.insert(job.id, job);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(st),
                config,
                metrics,
                store,
                reports: crate::report::ReportWriter::default(),
            }),
        })
    }

    /// Persists a job; failures are logged, not fatal (the job goes on).
    fn persist(&self, st: &State, id: JobId, durable: bool) {
        let Some(job) = st.jobs.get(&id) else { return };
        let counters = Counters {
            next_generation: st.next_generation,
            next_worker: st.next_worker,
        };
        if let Err(e) = self.inner.store.put(&job_record(job), counters, durable) {
            warn!(error = %e, "could not persist job");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the scheduler and applies its decisions. Called on every
    /// heartbeat, registration and submission, and on a periodic tick.
    pub fn tick(&self) {
        let mut st = self.lock();
        self.schedule(&mut st, Instant::now());
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            worker: self.inner.config.worker_timeout(),
            suspect: self.inner.config.suspect_timeout(),
        }
    }

    fn schedule(&self, st: &mut State, now: Instant) {
        for decision in decide(now, st, self.timeouts()) {
            match decision {
                Decision::WorkerLost { worker } => self.worker_lost(st, worker),
                Decision::Start { job, members } => self.form_ring(st, job, members, "running"),
                Decision::Reform { job, members } => {
                    self.form_ring(st, job, members, "ring re-formed")
                }
                Decision::Pause { job, survivors } => self.pause(st, job, survivors),
                Decision::Drain { job, joiners } => self.drain(st, job, joiners),
            }
        }
        self.update_gauges(st);
    }

    fn worker_lost(&self, st: &mut State, id: WorkerId) {
        let Some(w) = st.workers.get_mut(&id) else {
            return;
        };
        w.alive = false;
        w.job = None;
        warn!(worker = %id, addr = %w.grpc_addr, "worker lost: silent past its timeout");
    }

    /// Makes `members` the job's ring, as a new generation.
    fn form_ring(&self, st: &mut State, id: JobId, members: Vec<WorkerId>, why: &str) {
        st.next_generation += 1;
        let generation = RingGeneration(st.next_generation);
        let Some(job) = st.jobs.get_mut(&id) else {
            return;
        };
        let old: Vec<WorkerId> = job
            .members
            .iter()
            .chain(job.drain.iter().flat_map(|d| d.joiners.iter()))
            .copied()
            .collect();
        job.state = JobState::Running;
        job.generation = generation;
        job.members = members.clone();
        job.suspects.clear();
        job.ring_failed = false;
        job.drain = None;
        job.regroup_until = None;
        job.tallies.clear();
        let world = members.len();
        let global = job.spec.global_batch(world);
        let names: Vec<String> = members.iter().map(|w| w.to_string()).collect();
        if why == "running" {
            info!(job = %id, %generation, workers = %names.join(","), global_batch = global, "job running");
        } else {
            warn!(job = %id, %generation, workers = %names.join(","), global_batch = global, step = job.step, "ring re-formed");
        }
        job.emit(
            if why == "running" { "state" } else { "workers" },
            format!("{why}: {world} workers ({generation}), global batch {global}"),
        );
        for w in old {
            if let Some(w) = st.workers.get_mut(&w) {
                if w.job == Some(id) && !members.contains(&w.id) {
                    w.job = None;
                }
            }
        }
        for w in &members {
            if let Some(w) = st.workers.get_mut(w) {
                w.job = Some(id);
            }
        }
        self.persist(st, id, true);
    }

    fn pause(&self, st: &mut State, id: JobId, survivors: Vec<WorkerId>) {
        let Some(job) = st.jobs.get_mut(&id) else {
            return;
        };
        let min = job.spec.min_workers();
        job.state = JobState::Waiting;
        job.members = survivors;
        job.suspects.clear();
        job.ring_failed = false;
        warn!(job = %id, alive = job.members.len(), min_workers = min, "job waiting for workers");
        job.emit(
            "state",
            format!("waiting: {} live workers, {min} needed", job.members.len()),
        );
        self.persist(st, id, true);
    }

    fn drain(&self, st: &mut State, id: JobId, joiners: Vec<WorkerId>) {
        let Some(job) = st.jobs.get_mut(&id) else {
            return;
        };
        let at_version = job.max_reported.max(job.step) + 1;
        info!(job = %id, joiners = joiners.len(), at_version, "workers joining at the next step boundary");
        job.drain = Some(Drain {
            at_version,
            joiners: joiners.clone(),
            stopped: Default::default(),
        });
        for w in joiners {
            if let Some(w) = st.workers.get_mut(&w) {
                w.job = Some(id);
            }
        }
    }

    /// Moves a job to a terminal state and frees its workers.
    fn end_job(&self, st: &mut State, id: JobId, state: JobState, error: String) {
        let Some(job) = st.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        job.state = state;
        job.error = error;
        let mut members = std::mem::take(&mut job.members);
        members.extend(job.drain.take().map(|d| d.joiners).unwrap_or_default());
        match state {
            JobState::Failed => warn!(job = %id, error = %job.error, "job failed"),
            _ => info!(job = %id, state = ?state, step = job.step, "job ended"),
        }
        let msg = if job.error.is_empty() {
            format!("{state:?}").to_lowercase()
        } else {
            job.error.clone()
        };
        job.emit("state", msg);
        self.write_report_later(job);
        for w in members {
            if let Some(w) = st.workers.get_mut(&w) {
                if w.job == Some(id) {
                    w.job = None;
                }
            }
        }
        self.persist(st, id, true);
    }

    /// Writes the job's metrics.csv and metrics.png next to its checkpoints, on
    /// the report writer's thread (not under the state lock, not on the async
    /// runtime); a failure is logged, never fatal.
    fn write_report_later(&self, job: &Job) {
        if job.history.is_empty() || job.checkpoint_dir.is_empty() {
            return;
        }
        self.inner.reports.submit(
            PathBuf::from(&job.checkpoint_dir),
            report_title(job),
            job.history.clone(),
        );
    }

    /// Writes the reports still queued (blocking; at shutdown).
    pub fn finish_reports(&self) {
        self.inner.reports.finish();
    }

    fn update_gauges(&self, st: &State) {
        let m = &self.inner.metrics;
        let alive = st.workers.values().filter(|w| w.alive).count();
        m.set(
            "ringtrain_workers_alive",
            "Workers heartbeating.",
            &[],
            alive as f64,
        );
        for (state, name) in [
            (JobState::Pending, "pending"),
            (JobState::Running, "running"),
            (JobState::Waiting, "waiting"),
            (JobState::Succeeded, "succeeded"),
            (JobState::Failed, "failed"),
            (JobState::Cancelled, "cancelled"),
        ] {
            let n = st.jobs.values().filter(|j| j.state == state).count();
            m.set(
                "ringtrain_jobs",
                "Jobs by state.",
                &[("state", name)],
                n as f64,
            );
        }
    }

    fn assignment(&self, st: &State, worker: WorkerId) -> Option<pb::Assignment> {
        let job_id = st.workers.get(&worker)?.job?;
        let job = st.jobs.get(&job_id)?;
        if job.state != JobState::Running {
            return None;
        }
        let rank = job.members.iter().position(|w| *w == worker)?;
        let grpc = job.spec.ring.transport == "grpc";
        let members = job
            .members
            .iter()
            .map(|w| {
                st.workers
                    .get(w)
                    .map(|w| {
                        if grpc {
                            w.grpc_addr.clone()
                        } else {
                            w.ring_addr.clone()
                        }
                    })
                    .unwrap_or_default()
            })
            .collect();
        Some(pb::Assignment {
            job_id: job.id.to_string(),
            ring_generation: job.generation.0,
            rank: rank as u32,
            members,
            spec_toml: job.spec_toml.clone(),
            resume_from: job.resume_source(),
            checkpoint_dir: job.checkpoint_dir.clone(),
            transport: job.spec.ring.transport.clone(),
        })
    }

    /// The job and the member's rank, if `worker` is a member of the running
    /// job's current ring generation.
    fn member(
        st: &mut State,
        job: JobId,
        worker: WorkerId,
        generation: u64,
    ) -> Result<&mut Job, Status> {
        let job = st.jobs.get_mut(&job).ok_or_else(|| not_found(job))?;
        if job.state != JobState::Running
            || job.generation.0 != generation
            || !job.members.contains(&worker)
        {
            return Err(Status::failed_precondition(format!(
                "worker {worker} is not in {} of job {}",
                RingGeneration(generation),
                job.id
            )));
        }
        Ok(job)
    }
}

fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Waiting => pb::JobState::Waiting,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn snapshot_to_pb(s: &JobSnapshot) -> pb::JobStatus {
    pb::JobStatus {
        job_id: s.id.to_string(),
        name: s.name.clone(),
        state: state_to_pb(s.state) as i32,
        error: s.error.clone(),
        step: s.step,
        total_steps: s.total_steps,
        epoch: s.epoch,
        workers: s.workers,
        workers_wanted: s.workers_wanted,
        loss: s.loss,
        samples_per_s: s.samples_per_s,
        has_eval: s.eval.is_some(),
        test_accuracy: s.eval.map(|e| e.0).unwrap_or(0.0),
        test_loss: s.eval.map(|e| e.1).unwrap_or(0.0),
        checkpoint_dir: s.checkpoint_dir.clone(),
        ring_generation: s.generation.0,
        model: s.model.clone(),
        submitted_unix_s: s
            .submitted
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    }
}

fn event_to_pb(e: &JobEvent) -> pb::JobEvent {
    pb::JobEvent {
        status: Some(snapshot_to_pb(&e.job)),
        kind: e.kind.to_string(),
        message: e.message.clone(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Coordinator {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let spec = JobSpec::parse(&req.spec_toml, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = JobId::random();
        let checkpoint_dir = if spec.checkpoint.dir.is_empty() {
            self.inner
                .config
                .data_dir
                .join(id.to_string())
                .join("checkpoint")
                .to_string_lossy()
                .into_owned()
        } else {
            spec.checkpoint.dir.clone()
        };
        let job = Job::new(id, spec, req.resume_from, checkpoint_dir, SystemTime::now());
        info!(job = %id, name = %job.spec.name, model = %job.spec.model, workers = job.spec.workers, "job submitted");
        let mut st = self.lock();
        st.jobs.insert(id, job);
        st.queue.push(id);
        self.persist(&st, id, true);
        self.schedule(&mut st, Instant::now());
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.to_string(),
        }))
    }

    async fn get_job_metrics(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobMetrics>, Status> {
        let id = parse_job(&request.into_inner().job_id)?;
        let (mut history, ended_in) = {
            let st = self.lock();
            let job = st.jobs.get(&id).ok_or_else(|| not_found(id))?;
            (
                job.history.clone(),
                job.state.is_terminal().then(|| job.checkpoint_dir.clone()),
            )
        };
        // A job that ended before this coordinator started: its metrics.csv.
        if let Some(dir) = ended_in.filter(|d| history.is_empty() && !d.is_empty()) {
            history =
                tokio::task::spawn_blocking(move || crate::report::read_report(Path::new(&dir)))
                    .await
                    .unwrap_or_default();
        }
        let rows = history
            .iter()
            .map(|r| pb::MetricRow {
                step: r.step,
                epoch: r.epoch,
                loss: r.loss,
                samples_per_s: r.samples_per_s,
                workers: r.workers,
                has_eval: r.eval.is_some(),
                test_accuracy: r.eval.map(|e| e.0).unwrap_or(0.0),
                test_loss: r.eval.map(|e| e.1).unwrap_or(0.0),
            })
            .collect();
        Ok(Response::new(pb::JobMetrics { rows }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = parse_job(&request.into_inner().job_id)?;
        let st = self.lock();
        let job = st.jobs.get(&id).ok_or_else(|| not_found(id))?;
        Ok(Response::new(snapshot_to_pb(&job.snapshot())))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let st = self.lock();
        let now = Instant::now();
        let jobs = st
            .queue
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .map(|j| snapshot_to_pb(&j.snapshot()))
            .collect();
        let workers = st
            .workers
            .values()
            .map(|w| {
                let rank = w
                    .job
                    .and_then(|j| st.jobs.get(&j))
                    .and_then(|j| j.members.iter().position(|m| *m == w.id))
                    .map(|r| r as i32)
                    .unwrap_or(-1);
                pb::WorkerStatus {
                    worker_id: w.id.to_string(),
                    address: w.grpc_addr.clone(),
                    job_id: w.job.map(|j| j.to_string()).unwrap_or_default(),
                    rank,
                    last_step: w.last_step,
                    samples_per_s: w.samples_per_s,
                    last_heartbeat_age_s: now
                        .saturating_duration_since(w.last_heartbeat)
                        .as_secs_f64(),
                    alive: w.alive,
                }
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs, workers }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = parse_job(&request.into_inner().job_id)?;
        let mut st = self.lock();
        let state = st.jobs.get(&id).ok_or_else(|| not_found(id))?.state;
        if state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job {id} already ended ({})",
                format!("{state:?}").to_lowercase()
            )));
        }
        self.end_job(&mut st, id, JobState::Cancelled, String::new());
        self.schedule(&mut st, Instant::now());
        let job = st.jobs.get(&id).map(|j| snapshot_to_pb(&j.snapshot()));
        Ok(Response::new(pb::CancelJobResponse { job }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = parse_job(&request.into_inner().job_id)?;
        let (first, rx) = {
            let st = self.lock();
            let job = st.jobs.get(&id).ok_or_else(|| not_found(id))?;
            let first = JobEvent {
                kind: "snapshot",
                message: String::new(),
                job: job.snapshot(),
            };
            (first, job.events.subscribe())
        };
        let this = self.clone();
        let done = first.job.state.is_terminal();
        // Ends after the event that puts the job in a terminal state.
        let stream =
            futures::stream::unfold((Some(first), rx, done), move |(pending, mut rx, done)| {
                let this = this.clone();
                async move {
                    let event = match pending {
                        Some(e) => e,
                        None if done => return None,
                        None => match rx.recv().await {
                            Ok(e) => e,
                            // A slow watcher skips events but still sees the latest status.
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let st = this.lock();
                                JobEvent {
                                    kind: "snapshot",
                                    message: String::new(),
                                    job: st.jobs.get(&id)?.snapshot(),
                                }
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    };
                    let terminal = done || event.job.state.is_terminal();
                    Some((Ok(event_to_pb(&event)), (None, rx, terminal)))
                }
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
        let req = request.into_inner();
        if req.grpc_addr.is_empty() || req.ring_addr.is_empty() {
            return Err(Status::invalid_argument(
                "a worker must advertise grpc_addr and ring_addr",
            ));
        }
        let mut st = self.lock();
        st.next_worker += 1;
        let id = WorkerId(st.next_worker);
        info!(worker = %id, grpc = %req.grpc_addr, ring = %req.ring_addr, host = %req.hostname, pid = req.pid, "worker registered");
        st.workers.insert(
            id,
            Worker {
                id,
                grpc_addr: req.grpc_addr,
                ring_addr: req.ring_addr,
                last_heartbeat: Instant::now(),
                alive: true,
                job: None,
                last_step: 0,
                samples_per_s: 0.0,
            },
        );
        self.schedule(&mut st, Instant::now());
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: self.inner.config.heartbeat_interval_ms as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let id = parse_worker(&req.worker_id)?;
        let mut st = self.lock();
        let now = Instant::now();
        match st.workers.get_mut(&id) {
            // A worker declared lost must come back under a new identity, so
            // nothing it says for its old ring is trusted.
            Some(w) if w.alive => w.last_heartbeat = now,
            _ => {
                return Ok(Response::new(pb::HeartbeatResponse {
                    assignment: None,
                    unknown_worker: true,
                }))
            }
        }
        self.schedule(&mut st, now);
        Ok(Response::new(pb::HeartbeatResponse {
            assignment: self.assignment(&st, id),
            unknown_worker: false,
        }))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let r = request.into_inner();
        let worker = parse_worker(&r.worker_id)?;
        let job_id = parse_job(&r.job_id)?;
        let mut st = self.lock();
        if let Some(w) = st.workers.get_mut(&worker) {
            w.last_step = r.param_version;
            if r.step_seconds > 0.0 {
                w.samples_per_s = r.samples as f64 / r.step_seconds;
            }
        }
        let job = match Self::member(&mut st, job_id, worker, r.ring_generation) {
            Ok(job) => job,
            Err(_) => {
                return Ok(Response::new(pb::StepReply {
                    continue_job: false,
                }))
            }
        };
        job.total_steps = r.total_steps;
        job.max_reported = job.max_reported.max(r.param_version);
        let world = job.members.len();
        let tally = job
            .tallies
            .entry(r.param_version)
            .or_insert_with(|| VersionTally {
                hash: r.param_hash,
                first_reporter: Some(worker),
                epoch: r.epoch,
                ..Default::default()
            });
        if tally.hash != r.param_hash {
            let first = tally
                .first_reporter
                .map(|w| w.to_string())
                .unwrap_or_default();
            let why = format!(
                "replicas diverged at parameter version {}: worker {first} has hash {:016x}, worker {worker} (rank {}) has {:016x}",
                r.param_version, tally.hash, r.rank, r.param_hash
            );
            self.end_job(&mut st, job_id, JobState::Failed, why);
            return Ok(Response::new(pb::StepReply {
                continue_job: false,
            }));
        }
        tally.reporters.insert(worker);
        tally.loss_sum += r.loss * r.samples as f64;
        tally.samples += r.samples;
        tally.slowest_step_s = tally.slowest_step_s.max(r.step_seconds);
        let complete = tally.reporters.len() == world;
        if complete {
            let (loss, samples, secs, epoch) = (
                tally.loss_sum / tally.samples.max(1) as f64,
                tally.samples,
                tally.slowest_step_s,
                tally.epoch,
            );
            job.step = job.step.max(r.param_version);
            job.epoch = epoch;
            job.loss = loss;
            if secs > 0.0 {
                job.samples_per_s = samples as f64 / secs;
            }
            let v = r.param_version;
            job.tallies.retain(|&k, _| k > v);
            let (id, step, total, sps, generation) = (
                job.id.to_string(),
                job.step,
                job.total_steps,
                job.samples_per_s,
                job.generation.0,
            );
            info!(job = %id, step, total, epoch, workers = world, loss = format!("{loss:.4}"), samples_per_s = format!("{sps:.0}"), "step");
            crate::report::push_step(
                &mut job.history,
                crate::report::MetricRow {
                    step: r.param_version,
                    epoch,
                    loss,
                    samples_per_s: sps,
                    workers: world as u32,
                    eval: None,
                },
            );
            job.emit("step", String::new());
            let m = &self.inner.metrics;
            let l = [("job", id.as_str())];
            m.inc(
                "ringtrain_job_steps_total",
                "Steps completed by every replica.",
                &l,
                1.0,
            );
            m.inc(
                "ringtrain_job_samples_total",
                "Training samples consumed.",
                &l,
                samples as f64,
            );
            m.set(
                "ringtrain_job_loss",
                "Mean training loss of the last step.",
                &l,
                loss,
            );
            m.set(
                "ringtrain_job_samples_per_second",
                "Training throughput of the last step.",
                &l,
                sps,
            );
            m.set(
                "ringtrain_job_ring_generation",
                "Current ring generation.",
                &l,
                generation as f64,
            );
            m.set(
                "ringtrain_job_workers",
                "Workers in the job's ring.",
                &l,
                world as f64,
            );
        }
        // Growing: every member stops after the drain version, then the ring
        // is re-formed with the joiners.
        let mut reform = None;
        let mut continue_job = true;
        if let Some(d) = job.drain.as_mut() {
            if r.param_version >= d.at_version {
                continue_job = false;
                d.stopped.insert(worker);
                if d.stopped.len() == world {
                    let mut members = job.members.clone();
                    members.extend(d.joiners.iter().copied());
                    reform = Some(members);
                }
            }
        }
        if complete {
            self.persist(&st, job_id, false);
        }
        if let Some(members) = reform {
            self.form_ring(&mut st, job_id, members, "ring grown");
        }
        Ok(Response::new(pb::StepReply { continue_job }))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let job_id = parse_job(&r.job_id)?;
        let mut st = self.lock();
        let job = st.jobs.get_mut(&job_id).ok_or_else(|| not_found(job_id))?;
        job.eval = Some((r.test_accuracy, r.test_loss));
        crate::report::record_eval(
            &mut job.history,
            r.param_version,
            r.test_accuracy,
            r.test_loss,
        );
        info!(job = %job_id, version = r.param_version, test_accuracy = r.test_accuracy, test_loss = r.test_loss, "eval");
        job.emit(
            "eval",
            format!(
                "step {}: test accuracy {:.4}, test loss {:.4}",
                r.param_version, r.test_accuracy, r.test_loss
            ),
        );
        let id = job_id.to_string();
        let l = [("job", id.as_str())];
        self.inner.metrics.set(
            "ringtrain_job_test_accuracy",
            "Test accuracy of the last evaluation.",
            &l,
            r.test_accuracy,
        );
        self.inner.metrics.set(
            "ringtrain_job_test_loss",
            "Test loss of the last evaluation.",
            &l,
            r.test_loss,
        );
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_checkpoint(
        &self,
        request: Request<pb::CheckpointReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let job_id = parse_job(&r.job_id)?;
        let mut st = self.lock();
        let job = st.jobs.get_mut(&job_id).ok_or_else(|| not_found(job_id))?;
        job.checkpoint_dir = r.dir.clone();
        job.checkpoint_version = Some(r.param_version);
        self.write_report_later(job);
        info!(job = %job_id, version = r.param_version, dir = %r.dir, "checkpoint");
        job.emit(
            "checkpoint",
            format!("step {} saved to {}", r.param_version, r.dir),
        );
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_finish(
        &self,
        request: Request<pb::FinishReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let worker = parse_worker(&r.worker_id)?;
        let job_id = parse_job(&r.job_id)?;
        let mut st = self.lock();
        let job = st.jobs.get_mut(&job_id).ok_or_else(|| not_found(job_id))?;
        if job.state != JobState::Running || !job.members.contains(&worker) {
            return Ok(Response::new(pb::Empty {}));
        }
        if !r.error.is_empty() {
            let rank = job.members.iter().position(|w| *w == worker).unwrap_or(0);
            let why = format!("worker {worker} (rank {rank}): {}", r.error);
            self.end_job(&mut st, job_id, JobState::Failed, why);
        } else {
            job.finished.insert(worker);
            if job.finished.len() == job.members.len() {
                self.end_job(&mut st, job_id, JobState::Succeeded, String::new());
            }
        }
        self.schedule(&mut st, Instant::now());
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_ring_failure(
        &self,
        request: Request<pb::RingFailureReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let worker = parse_worker(&r.worker_id)?;
        let job_id = parse_job(&r.job_id)?;
        let mut st = self.lock();
        let now = Instant::now();
        let Ok(job) = Self::member(&mut st, job_id, worker, r.ring_generation) else {
            return Ok(Response::new(pb::Empty {})); // an old generation: already handled
        };
        let suspect = usize::try_from(r.suspect_rank)
            .ok()
            .and_then(|rank| job.members.get(rank).copied());
        warn!(job = %job_id, %worker, version = r.param_version, suspect = ?suspect.map(|w| w.to_string()), error = %r.error, "ring failure reported");
        if let Some(s) = suspect {
            job.suspects.entry(s).or_insert(now);
        }
        job.ring_failed = true;
        self.schedule(&mut st, now);
        Ok(Response::new(pb::Empty {}))
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Waiting => "waiting",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn job_record(job: &Job) -> JobRecord {
    JobRecord {
        id: job.id.0,
        spec_toml: job.spec_toml.clone(),
        resume_from: job.resume_from.clone(),
        checkpoint_dir: job.checkpoint_dir.clone(),
        checkpoint_version: job.checkpoint_version,
        state: state_name(job.state).into(),
        error: job.error.clone(),
        submitted_unix_s: job
            .submitted
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        step: job.step,
        total_steps: job.total_steps,
        epoch: job.epoch,
        loss: job.loss.is_finite().then_some(job.loss),
        eval: job.eval,
    }
}

/// A stored job as the restarted coordinator holds it: an unfinished job
/// has no ring any more and waits (regrouping first) for workers.
fn job_from_record(r: &JobRecord, regroup_until: Instant) -> Option<Job> {
    let spec = JobSpec::parse(&r.spec_toml, &[]).ok()?;
    let submitted = UNIX_EPOCH + std::time::Duration::from_secs_f64(r.submitted_unix_s.max(0.0));
    let mut job = Job::new(
        JobId(r.id),
        spec,
        r.resume_from.clone(),
        r.checkpoint_dir.clone(),
        submitted,
    );
    job.checkpoint_version = r.checkpoint_version;
    job.error = r.error.clone();
    job.step = r.step;
    job.max_reported = r.step;
    job.total_steps = r.total_steps;
    job.epoch = r.epoch;
    job.loss = r.loss.unwrap_or(f64::NAN);
    job.eval = r.eval;
    job.state = match r.state.as_str() {
        "pending" => JobState::Pending,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        _ => {
            job.regroup_until = Some(regroup_until);
            JobState::Waiting
        }
    };
    Some(job)
}
