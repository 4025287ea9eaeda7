//! Jobs and workers as the coordinator knows them, and every change to them.
//!
//! One owner: the service holds [`State`] behind a single mutex, never across
//! an `.await`. Each change is a method that takes `now` and returns its
//! [`Effects`] (events for watchers, records to persist, observations for
//! metrics, reports and TensorBoard scalars to write) instead of doing I/O,
//! so the protocol is tested without sockets or clocks (see `tests.rs`), and
//! the service applies the effects after it lets go of the lock.
//!
//! - [`jobs`](self): submission, cancellation, recovery after a restart;
//! - `workers`: registration, heartbeats, assignments;
//! - `reports`: the step-commit, divergence, drain and finish protocol;
//! - `schedule`: applying the scheduler's pure decisions.

mod effects;
mod jobs;
mod reports;
mod retention;
mod schedule;
mod workers;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use ringtrain_common::curve::MetricRow;
use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::ring_key::RingKeys;
use ringtrain_common::{JobId, JobState, ParamVersion, RingGeneration, WorkerId};

pub use effects::{
    Effects, EventKind, JobEvent, Observation, PersistOp, ReportRequest, TensorBoardOp,
};
pub use reports::StepVerdict;
pub use workers::HeartbeatReply;

use crate::scheduler::Timeouts;
pub use crate::store::Counters;

/// Why a request cannot change the state. The service maps each to a gRPC
/// status; none is a fault of the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("no job {0}")]
    NoJob(JobId),
    /// A report from a worker that is not a member of the job's current ring
    /// generation (fenced, lost, or never was): it changes nothing.
    #[error("worker {worker} is not in {generation} of job {job}")]
    NotMember {
        job: JobId,
        worker: WorkerId,
        generation: RingGeneration,
    },
    /// A checkpoint report naming a directory the job was not given.
    #[error("job {job} checkpoints inside its own directory, not '{dir}'")]
    OutsideCheckpointDir { job: JobId, dir: String },
    /// The cluster holds as many workers as it may.
    #[error("{0} workers are registered already (the coordinator's max_workers)")]
    TooManyWorkers(usize),
    #[error("job {job} already ended ({state})")]
    Ended { job: JobId, state: JobState },
}

/// A consistent copy of a job's status.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSnapshot {
    pub id: JobId,
    pub name: String,
    pub model: String,
    pub state: JobState,
    pub error: String,
    pub step: ParamVersion,
    pub total_steps: u64,
    pub epoch: u64,
    pub workers: u32,
    pub workers_wanted: u32,
    pub loss: f64,
    pub samples_per_s: f64,
    /// (test accuracy, NaN without one; test loss)
    pub eval: Option<(f64, f64)>,
    /// Text data: the loss is over bytes, so it reads as bits per byte too.
    pub text: bool,
    pub checkpoint_dir: String,
    pub generation: RingGeneration,
    pub submitted: SystemTime,
    pub skipped_steps: u64,
    pub owner: String,
}

/// Hashes and losses reported for one parameter version.
#[derive(Debug, Default)]
pub struct VersionTally {
    pub hash: u64,
    pub first_reporter: Option<WorkerId>,
    pub reporters: HashSet<WorkerId>,
    pub loss_sum: f64,
    pub samples: u64,
    pub slowest_step_s: f64,
    /// The longest any member spent in the step's gradient all-reduce.
    pub slowest_allreduce_s: f64,
    pub epoch: u64,
    /// The earliest member start and latest member end (Unix seconds).
    pub started_unix_s: f64,
    pub finished_unix_s: f64,
}

pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub resume_from: String,
    pub checkpoint_dir: String,
    pub state: JobState,
    pub error: String,
    pub submitted: SystemTime,
    /// The principal that submitted the job: only it (and admins) may see
    /// all of it or cancel it.
    pub owner: String,
    /// Ring members by rank.
    pub members: Vec<WorkerId>,
    pub generation: RingGeneration,
    /// The newest version every member of a generation has reported.
    pub step: ParamVersion,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub samples_per_s: f64,
    pub eval: Option<(f64, f64)>,
    pub tallies: BTreeMap<ParamVersion, VersionTally>,
    pub finished: HashSet<WorkerId>,
    /// Members named by a ring failure, and when.
    pub suspects: HashMap<WorkerId, Instant>,
    /// The current generation's ring failed: re-form once suspects are resolved.
    pub ring_failed: bool,
    /// Growing at a step boundary: members stop after this version, then the
    /// ring is re-formed with the joiners.
    pub drain: Option<Drain>,
    /// Highest version any member reported in this generation.
    pub max_reported: ParamVersion,
    /// Version of the newest checkpoint written, if any.
    pub checkpoint_version: Option<ParamVersion>,
    /// Recovered after a coordinator restart: until then, wait for the full
    /// worker count before re-forming (workers are reconnecting).
    pub regroup_until: Option<Instant>,
    /// The training curve (bounded; see [`ringtrain_common::curve::push_step`]).
    pub history: Vec<MetricRow>,
    /// Steps every member skipped for a non-finite gradient (`on_nonfinite = "skip_step"`).
    pub skipped_steps: u64,
}

