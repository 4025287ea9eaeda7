//! Applying the scheduler's pure decisions ([`crate::scheduler::decide`]):
//! forming, re-forming, pausing and growing rings, ending jobs.

use std::time::Instant;

use ringtrain_common::{JobId, JobState, RingGeneration, WorkerId};
use tracing::{info, warn};

use super::{
    Drain, Effects, EventKind, JobEvent, Observation, ReportRequest, State, TensorBoardOp,
};
use crate::scheduler::{decide, Decision};

impl State {
    /// Runs the scheduler and applies its decisions: on every registration,
    /// heartbeat, submission and report that can free or need workers, and
    /// on a periodic tick so lost workers are noticed when nobody calls.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        self.schedule(now, &mut fx);
        fx
    }

    pub(super) fn schedule(&mut self, now: Instant, fx: &mut Effects) {
        for decision in decide(now, self, self.timeouts) {
            match decision {
                Decision::WorkerLost { worker } => self.worker_lost(worker),
                Decision::Start { job, members } => {
                    self.form_ring(job, members, "running", fx);
                }
                Decision::Reform { job, members } => {
                    self.form_ring(job, members, "ring re-formed", fx);
                }
                Decision::Pause { job, survivors } => self.pause(job, survivors, fx),
                Decision::Drain { job, joiners } => self.drain(job, joiners),
            }
        }
        fx.observations.push(self.census());
    }

    fn census(&self) -> Observation {
        Observation::Census {
            workers_alive: self.workers.values().filter(|w| w.alive).count(),
            jobs: JobState::ALL
                .into_iter()
                .map(|s| (s, self.jobs.values().filter(|j| j.state == s).count()))
                .collect(),
        }
    }

    /// Queues an event for the job's watchers, with its status after it.
    pub(super) fn emit(&self, id: JobId, kind: EventKind, message: String, fx: &mut Effects) {
        if let Some(job) = self.jobs.get(&id) {
            fx.events.push(JobEvent {
                kind,
                message,
                job: job.snapshot(),
            });
        }
    }

    fn worker_lost(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.alive = false;
        w.job = None;
        let why = if w.replaced {
            "registered again"
        } else {
            "silent past its timeout"
        };
        warn!(worker = %id, addr = %w.grpc_addr, why, "worker lost");
    }

    /// Makes `members` the job's ring, as a new generation.
    pub(super) fn form_ring(
        &mut self,
        id: JobId,
        members: Vec<WorkerId>,
        why: &str,
        fx: &mut Effects,
    ) {
        self.counters.next_generation += 1;
        let generation = RingGeneration(self.counters.next_generation);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let old: Vec<WorkerId> = job
            .members
            .iter()
            .chain(job.drain.iter().flat_map(|d| d.joiners.iter()))
            .copied()
            .collect();
        job.state = JobState::Running;
        job.generation = generation;
        job.members = members.clone();
        job.suspects.clear();
        job.ring_failed = false;
        job.drain = None;
        job.regroup_until = None;
        job.tallies.clear();
        let world = members.len();
        let global = job.spec.global_batch(world);
        let names: Vec<String> = members.iter().map(|w| w.to_string()).collect();
        let starting = why == "running";
        if starting {
            info!(job = %id, %generation, workers = %names.join(","), global_batch = global, "job running");
        } else {
            warn!(job = %id, %generation, workers = %names.join(","), global_batch = global, step = %job.step, "ring re-formed");
        }
        for w in old {
            if let Some(w) = self.workers.get_mut(&w) {
                if w.job == Some(id) && !members.contains(&w.id) {
                    w.job = None;
                }
            }
        }
        for w in &members {
            if let Some(w) = self.workers.get_mut(w) {
                w.job = Some(id);
            }
        }
        let kind = if starting {
            EventKind::State
        } else {
            EventKind::Workers
        };
        let message = format!("{why}: {world} workers ({generation}), global batch {global}");
        self.emit(id, kind, message, fx);
        self.persist(id, true, fx);
    }

    fn pause(&mut self, id: JobId, survivors: Vec<WorkerId>, fx: &mut Effects) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let min = job.spec.min_workers();
        job.state = JobState::Waiting;
        job.members = survivors;
        job.suspects.clear();
        job.ring_failed = false;
        let alive = job.members.len();
        warn!(job = %id, alive, min_workers = min, "job waiting for workers");
        let message = format!("waiting: {alive} live workers, {min} needed");
        self.emit(id, EventKind::State, message, fx);
        self.persist(id, true, fx);
    }

    fn drain(&mut self, id: JobId, joiners: Vec<WorkerId>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let at_version = job.max_reported.max(job.step).next();
        info!(job = %id, joiners = joiners.len(), %at_version, "workers joining at the next step boundary");
        job.drain = Some(Drain {
            at_version,
            joiners: joiners.clone(),
            stopped: Default::default(),
        });
        for w in joiners {
            if let Some(w) = self.workers.get_mut(&w) {
                w.job = Some(id);
            }
        }
    }

    /// Moves a job to a terminal state and frees its workers.
    pub(super) fn end_job(&mut self, id: JobId, state: JobState, error: String, fx: &mut Effects) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        job.state = state;
        job.error = error;
        let mut members = std::mem::take(&mut job.members);
        members.extend(job.drain.take().map(|d| d.joiners).unwrap_or_default());
        match state {
            JobState::Failed => warn!(job = %id, error = %job.error, "job failed"),
            _ => info!(job = %id, %state, step = %job.step, "job ended"),
        }
        let message = if job.error.is_empty() {
            state.to_string()
        } else {
            job.error.clone()
        };
        for w in members {
            if let Some(w) = self.workers.get_mut(&w) {
                if w.job == Some(id) {
                    w.job = None;
                }
            }
        }
        self.report_later(id, fx);
        fx.tensorboard.push(TensorBoardOp::Close { job: id });
        self.emit(id, EventKind::State, message, fx);
        self.persist(id, true, fx);
    }

    /// Asks for the job's metrics.csv and metrics.png (next to its checkpoints).
    pub(super) fn report_later(&self, id: JobId, fx: &mut Effects) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.history.is_empty() || job.checkpoint_dir.is_empty() {
            return;
        }
        fx.reports.push(ReportRequest {
            dir: job.checkpoint_dir.clone().into(),
            title: job.report_title(),
            rows: job.history.clone(),
        });
    }
}
