//! Forgetting what peers made the coordinator remember: lost workers after
//! a while, finished jobs past the retention (count and age), so memory,
//! the job store and `ListJobs` stay bounded however long it runs.

use std::collections::HashSet;
use std::time::{Instant, SystemTime};

use ringtrain_common::jobspec::ModelSource;
use ringtrain_common::JobId;
use tracing::info;

use super::{Effects, PersistOp, State};

impl State {
    /// Forgets the `at_least` longest-lost workers now, and every worker
    /// lost for longer than `limits.forget_lost_workers`.
    pub(super) fn forget_lost_workers(&mut self, now: Instant, at_least: usize) {
        let mut lost: Vec<_> = self
            .workers
            .values()
            .filter(|w| !w.alive)
            .map(|w| (w.last_heartbeat, w.id))
            .collect();
        lost.sort();
        for (i, (last, id)) in lost.into_iter().enumerate() {
            if i < at_least || now.saturating_duration_since(last) > self.limits.forget_lost_workers
            {
                self.workers.remove(&id);
            }
        }
    }

    /// Forgets lost workers past their time and finished jobs past the
    /// retention (`wall` is the wall clock, against jobs' submission time).
    /// Forgotten jobs go from the store too (see [`Effects::forgotten`]).
    pub fn forget_expired(&mut self, now: Instant, wall: SystemTime) -> Effects {
        self.forget_lost_workers(now, 0);
        let mut fx = Effects::default();
        let finished: Vec<JobId> = self
            .queue
            .iter()
            .filter(|id| self.jobs.get(id).is_some_and(|j| j.state.is_terminal()))
            .copied()
            .collect();
        let over = finished
            .len()
            .saturating_sub(self.limits.keep_finished_jobs);
        for (i, id) in finished.into_iter().enumerate() {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let age = wall.duration_since(job.submitted).unwrap_or_default();
            if i < over || age > self.limits.keep_finished_for {
                info!(job = %id, name = %ringtrain_common::quote(&job.spec.name), "finished job forgotten (job_retention)");
                self.jobs.remove(&id);
                fx.forgotten.push(id);
            }
        }
        if !fx.forgotten.is_empty() {
            let gone: HashSet<JobId> = fx.forgotten.iter().copied().collect();
            self.queue.retain(|id| !gone.contains(id));
            fx.persist.push(PersistOp {
                record: None,
                counters: self.counters,
                durable: false,
            });
        }
        fx
    }

    /// The uploaded models some remembered job names.
    pub fn models_in_use(&self) -> HashSet<String> {
        self.jobs
            .values()
            .filter_map(|j| match &j.spec.model {
                ModelSource::ScriptBlob(b) => Some(b.to_string()),
                _ => None,
            })
            .collect()
    }
}
