//! Conversions between the wire types and the workspace's own types, for
//! every edge (coordinator services, worker, CLI) to share. Parsing a peer's
//! message checks its ids; a bad one is an error naming the field.

use std::path::PathBuf;

use ringtrain_common::curve::MetricRow;
use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::ring_key::RingKey;
use ringtrain_common::worker_api::{
    Assignment, CheckpointReport, EvalReport, FinishReport, Registration, RingFailureReport,
    StepReport,
};
use ringtrain_common::{JobId, JobState, ParamVersion, Rank, RingGeneration, WorkerId};

use crate::v1 as pb;

/// Why a message could not be taken: the field and the reason, one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BadField {
    pub field: &'static str,
    pub problem: String,
}

fn field<T, E: std::fmt::Display>(name: &'static str, r: Result<T, E>) -> Result<T, BadField> {
    r.map_err(|e| BadField {
        field: name,
        problem: e.to_string(),
    })
}

pub fn parse_job(id: &str) -> Result<JobId, BadField> {
    field("job_id", id.parse())
}

pub fn parse_worker(id: &str) -> Result<WorkerId, BadField> {
    field("worker_id", id.parse())
}

fn path(p: String) -> Option<PathBuf> {
    (!p.is_empty()).then(|| PathBuf::from(p))
}

fn text(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Waiting => pb::JobState::Waiting,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

/// The state a `JobStatus.state` field holds; None for unspecified or
/// unknown values.
pub fn job_state(state: i32) -> Option<JobState> {
    match pb::JobState::try_from(state).ok()? {
        pb::JobState::Pending => Some(JobState::Pending),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Waiting => Some(JobState::Waiting),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
        pb::JobState::Unspecified => None,
    }
}

/// The name of a `JobStatus.state` value ("unknown" when unspecified).
pub fn job_state_name(state: i32) -> &'static str {
    job_state(state).map_or("unknown", JobState::as_str)
}

impl From<&MetricRow> for pb::MetricRow {
    fn from(r: &MetricRow) -> Self {
        pb::MetricRow {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            samples_per_s: r.samples_per_s,
            workers: r.workers,
            has_eval: r.eval.is_some(),
            test_accuracy: r.eval.map_or(0.0, |e| e.0),
            test_loss: r.eval.map_or(0.0, |e| e.1),
            started_unix_s: r.wall.map_or(0.0, |w| w.0),
            finished_unix_s: r.wall.map_or(0.0, |w| w.1),
        }
    }
}

impl From<&pb::MetricRow> for MetricRow {
    fn from(r: &pb::MetricRow) -> Self {
        MetricRow {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            samples_per_s: r.samples_per_s,
            workers: r.workers,
            eval: r.has_eval.then_some((r.test_accuracy, r.test_loss)),
            wall: (r.finished_unix_s > 0.0).then_some((r.started_unix_s, r.finished_unix_s)),
        }
    }
}

impl From<&Registration> for pb::RegisterWorkerRequest {
    fn from(r: &Registration) -> Self {
        pb::RegisterWorkerRequest {
            grpc_addr: r.grpc_addr.clone(),
            ring_addr: r.ring_addr.clone(),
            hostname: r.hostname.clone(),
            pid: r.pid,
        }
    }
}

impl From<pb::RegisterWorkerRequest> for Registration {
    fn from(r: pb::RegisterWorkerRequest) -> Self {
        Registration {
            grpc_addr: r.grpc_addr,
            ring_addr: r.ring_addr,
            hostname: r.hostname,
            pid: r.pid,
        }
    }
}

impl From<&Assignment> for pb::Assignment {
    fn from(a: &Assignment) -> Self {
        pb::Assignment {
            job_id: a.job.to_string(),
            ring_generation: a.generation.0,
            rank: a.rank.0,
            members: a.members.clone(),
            spec_toml: a.spec.to_toml(),
            resume_from: text(&a.resume_from),
            checkpoint_dir: a.checkpoint_dir.to_string_lossy().into_owned(),
            transport: a.spec.ring.transport.to_string(),
            ring_key: a.ring_key.as_bytes().to_vec(),
        }
    }
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = BadField;
    fn try_from(a: pb::Assignment) -> Result<Self, BadField> {
        Ok(Assignment {
            job: parse_job(&a.job_id)?,
            generation: RingGeneration(a.ring_generation),
            rank: Rank(a.rank),
            members: a.members,
            spec: field("spec_toml", JobSpec::parse(&a.spec_toml, &[]))?,
            resume_from: path(a.resume_from),
            checkpoint_dir: PathBuf::from(a.checkpoint_dir),
            ring_key: field("ring_key", RingKey::from_slice(&a.ring_key))?,
        })
    }
}

impl From<&StepReport> for pb::StepReport {
    fn from(r: &StepReport) -> Self {
        pb::StepReport {
            worker_id: r.worker.to_string(),
            job_id: r.job.to_string(),
            ring_generation: r.generation.0,
            param_version: r.version.0,
            param_hash: r.param_hash,
            loss: r.loss,
            samples: r.samples,
            step_seconds: r.step_seconds,
            allreduce_seconds: r.allreduce_seconds,
            epoch: r.epoch,
            rank: r.rank.0,
            total_steps: r.total_steps,
            skipped_nonfinite: r.skipped_nonfinite,
            started_unix_s: r.started_unix_s,
            finished_unix_s: r.finished_unix_s,
        }
    }
}

