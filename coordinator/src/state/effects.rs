//! What a change of state asks the outside world to do, once the state lock
//! is released: tell watchers, persist, count, draw curves, and log
//! TensorBoard scalars.

use std::path::PathBuf;

use ringtrain_common::curve::MetricRow;
use ringtrain_common::{JobId, JobState, RingGeneration};

use super::{Counters, JobSnapshot};
use crate::store::JobRecord;

/// What happened to a job, as `WatchJob` streams it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The status as it stands (first event of a stream, or after a lag).
    Snapshot,
    State,
    Step,
    Eval,
    Checkpoint,
    Workers,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Snapshot => "snapshot",
            EventKind::State => "state",
            EventKind::Step => "step",
            EventKind::Eval => "eval",
            EventKind::Checkpoint => "checkpoint",
            EventKind::Workers => "workers",
        }
    }
}

/// One event of a job, with the job's status after it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    pub kind: EventKind,
    pub message: String,
    pub job: JobSnapshot,
}

/// A write for the job store. `record: None` writes only the counters.
#[derive(Clone, Debug, PartialEq)]
pub struct PersistOp {
    pub record: Option<JobRecord>,
    pub counters: Counters,
    /// State changes wait for fsync; progress may be written lazily.
    pub durable: bool,
}

/// Facts the metrics registry counts (see `crate::metrics`).
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    StepCompleted {
        job: JobId,
        samples: u64,
        loss: f64,
        samples_per_s: f64,
        generation: RingGeneration,
        workers: usize,
    },
    Evaluated {
        job: JobId,
        accuracy: f64,
        loss: f64,
    },
    /// Workers heartbeating and jobs by state, after a scheduling round.
    Census {
        workers_alive: usize,
        jobs: Vec<(JobState, usize)>,
    },
}

/// Write a job's `metrics.csv` and `metrics.png` into `dir`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportRequest {
    pub dir: PathBuf,
    pub title: String,
    pub rows: Vec<MetricRow>,
}

/// Scalars for a job's TensorBoard event files (see `crate::tensorboard`).
#[derive(Clone, Debug, PartialEq)]
pub enum TensorBoardOp {
    /// Append `values` (tag, value) at `step`, in an event file of `dir`.
    Scalars {
        job: JobId,
        dir: PathBuf,
        step: u64,
        values: Vec<(&'static str, f64)>,
        /// The job went back to an earlier step (it rolled back to a
        /// checkpoint): TensorBoard drops the curve from `step` on.
        restart: bool,
    },
    /// The job ended: flush and close its file.
    Close { job: JobId },
}

/// Everything one change asks for, in the order it happened.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<JobEvent>,
    pub persist: Vec<PersistOp>,
    pub observations: Vec<Observation>,
    pub reports: Vec<ReportRequest>,
    pub tensorboard: Vec<TensorBoardOp>,
    /// Jobs forgotten (job retention): deleted from the store.
    pub forgotten: Vec<JobId>,
}

impl Effects {
    /// True when the caller must wait for the store before answering.
    pub fn needs_durability(&self) -> bool {
        self.persist.iter().any(|p| p.durable)
    }
}