#[derive(Clone, Debug)]
pub struct Drain {
    pub at_version: ParamVersion,
    pub joiners: Vec<WorkerId>,
    pub stopped: HashSet<WorkerId>,
}

impl Job {
    pub fn new(
        id: JobId,
        spec: JobSpec,
        resume_from: String,
        checkpoint_dir: String,
        submitted: SystemTime,
    ) -> Self {
        Self {
            id,
            spec,
            resume_from,
            checkpoint_dir,
            state: JobState::Pending,
            error: String::new(),
            submitted,
            owner: String::new(),
            members: Vec::new(),
            generation: RingGeneration(0),
            step: ParamVersion(0),
            total_steps: 0,
            epoch: 0,
            loss: f64::NAN,
            samples_per_s: 0.0,
            eval: None,
            tallies: BTreeMap::new(),
            finished: HashSet::new(),
            suspects: HashMap::new(),
            ring_failed: false,
            drain: None,
            max_reported: ParamVersion(0),
            checkpoint_version: None,
            regroup_until: None,
            history: Vec::new(),
            skipped_steps: 0,
        }
    }

    /// Where a worker without state starts from: the newest checkpoint of
    /// this job, else the checkpoint it was submitted to resume from.
    pub fn resume_source(&self) -> String {
        if self.checkpoint_version.is_some() {
            self.checkpoint_dir.clone()
        } else {
            self.resume_from.clone()
        }
    }

    pub fn snapshot(&self) -> JobSnapshot {
        JobSnapshot {
            id: self.id,
            name: self.spec.name.clone(),
            model: self.spec.model.to_string(),
            state: self.state,
            error: self.error.clone(),
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.epoch,
            workers: self.members.len() as u32,
            workers_wanted: self.spec.workers as u32,
            loss: self.loss,
            samples_per_s: self.samples_per_s,
            eval: self.eval,
            text: self.spec.dataset.format == ringtrain_common::jobspec::DataFormat::Text,
            checkpoint_dir: self.checkpoint_dir.clone(),
            generation: self.generation,
            submitted: self.submitted,
            skipped_steps: self.skipped_steps,
            owner: self.owner.clone(),
        }
    }

    /// Where the job's TensorBoard event files go: its checkpoint
    /// directory, unless the spec turns them off (`checkpoint.tensorboard`).
    pub fn tensorboard_dir(&self) -> Option<PathBuf> {
        (self.spec.checkpoint.tensorboard && !self.checkpoint_dir.is_empty())
            .then(|| PathBuf::from(&self.checkpoint_dir))
    }

    /// The title of the job's metrics.png.
    pub fn report_title(&self) -> String {
        format!("{} ({}, job {})", self.spec.name, self.spec.model, self.id)
    }

    fn rank_of(&self, worker: WorkerId) -> Option<usize> {
        self.members.iter().position(|w| *w == worker)
    }
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub id: WorkerId,
    /// Registered again under a new id (a restarted worker at the same
    /// addresses): lost at the next scheduling round.
    pub replaced: bool,
    pub grpc_addr: String,
    pub ring_addr: String,
    pub last_heartbeat: Instant,
    pub alive: bool,
    pub job: Option<JobId>,
    pub last_step: ParamVersion,
    pub samples_per_s: f64,
}

/// What `ListJobs` shows of a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    pub id: WorkerId,
    pub address: String,
    pub job: Option<JobId>,
    pub rank: Option<usize>,
    pub last_step: ParamVersion,
    pub samples_per_s: f64,
    pub heartbeat_age_s: f64,
    pub alive: bool,
}

/// What the state keeps of what peers create (see
/// [`crate::config::CoordinatorConfig`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Workers registered at once (lost ones not yet forgotten included).
    pub max_workers: usize,
    /// A lost worker is forgotten this long after its last heartbeat.
    pub forget_lost_workers: Duration,
    /// Finished jobs kept: the newest this many...
    pub keep_finished_jobs: usize,
    /// ...submitted at most this long ago.
    pub keep_finished_for: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_workers: 256,
            forget_lost_workers: Duration::from_secs(600),
            keep_finished_jobs: 1000,
            keep_finished_for: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// One page of `ListJobs`: jobs in submission order, and the last one's id