impl TryFrom<pb::StepReport> for StepReport {
    type Error = BadField;
    fn try_from(r: pb::StepReport) -> Result<Self, BadField> {
        Ok(StepReport {
            worker: parse_worker(&r.worker_id)?,
            job: parse_job(&r.job_id)?,
            generation: RingGeneration(r.ring_generation),
            rank: Rank(r.rank),
            version: ParamVersion(r.param_version),
            param_hash: r.param_hash,
            loss: r.loss,
            samples: r.samples,
            step_seconds: r.step_seconds,
            allreduce_seconds: r.allreduce_seconds,
            epoch: r.epoch,
            total_steps: r.total_steps,
            skipped_nonfinite: r.skipped_nonfinite,
            started_unix_s: r.started_unix_s,
            finished_unix_s: r.finished_unix_s,
        })
    }
}

impl From<&EvalReport> for pb::EvalReport {
    fn from(r: &EvalReport) -> Self {
        pb::EvalReport {
            worker_id: r.worker.to_string(),
            job_id: r.job.to_string(),
            ring_generation: r.generation.0,
            param_version: r.version.0,
            test_accuracy: r.accuracy,
            test_loss: r.loss,
            samples: r.samples,
        }
    }
}

impl TryFrom<pb::EvalReport> for EvalReport {
    type Error = BadField;
    fn try_from(r: pb::EvalReport) -> Result<Self, BadField> {
        Ok(EvalReport {
            worker: parse_worker(&r.worker_id)?,
            job: parse_job(&r.job_id)?,
            generation: RingGeneration(r.ring_generation),
            version: ParamVersion(r.param_version),
            accuracy: r.test_accuracy,
            loss: r.test_loss,
            samples: r.samples,
        })
    }
}

impl From<&CheckpointReport> for pb::CheckpointReport {
    fn from(r: &CheckpointReport) -> Self {
        pb::CheckpointReport {
            worker_id: r.worker.to_string(),
            job_id: r.job.to_string(),
            ring_generation: r.generation.0,
            param_version: r.version.0,
            dir: r.dir.to_string_lossy().into_owned(),
        }
    }
}

impl TryFrom<pb::CheckpointReport> for CheckpointReport {
    type Error = BadField;
    fn try_from(r: pb::CheckpointReport) -> Result<Self, BadField> {
        Ok(CheckpointReport {
            worker: parse_worker(&r.worker_id)?,
            job: parse_job(&r.job_id)?,
            generation: RingGeneration(r.ring_generation),
            version: ParamVersion(r.param_version),
            dir: PathBuf::from(r.dir),
        })
    }
}

impl From<&FinishReport> for pb::FinishReport {
    fn from(r: &FinishReport) -> Self {
        pb::FinishReport {
            worker_id: r.worker.to_string(),
            job_id: r.job.to_string(),
            ring_generation: r.generation.0,
            param_version: r.version.0,
            error: r.error.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::FinishReport> for FinishReport {
    type Error = BadField;
    fn try_from(r: pb::FinishReport) -> Result<Self, BadField> {
        Ok(FinishReport {
            worker: parse_worker(&r.worker_id)?,
            job: parse_job(&r.job_id)?,
            generation: RingGeneration(r.ring_generation),
            version: ParamVersion(r.param_version),
            error: (!r.error.is_empty()).then_some(r.error),
        })
    }
}

impl From<&RingFailureReport> for pb::RingFailureReport {
    fn from(r: &RingFailureReport) -> Self {
        pb::RingFailureReport {
            worker_id: r.worker.to_string(),
            job_id: r.job.to_string(),
            ring_generation: r.generation.0,
            param_version: r.version.0,
            error: r.error.clone(),
            suspect_rank: r.suspect.map_or(-1, |s| s.0 as i32),
        }
    }
}

impl TryFrom<pb::RingFailureReport> for RingFailureReport {
    type Error = BadField;
    fn try_from(r: pb::RingFailureReport) -> Result<Self, BadField> {
        Ok(RingFailureReport {
            worker: parse_worker(&r.worker_id)?,
            job: parse_job(&r.job_id)?,
            generation: RingGeneration(r.ring_generation),
            version: ParamVersion(r.param_version),
            error: r.error,
            suspect: u32::try_from(r.suspect_rank).ok().map(Rank),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_state_survives_the_wire() {
        for s in JobState::ALL {
            assert_eq!(job_state(pb::JobState::from(s) as i32), Some(s));
        }
        assert_eq!(job_state(0), None);
        assert_eq!(job_state_name(99), "unknown");
    }

    #[test]
    fn reports_round_trip_and_bad_ids_name_the_field() {
        let r = RingFailureReport {
            worker: WorkerId(3),
            job: JobId(0xabc),
            generation: RingGeneration(7),
            version: ParamVersion(41),
            error: "gone".into(),
            suspect: Some(Rank(2)),
        };
        let back = RingFailureReport::try_from(pb::RingFailureReport::from(&r));
        assert_eq!(back, Ok(r.clone()));
        let none = RingFailureReport { suspect: None, ..r };
        assert_eq!(
            RingFailureReport::try_from(pb::RingFailureReport::from(&none)),
            Ok(none)
        );
        let bad = pb::StepReport {
            worker_id: "nobody".into(),
            ..Default::default()
        };
        let err = StepReport::try_from(bad).unwrap_err();
        assert_eq!(err.field, "worker_id");
        assert!(err.to_string().starts_with("worker_id: 'nobody'"), "{err}");
    }
}
