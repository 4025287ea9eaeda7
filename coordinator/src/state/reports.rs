//! What ring members report, and the protocol it drives: a version is
//! committed once every member has reported it with the same parameter hash
//! (a different hash fails the job: replicas diverged); a growing ring drains
//! at a step boundary; a job ends when every member has finished.

use std::path::Path;
use std::time::Instant;

use ringtrain_common::paths::lexically_inside;

use ringtrain_common::curve::{self, MetricRow};
use ringtrain_common::worker_api::{
    CheckpointReport, EvalReport, FinishReport, RingFailureReport, StepReport,
};
use ringtrain_common::JobState;
use tracing::{info, warn};

use super::{Effects, EventKind, Observation, State, StateError, TensorBoardOp, VersionTally};

/// What a member should do after reporting a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepVerdict {
    Continue,
    /// Stop working on this generation (the job ended, or the ring is
    /// draining to grow).
    Stop,
}

impl State {
    pub fn report_step(
        &mut self,
        _now: Instant,
        r: &StepReport,
    ) -> Result<(StepVerdict, Effects), StateError> {
        let mut fx = Effects::default();
        // Not (or no longer) a member: refused before anything is recorded,
        // and the worker stops this generation on the refusal.
        self.member(r.job, r.worker, r.generation)?;
        if let Some(w) = self.workers.get_mut(&r.worker) {
            w.last_step = r.version;
            if r.step_seconds > 0.0 {
                w.samples_per_s = r.samples as f64 / r.step_seconds;
            }
        }
        let job = self.member(r.job, r.worker, r.generation)?;
        job.total_steps = r.total_steps;
        job.max_reported = job.max_reported.max(r.version);
        let world = job.members.len();
        let tally = job
            .tallies
            .entry(r.version)
            .or_insert_with(|| VersionTally {
                hash: r.param_hash,
                first_reporter: Some(r.worker),
                epoch: r.epoch,
                ..Default::default()
            });
        if tally.hash != r.param_hash {
            let first = tally
                .first_reporter
                .map(|w| w.to_string())
                .unwrap_or_default();
            let why = format!(
                "replicas diverged at parameter version {}: worker {first} has hash {:016x}, worker {} (rank {}) has {:016x}",
                r.version.0, tally.hash, r.worker, r.rank.0, r.param_hash
            );
            self.end_job(r.job, JobState::Failed, why, &mut fx);
            return Ok((StepVerdict::Stop, fx));
        }
        tally.reporters.insert(r.worker);
        tally.loss_sum += r.loss * r.samples as f64;
        tally.samples += r.samples;
        tally.slowest_step_s = tally.slowest_step_s.max(r.step_seconds);
        tally.slowest_allreduce_s = tally.slowest_allreduce_s.max(r.allreduce_seconds);
        if r.finished_unix_s > 0.0 {
            if tally.started_unix_s == 0.0 || r.started_unix_s < tally.started_unix_s {
                tally.started_unix_s = r.started_unix_s;
            }
            tally.finished_unix_s = tally.finished_unix_s.max(r.finished_unix_s);
        }
        let complete = tally.reporters.len() == world;
        if complete {
            let (loss, samples, secs, allreduce_s, epoch) = (
                tally.loss_sum / tally.samples.max(1) as f64,
                tally.samples,
                tally.slowest_step_s,
                tally.slowest_allreduce_s,
                tally.epoch,
            );
            let wall = (tally.finished_unix_s > 0.0)
                .then_some((tally.started_unix_s, tally.finished_unix_s));
            job.step = job.step.max(r.version);
            job.epoch = epoch;
            job.loss = loss;
            if secs > 0.0 {
                job.samples_per_s = samples as f64 / secs;
            }
            job.tallies.retain(|&k, _| k > r.version);
            if r.skipped_nonfinite {
                job.skipped_steps += 1;
                warn!(job = %job.id, step = r.version.0, skipped = job.skipped_steps, "non-finite gradient: every member skipped the step");
            }
            let sps = job.samples_per_s;
            info!(job = %job.id, step = job.step.0, total = job.total_steps, epoch, workers = world, loss = format!("{loss:.4}"), samples_per_s = format!("{sps:.0}"), "step");
            // A step the curve has already passed (the job rolled back to a
            // checkpoint): push_step drops the rows from it on, and
            // TensorBoard is told to drop its own.
            let redone = job.history.last().is_some_and(|last| {
                last.step > r.version.0 || (last.step == r.version.0 && last.loss.is_finite())
            });
            curve::push_step(
                &mut job.history,
                MetricRow {
                    step: r.version.0,
                    epoch,
                    loss,
                    samples_per_s: sps,
                    workers: world as u32,
                    eval: None,
                    wall,
                },
            );
            if let Some(dir) = job.tensorboard_dir() {
                fx.tensorboard.push(TensorBoardOp::Scalars {
                    job: job.id,
                    dir,
                    step: r.version.0,
                    values: vec![
                        ("loss", loss),
                        ("samples_per_s", sps),
                        ("allreduce_s", allreduce_s),
                    ],
                    restart: redone,
                });
            }
            fx.observations.push(Observation::StepCompleted {
                job: job.id,
                samples,
                loss,
                samples_per_s: sps,
                generation: job.generation,
                workers: world,
            });
        }
        // Growing: every member stops after the drain version, then the ring
        // is re-formed with the joiners.
        let mut grown = None;
        let mut verdict = StepVerdict::Continue;
        if let Some(d) = job.drain.as_mut() {
            if r.version >= d.at_version {
                verdict = StepVerdict::Stop;
                d.stopped.insert(r.worker);
                if d.stopped.len() == world {
                    let mut members = job.members.clone();
                    members.extend(d.joiners.iter().copied());
                    grown = Some(members);
                }
            }
        }
        if complete {
            // Every member skips alike (they hold the same reduced gradient).
            let message = if r.skipped_nonfinite {
                format!(
                    "step {} skipped: non-finite gradient (on_nonfinite = \"skip_step\"; its batch counts as consumed)",
                    r.version.0
                )
            } else {
                String::new()
            };
            self.emit(r.job, EventKind::Step, message, &mut fx);
            self.persist(r.job, false, &mut fx);
        }
        if let Some(members) = grown {
            self.form_ring(r.job, members, "ring grown", &mut fx);
        }
        Ok((verdict, fx))
    }