/// when more follow.
#[derive(Clone, Debug, PartialEq)]
pub struct JobsPage {
    pub jobs: Vec<JobSnapshot>,
    pub next: Option<JobId>,
}

pub struct State {
    pub jobs: BTreeMap<JobId, Job>,
    /// Submission order, for fair scheduling.
    pub queue: Vec<JobId>,
    pub workers: BTreeMap<WorkerId, Worker>,
    pub counters: Counters,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Where each ring generation's key comes from (random per process).
    pub ring_keys: RingKeys,
}

impl State {
    pub fn new(timeouts: Timeouts, counters: Counters) -> Self {
        Self {
            jobs: BTreeMap::new(),
            queue: Vec::new(),
            workers: BTreeMap::new(),
            counters,
            timeouts,
            limits: Limits::default(),
            ring_keys: RingKeys::random(),
        }
    }

    pub fn job(&self, id: JobId) -> Result<&Job, StateError> {
        self.jobs.get(&id).ok_or(StateError::NoJob(id))
    }

    pub fn snapshot(&self, id: JobId) -> Result<JobSnapshot, StateError> {
        self.job(id).map(Job::snapshot)
    }

    /// Every job in submission order.
    pub fn snapshots(&self) -> Vec<JobSnapshot> {
        self.queue
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(Job::snapshot)
            .collect()
    }

    /// Up to `size` jobs in submission order, after the job `after` (the
    /// previous page's last).
    pub fn snapshots_page(
        &self,
        after: Option<JobId>,
        size: usize,
    ) -> Result<JobsPage, StateError> {
        let start = match after {
            None => 0,
            Some(id) => {
                self.queue
                    .iter()
                    .position(|j| *j == id)
                    .ok_or(StateError::NoJob(id))?
                    + 1
            }
        };
        let mut jobs: Vec<JobSnapshot> = self.queue[start..]
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .take(size.saturating_add(1))
            .map(Job::snapshot)
            .collect();
        let next = if jobs.len() > size {
            jobs.truncate(size);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(JobsPage { jobs, next })
    }

    pub fn worker_views(&self, now: Instant) -> Vec<WorkerView> {
        self.workers
            .values()
            .map(|w| WorkerView {
                id: w.id,
                address: w.grpc_addr.clone(),
                job: w.job,
                rank: w
                    .job
                    .and_then(|j| self.jobs.get(&j))
                    .and_then(|j| j.rank_of(w.id)),
                last_step: w.last_step,
                samples_per_s: w.samples_per_s,
                heartbeat_age_s: now
                    .saturating_duration_since(w.last_heartbeat)
                    .as_secs_f64(),
                alive: w.alive,
            })
            .collect()
    }

    /// The job's curve, and the directory of its `metrics.csv` when the curve
    /// is not held here (a job that ended before this coordinator started).
    pub fn history(&self, id: JobId) -> Result<(Vec<MetricRow>, Option<PathBuf>), StateError> {
        let job = self.job(id)?;
        let on_disk =
            (job.history.is_empty() && job.state.is_terminal() && !job.checkpoint_dir.is_empty())
                .then(|| PathBuf::from(&job.checkpoint_dir));
        Ok((job.history.clone(), on_disk))
    }

    /// Ok when `worker` is a member of the running job's current generation:
    /// the only reports that may change it.
    pub fn check_member(
        &self,
        job: JobId,
        worker: WorkerId,
        generation: RingGeneration,
    ) -> Result<(), StateError> {
        let j = self.jobs.get(&job).ok_or(StateError::NoJob(job))?;
        if j.state != JobState::Running || j.generation != generation || j.rank_of(worker).is_none()
        {
            return Err(StateError::NotMember {
                job,
                worker,
                generation,
            });
        }
        Ok(())
    }

    /// The running job's current-generation member `worker`, or why not.
    fn member(
        &mut self,
        job: JobId,
        worker: WorkerId,
        generation: RingGeneration,
    ) -> Result<&mut Job, StateError> {
        self.check_member(job, worker, generation)?;
        self.jobs.get_mut(&job).ok_or(StateError::NoJob(job))
    }

    /// Queues the job's record for the store (`durable`: wait for fsync).
    fn persist(&self, id: JobId, durable: bool, fx: &mut Effects) {
        if let Some(job) = self.jobs.get(&id) {
            fx.persist.push(PersistOp {
                record: Some(crate::convert::job_record(job)),
                counters: self.counters,
                durable,
            });
        }
    }
}
