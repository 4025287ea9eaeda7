//! Jobs and workers as the coordinator knows them. One owner: the service
//! holds this behind a single mutex, never across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Instant, SystemTime};

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::{JobId, RingGeneration, WorkerId};
use tokio::sync::broadcast;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Fewer live workers than `min_workers`: paused, members keep their state.
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What `WatchJob` streams: a kind, a message, and the job's status after it.
#[derive(Clone, Debug)]
pub struct JobEvent {
    pub kind: &'static str,
    pub message: String,
    pub job: JobSnapshot,
}

/// A consistent copy of a job's status.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub id: JobId,
    pub name: String,
    pub model: String,
    pub state: JobState,
    pub error: String,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub workers: u32,
    pub workers_wanted: u32,
    pub loss: f64,
    pub samples_per_s: f64,
    pub eval: Option<(f64, f64)>,
    pub checkpoint_dir: String,
    pub generation: RingGeneration,
    pub submitted: SystemTime,
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
    pub epoch: u64,
}

pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub spec_toml: String,
    pub resume_from: String,
    pub checkpoint_dir: String,
    pub state: JobState,
    pub error: String,
    pub submitted: SystemTime,
    /// Ring members by rank.
    pub members: Vec<WorkerId>,
    pub generation: RingGeneration,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub samples_per_s: f64,
    pub eval: Option<(f64, f64)>,
    pub tallies: BTreeMap<u64, VersionTally>,
    pub finished: HashSet<WorkerId>,
    pub events: broadcast::Sender<JobEvent>,
    /// Members named by a ring failure, and when.
    pub suspects: HashMap<WorkerId, Instant>,
    /// The current generation's ring failed: re-form once suspects are resolved.
    pub ring_failed: bool,
    /// Growing at a step boundary: members stop after this version, then the
    /// ring is re-formed with the joiners.
    pub drain: Option<Drain>,
    /// Highest version any member reported in this generation.
    pub max_reported: u64,
    /// Version of the newest checkpoint written, if any.
    pub checkpoint_version: Option<u64>,
    /// Recovered after a coordinator restart: until then, wait for the full
    /// worker count before re-forming (workers are reconnecting).
    pub regroup_until: Option<Instant>,
    /// The training curve (bounded; see [`crate::report::push_step`]).
    pub history: Vec<crate::report::MetricRow>,
}

#[derive(Clone, Debug)]
pub struct Drain {
    pub at_version: u64,
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
        let (events, _) = broadcast::channel(1024);
        Self {
            id,
            spec_toml: spec.to_toml(),
            spec,
            resume_from,
            checkpoint_dir,
            state: JobState::Pending,
            error: String::new(),
            submitted,
            members: Vec::new(),
            generation: RingGeneration(0),
            step: 0,
            total_steps: 0,
            epoch: 0,
            loss: f64::NAN,
            samples_per_s: 0.0,
            eval: None,
            tallies: BTreeMap::new(),
            finished: HashSet::new(),
            events,
            suspects: HashMap::new(),
            ring_failed: false,
            drain: None,
            max_reported: 0,
            checkpoint_version: None,
            regroup_until: None,
            history: Vec::new(),
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
            checkpoint_dir: self.checkpoint_dir.clone(),
            generation: self.generation,
            submitted: self.submitted,
        }
    }

    pub fn emit(&self, kind: &'static str, message: impl Into<String>) {
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(JobEvent {
            kind,
            message: message.into(),
            job: self.snapshot(),
        });
    }
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub id: WorkerId,
    pub grpc_addr: String,
    pub ring_addr: String,
    pub last_heartbeat: Instant,
    pub alive: bool,
    pub job: Option<JobId>,
    pub last_step: u64,
    pub samples_per_s: f64,
}

#[derive(Default)]
pub struct State {
    pub jobs: BTreeMap<JobId, Job>,
    /// Submission order, for fair scheduling.
    pub queue: Vec<JobId>,
    pub workers: BTreeMap<WorkerId, Worker>,
    pub next_worker: u64,
    pub next_generation: u64,
}
