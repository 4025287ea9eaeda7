//! Workers joining, heartbeating, and learning what to do.

use std::path::PathBuf;
use std::time::Instant;

use ringtrain_common::wire::TransportKind;
use ringtrain_common::worker_api::{Assignment, Registration};
use ringtrain_common::{JobState, ParamVersion, Rank, WorkerId};
use tracing::info;

use super::{Effects, PersistOp, State, StateError, Worker};

/// The coordinator's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub enum HeartbeatReply {
    /// Be in this ring (or idle, with None).
    Assignment(Option<Box<Assignment>>),
    /// This coordinator does not know the worker (it restarted, or declared
    /// the worker lost): register again under a new id.
    Unknown,
}

impl State {
    /// A new worker, idle until the scheduler gives it a job. The id counter
    /// is persisted before the worker learns its id, so a restarted
    /// coordinator never hands the same id to another worker. A worker
    /// registering at the addresses of a known one replaces it (it
    /// restarted); at most `limits.max_workers` are kept, lost ones making
    /// room first.
    pub fn register_worker(
        &mut self,
        now: Instant,
        r: Registration,
    ) -> Result<(WorkerId, Effects), StateError> {
        for w in self.workers.values_mut() {
            if w.alive && w.grpc_addr == r.grpc_addr && w.ring_addr == r.ring_addr {
                info!(worker = %w.id, grpc = %r.grpc_addr, "registered again: the old registration is lost");
                w.replaced = true;
            }
        }
        let mut fx = Effects::default();
        // Replaced workers leave their rings before the new one counts.
        self.schedule(now, &mut fx);
        if self.workers.len() >= self.limits.max_workers {
            self.forget_lost_workers(now, self.workers.len() + 1 - self.limits.max_workers);
        }
        if self.workers.len() >= self.limits.max_workers {
            return Err(StateError::TooManyWorkers(self.workers.len()));
        }
        self.counters.next_worker += 1;
        let id = WorkerId(self.counters.next_worker);
        info!(worker = %id, grpc = %r.grpc_addr, ring = %r.ring_addr, host = %r.hostname, pid = r.pid, "worker registered");
        self.workers.insert(
            id,
            Worker {
                id,
                replaced: false,
                grpc_addr: r.grpc_addr,
                ring_addr: r.ring_addr,
                last_heartbeat: now,
                alive: true,
                job: None,
                last_step: ParamVersion(0),
                samples_per_s: 0.0,
            },
        );
        fx.persist.push(PersistOp {
            record: None,
            counters: self.counters,
            durable: true,
        });
        self.schedule(now, &mut fx);
        Ok((id, fx))
    }

    /// Records a sign of life and answers with the worker's assignment.
    pub fn heartbeat(&mut self, now: Instant, id: WorkerId) -> (HeartbeatReply, Effects) {
        let mut fx = Effects::default();
        match self.workers.get_mut(&id) {
            // A worker declared lost must come back under a new identity, so
            // nothing it says for its old ring is trusted.
            Some(w) if w.alive => w.last_heartbeat = now,
            _ => return (HeartbeatReply::Unknown, fx),
        }
        self.schedule(now, &mut fx);
        (
            HeartbeatReply::Assignment(self.assignment(id).map(Box::new)),
            fx,
        )
    }

    /// Where a dry run of a submission can go: an idle live worker's gRPC
    /// address, else any live worker's.
    pub fn dry_run_target(&self) -> Option<String> {
        let alive = || self.workers.values().filter(|w| w.alive);
        alive()
            .find(|w| w.job.is_none())
            .or_else(|| alive().next())
            .map(|w| w.grpc_addr.clone())
    }

    /// The ring the worker should be in now, if any.
    pub fn assignment(&self, worker: WorkerId) -> Option<Assignment> {
        let job = self.jobs.get(&self.workers.get(&worker)?.job?)?;
        if job.state != JobState::Running {
            return None;
        }
        let rank = job.rank_of(worker)?;
        let grpc = job.spec.ring.transport == TransportKind::Grpc;
        let members = job
            .members
            .iter()
            .map(|w| {
                self.workers
                    .get(w)
                    .map(|w| {
                        if grpc {
                            w.grpc_addr.clone()
                        } else {
                            w.ring_addr.clone()
                        }
                    })
                    .unwrap_or_default()
            })
            .collect();
        let resume = job.resume_source();
        Some(Assignment {
            job: job.id,
            generation: job.generation,
            rank: Rank(rank as u32),
            members,
            spec: job.spec.clone(),
            resume_from: (!resume.is_empty()).then(|| PathBuf::from(resume)),
            checkpoint_dir: PathBuf::from(&job.checkpoint_dir),
            ring_key: self.ring_keys.for_ring(job.id, job.generation),
        })
    }
}
