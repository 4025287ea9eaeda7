//! Conversions at the coordinator's edges: its own types to the gRPC
//! messages it answers with, and jobs to and from the store's records.
//! (Conversions both sides share live in `ringtrain_proto::convert`.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::{JobId, ParamVersion};
use ringtrain_proto as pb;

use crate::state::{Job, JobEvent, JobSnapshot, WorkerView};
use crate::store::JobRecord;

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn job_status(s: &JobSnapshot) -> pb::JobStatus {
    pb::JobStatus {
        job_id: s.id.to_string(),
        name: s.name.clone(),
        state: pb::JobState::from(s.state) as i32,
        error: s.error.clone(),
        step: s.step.0,
        total_steps: s.total_steps,
        epoch: s.epoch,
        workers: s.workers,
        workers_wanted: s.workers_wanted,
        loss: s.loss,
        samples_per_s: s.samples_per_s,
        has_eval: s.eval.is_some(),
        test_accuracy: s.eval.map_or(0.0, |e| e.0),
        test_loss: s.eval.map_or(0.0, |e| e.1),
        checkpoint_dir: s.checkpoint_dir.clone(),
        ring_generation: s.generation.0,
        model: s.model.clone(),
        submitted_unix_s: unix_seconds(s.submitted),
        test_bits_per_byte: match s.eval {
            Some((_, loss)) if s.text => loss / std::f64::consts::LN_2,
            _ => 0.0,
        },
        skipped_steps: s.skipped_steps,
        owner: s.owner.clone(),
    }
}

pub fn job_event(e: &JobEvent) -> pb::JobEvent {
    pb::JobEvent {
        status: Some(job_status(&e.job)),
        kind: e.kind.as_str().to_string(),
        message: e.message.clone(),
    }
}

pub fn worker_status(w: &WorkerView) -> pb::WorkerStatus {
    pb::WorkerStatus {
        worker_id: w.id.to_string(),
        address: w.address.clone(),
        job_id: w.job.map(|j| j.to_string()).unwrap_or_default(),
        rank: w.rank.map_or(-1, |r| r as i32),
        last_step: w.last_step.0,
        samples_per_s: w.samples_per_s,
        last_heartbeat_age_s: w.heartbeat_age_s,
        alive: w.alive,
    }
}

/// What the store keeps of a job.
pub fn job_record(job: &Job) -> JobRecord {
    JobRecord {
        id: job.id.0,
        spec_toml: job.spec.to_toml(),
        resume_from: job.resume_from.clone(),
        checkpoint_dir: job.checkpoint_dir.clone(),
        checkpoint_version: job.checkpoint_version.map(|v| v.0),
        state: job.state.as_str().into(),
        error: job.error.clone(),
        submitted_unix_s: unix_seconds(job.submitted),
        step: job.step.0,
        total_steps: job.total_steps,
        epoch: job.epoch,
        loss: job.loss.is_finite().then_some(job.loss),
        eval: job.eval,
        skipped_steps: job.skipped_steps,
        owner: job.owner.clone(),
    }
}

/// A stored job as it was when stored (the caller decides what an
/// unfinished one becomes after a restart). Fails on a spec or state that
/// no longer parses.
pub fn job_from_record(r: &JobRecord) -> Result<Job, String> {
    let spec = JobSpec::parse(&r.spec_toml, &[]).map_err(|e| e.to_string())?;
    let submitted = UNIX_EPOCH + Duration::from_secs_f64(r.submitted_unix_s.max(0.0));
    let mut job = Job::new(
        JobId(r.id),
        spec,
        r.resume_from.clone(),
        r.checkpoint_dir.clone(),
        submitted,
    );
    job.owner = r.owner.clone();
    job.state = r.state.parse()?;
    job.checkpoint_version = r.checkpoint_version.map(ParamVersion);
    job.error = r.error.clone();
    job.step = ParamVersion(r.step);
    job.max_reported = job.step;
    job.total_steps = r.total_steps;
    job.epoch = r.epoch;
    job.loss = r.loss.unwrap_or(f64::NAN);
    job.eval = r.eval;
    job.skipped_steps = r.skipped_steps;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use ringtrain_common::JobState;

    use super::*;

    #[test]
    fn a_job_survives_its_record() {
        let spec = JobSpec::parse(crate::state::tests::SPEC, &[]).unwrap();
        let mut job = Job::new(
            JobId(9),
            spec,
            "/resume".into(),
            "/ckpt".into(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        job.state = JobState::Running;
        job.step = ParamVersion(42);
        job.loss = 0.25;
        job.checkpoint_version = Some(ParamVersion(40));
        job.eval = Some((0.8, 0.4));
        let back = job_from_record(&job_record(&job)).unwrap();
        assert_eq!(back.snapshot(), job.snapshot());
        assert_eq!(back.checkpoint_version, job.checkpoint_version);
        let mut bad = job_record(&job);
        bad.state = "exploded".into();
        assert_eq!(
            job_from_record(&bad).err().as_deref(),
            Some("unknown job state 'exploded'")
        );
    }
}
