//! What a worker and the coordinator tell each other, as typed values: the
//! coordinator's [`Assignment`] and the worker's reports. The gRPC messages
//! are converted to and from these at the edges (`ringtrain_proto::convert`).

use std::path::PathBuf;

use crate::jobspec::JobSpec;
use crate::ring_key::RingKey;
use crate::{JobId, ParamVersion, Rank, RingGeneration, WorkerId};

/// A worker introducing itself: where ring neighbours reach it.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub grpc_addr: String,
    pub ring_addr: String,
    pub hostname: String,
    pub pid: u32,
}

/// The coordinator's desired state for one worker: be `rank` of `members` in
/// ring `generation` of `job`. A new (job, generation) means (re)join.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub job: JobId,
    pub generation: RingGeneration,
    pub rank: Rank,
    /// Ring endpoints of every member, by rank (for the spec's transport).
    pub members: Vec<String>,
    pub spec: JobSpec,
    /// Where a member without state starts from (members agree on the
    /// newest version among themselves first).
    pub resume_from: Option<PathBuf>,
    pub checkpoint_dir: PathBuf,
    /// The ring's shared secret: members authenticate their links with it.
    pub ring_key: RingKey,
}

/// One member's report of a completed step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: RingGeneration,
    pub rank: Rank,
    /// The version the step produced.
    pub version: ParamVersion,
    /// xxh3 of the parameters after the step: replicas must agree.
    pub param_hash: u64,
    /// Mean loss of this member's slice.
    pub loss: f64,
    pub samples: u64,
    pub step_seconds: f64,
    pub allreduce_seconds: f64,
    /// The epoch the data cursor is in after the step.
    pub epoch: u64,
    /// Steps the whole job will take (workers know the data set's size).
    pub total_steps: u64,
    /// The all-reduced gradient held a NaN or an Inf and the job's
    /// `on_nonfinite = "skip_step"` left the parameters as they were.
    pub skipped_nonfinite: bool,
    /// Wall clock (Unix seconds) when this member began and ended the step.
    pub started_unix_s: f64,
    pub finished_unix_s: f64,
}

/// Rank 0's report of an evaluation on the test split.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: RingGeneration,
    pub version: ParamVersion,
    pub accuracy: f64,
    pub loss: f64,
    pub samples: u64,
}

/// Rank 0 wrote a checkpoint of `version` into `dir`.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointReport {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: RingGeneration,
    pub version: ParamVersion,
    pub dir: PathBuf,
}

/// A member finished the job, or failed it for good (`error`).
#[derive(Clone, Debug, PartialEq)]
pub struct FinishReport {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: RingGeneration,
    pub version: ParamVersion,
    pub error: Option<String>,
}

/// A member's all-reduce failed: it left the generation, keeping its state
/// at `version`, and names the neighbour it suspects.
#[derive(Clone, Debug, PartialEq)]
pub struct RingFailureReport {
    pub worker: WorkerId,
    pub job: JobId,
    pub generation: RingGeneration,
    pub version: ParamVersion,
    pub error: String,
    pub suspect: Option<Rank>,
}
