//! Jobs arriving, being cancelled, and coming back after a restart.

use std::path::Path;
use std::time::{Instant, SystemTime};

use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::{JobId, JobState};
use tracing::{info, warn};

use super::{Counters, Effects, Job, JobSnapshot, State, StateError};
use crate::store::JobRecord;

impl State {
    /// Queues a new job. Its record is persisted (durably) with the effects.
    #[allow(clippy::too_many_arguments)] // each is one field of the job record
    pub fn submit(
        &mut self,
        now: Instant,
        id: JobId,
        spec: JobSpec,
        resume_from: String,
        checkpoint_dir: String,
        submitted: SystemTime,
        owner: String,
    ) -> Effects {
        let mut job = Job::new(id, spec, resume_from, checkpoint_dir, submitted);
        job.owner = owner;
        info!(job = %id, name = %job.spec.name, model = %job.spec.model, workers = job.spec.workers, owner = %job.owner, "job submitted");
        self.jobs.insert(id, job);
        self.queue.push(id);
        let mut fx = Effects::default();
        self.persist(id, true, &mut fx);
        self.schedule(now, &mut fx);
        fx
    }

    /// Cancels a job that has not ended, freeing its workers.
    pub fn cancel(
        &mut self,
        now: Instant,
        id: JobId,
    ) -> Result<(JobSnapshot, Effects), StateError> {
        let state = self.job(id)?.state;
        if state.is_terminal() {
            return Err(StateError::Ended { job: id, state });
        }
        let mut fx = Effects::default();
        self.end_job(id, JobState::Cancelled, String::new(), &mut fx);
        self.schedule(now, &mut fx);
        Ok((self.snapshot(id)?, fx))
    }

    /// The state a restarted coordinator starts from: the stored jobs, each
    /// unfinished one waiting (regrouping until `now + regroup`) for its
    /// workers to come back, and the counters. `read_curve` reads an
    /// unfinished job's curve up to its last report (finished jobs' curves
    /// are read on demand).
    pub fn recover(
        now: Instant,
        timeouts: crate::scheduler::Timeouts,
        records: Vec<JobRecord>,
        counters: Counters,
        read_curve: impl Fn(&Path) -> Vec<ringtrain_common::curve::MetricRow>,
    ) -> Self {
        let mut st = State::new(timeouts, counters);
        let regroup_until = now + timeouts.worker * 2;
        for r in records {
            let mut job = match crate::convert::job_from_record(&r) {
                Ok(job) => job,
                Err(e) => {
                    warn!(job = r.id, error = %e, "skipping a stored job that no longer parses");
                    continue;
                }
            };
            if !job.state.is_terminal() {
                // No ring survives a restart: wait for the workers, which keep
                // their state, to register again.
                job.state = match job.state {
                    JobState::Pending => JobState::Pending,
                    _ => {
                        job.regroup_until = Some(regroup_until);
                        JobState::Waiting
                    }
                };
                info!(job = %job.id, state = %job.state, step = job.step.0, "recovered job");
                job.history = read_curve(Path::new(&job.checkpoint_dir));
            }
            st.queue.push(job.id);
            st.jobs.insert(job.id, job);
        }
        st
    }
}