    pub fn report_eval(&mut self, _now: Instant, r: &EvalReport) -> Result<Effects, StateError> {
        let mut fx = Effects::default();
        let job = self.member(r.job, r.worker, r.generation)?;
        job.eval = Some((r.accuracy, r.loss));
        curve::record_eval(&mut job.history, r.version.0, r.accuracy, r.loss);
        if let Some(dir) = job.tensorboard_dir() {
            // NaN where the model computes its own loss: no accuracy then.
            let mut values = vec![("test_loss", r.loss)];
            if r.accuracy.is_finite() {
                values.insert(0, ("test_accuracy", r.accuracy));
            }
            fx.tensorboard.push(TensorBoardOp::Scalars {
                job: r.job,
                dir,
                step: r.version.0,
                values,
                restart: false,
            });
        }
        info!(job = %r.job, version = r.version.0, test_accuracy = r.accuracy, test_loss = r.loss, "eval");
        fx.observations.push(Observation::Evaluated {
            job: r.job,
            accuracy: r.accuracy,
            loss: r.loss,
        });
        let message = format!(
            "step {}: test accuracy {:.4}, test loss {:.4}",
            r.version.0, r.accuracy, r.loss
        );
        self.emit(r.job, EventKind::Eval, message, &mut fx);
        Ok(fx)
    }

    pub fn report_checkpoint(
        &mut self,
        _now: Instant,
        r: &CheckpointReport,
    ) -> Result<Effects, StateError> {
        let job = self.member(r.job, r.worker, r.generation)?;
        // Only inside the directory the job was given (itself confined to
        // the checkpoint root at submission): the coordinator writes the
        // job's report there.
        if !lexically_inside(&r.dir, Path::new(&job.checkpoint_dir)) {
            return Err(StateError::OutsideCheckpointDir {
                job: r.job,
                dir: ringtrain_common::quote(&r.dir.to_string_lossy()).into_owned(),
            });
        }
        let dir = r.dir.to_string_lossy().into_owned();
        job.checkpoint_dir = dir.clone();
        job.checkpoint_version = Some(r.version);
        info!(job = %r.job, version = r.version.0, %dir, "checkpoint");
        let mut fx = Effects::default();
        self.report_later(r.job, &mut fx);
        let message = format!("step {} saved to {dir}", r.version.0);
        self.emit(r.job, EventKind::Checkpoint, message, &mut fx);
        self.persist(r.job, true, &mut fx);
        Ok(fx)
    }

    pub fn report_finish(&mut self, now: Instant, r: &FinishReport) -> Result<Effects, StateError> {
        let job = self.member(r.job, r.worker, r.generation)?;
        let mut fx = Effects::default();
        match &r.error {
            Some(error) => {
                let rank = job.rank_of(r.worker).unwrap_or(0);
                // A worker's own words, kept to a size ListJobs can carry.
                let error = ringtrain_common::cut(error, 1000);
                let why = format!("worker {} (rank {rank}): {error}", r.worker);
                self.end_job(r.job, JobState::Failed, why, &mut fx);
            }
            None => {
                job.finished.insert(r.worker);
                if job.finished.len() == job.members.len() {
                    self.end_job(r.job, JobState::Succeeded, String::new(), &mut fx);
                }
            }
        }
        self.schedule(now, &mut fx);
        Ok(fx)
    }

    /// A member's all-reduce failed: the ring is re-formed once the suspect
    /// it names is known to be alive or lost (see the scheduler).
    pub fn report_ring_failure(
        &mut self,
        now: Instant,
        r: &RingFailureReport,
    ) -> Result<Effects, StateError> {
        let job = self.member(r.job, r.worker, r.generation)?;
        let suspect = r
            .suspect
            .and_then(|rank| job.members.get(rank.0 as usize).copied());
        warn!(job = %r.job, worker = %r.worker, version = r.version.0, suspect = ?suspect.map(|w| w.to_string()), error = %ringtrain_common::quote(&r.error), "ring failure reported");
        if let Some(s) = suspect {
            job.suspects.entry(s).or_insert(now);
        }
        job.ring_failed = true;
        let mut fx = Effects::default();
        self.schedule(now, &mut fx);
        Ok(fx)
    }
}
