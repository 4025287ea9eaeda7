//! The gRPC edge of the coordinator: both services share one [`Coordinator`],
//! which owns the [`State`] behind one mutex. Handlers lock, change state,
//! apply the scheduler's decisions, and unlock before any `.await`.

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
use crate::scheduler::{decide, Decision};
use crate::state::{Job, JobEvent, JobSnapshot, JobState, State, VersionTally, Worker};

#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    config: CoordinatorConfig,
    metrics: Metrics,
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

impl Coordinator {
    pub fn new(config: CoordinatorConfig, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                config,
                metrics,
            }),
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

    fn schedule(&self, st: &mut State, now: Instant) {
        for decision in decide(now, st, self.inner.config.worker_timeout()) {
            match decision {
                Decision::WorkerLost { worker } => self.worker_lost(st, worker),
                Decision::Start { job, members } => self.start_job(st, job, members),
            }
        }
        self.update_gauges(st);
    }

    fn worker_lost(&self, st: &mut State, id: WorkerId) {
        let Some(w) = st.workers.get_mut(&id) else {
            return;
        };
        w.alive = false;
        let (addr, job) = (w.grpc_addr.clone(), w.job.take());
        warn!(worker = %id, %addr, "worker lost: no heartbeat within the timeout");
        if let Some(job) = job {
            let step = st.jobs.get(&job).map(|j| j.step).unwrap_or(0);
            let why = format!(
                "worker {id} at {addr} stopped heartbeating (silent for more than {:?}) at step {step}",
                self.inner.config.worker_timeout()
            );
            self.end_job(st, job, JobState::Failed, why);
        }
    }

    fn start_job(&self, st: &mut State, id: JobId, members: Vec<WorkerId>) {
        st.next_generation += 1;
        let generation = RingGeneration(st.next_generation);
        for w in &members {
            if let Some(w) = st.workers.get_mut(w) {
                w.job = Some(id);
            }
        }
        let Some(job) = st.jobs.get_mut(&id) else {
            return;
        };
        job.state = JobState::Running;
        job.generation = generation;
        job.members = members;
        let names: Vec<String> = job.members.iter().map(|w| w.to_string()).collect();
        info!(job = %id, %generation, workers = %names.join(","), "job running");
        job.emit(
            "state",
            format!("running on {} workers ({generation})", job.members.len()),
        );
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
        let members = std::mem::take(&mut job.members);
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
        for w in members {
            if let Some(w) = st.workers.get_mut(&w) {
                if w.job == Some(id) {
                    w.job = None;
                }
            }
        }
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
            start_version: job.start_version,
            resume_from: job.resume_from.clone(),
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
        let (events, _) = broadcast::channel(1024);
        let job = Job {
            id,
            spec_toml: spec.to_toml(),
            spec,
            resume_from: req.resume_from,
            start_version: 0,
            checkpoint_dir,
            state: JobState::Pending,
            error: String::new(),
            submitted: SystemTime::now(),
            members: Vec::new(),
            generation: RingGeneration(0),
            step: 0,
            total_steps: 0,
            epoch: 0,
            loss: f64::NAN,
            samples_per_s: 0.0,
            eval: None,
            tallies: Default::default(),
            finished: Default::default(),
            events,
        };
        info!(job = %id, name = %job.spec.name, model = %job.spec.model, workers = job.spec.workers, "job submitted");
        let mut st = self.lock();
        st.jobs.insert(id, job);
        st.queue.push(id);
        self.schedule(&mut st, Instant::now());
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.to_string(),
        }))
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
        if tally.reporters.len() == world {
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
            info!(job = %id, step, total, epoch, loss = format!("{loss:.4}"), samples_per_s = format!("{sps:.0}"), "step");
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
        Ok(Response::new(pb::StepReply { continue_job: true }))
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
}
