//! Applies the [`Effects`] of state changes, in the order the changes were
//! made, after the state lock is released: events to each job's watchers,
//! records to the store's writer thread, observations to the metrics, curves
//! to the report writer, scalars to the TensorBoard writer.
//!
//! Ordering: a handler takes the outbox lock before it releases the state
//! lock (hand over hand), so effects are published in the order their
//! changes happened, and a watcher that subscribes while holding both sees
//! every event after its snapshot and none before.

use std::collections::HashMap;

use ringtrain_common::metrics::Metrics;
use ringtrain_common::JobId;
use tokio::sync::broadcast;

use crate::report::ReportWriter;
use crate::state::{Effects, JobEvent};
use crate::store::{Durable, StoreWriter};
use crate::tensorboard::TensorBoardWriter;

/// Events a slow watcher may fall behind by before it skips to a snapshot.
const WATCH_BACKLOG: usize = 1024;

/// Where effects go.
pub struct Sinks {
    pub metrics: Metrics,
    pub store: StoreWriter,
    pub reports: ReportWriter,
    pub tensorboard: TensorBoardWriter,
}

#[derive(Default)]
pub struct Outbox {
    watchers: HashMap<JobId, broadcast::Sender<JobEvent>>,
}

impl Outbox {
    /// Publishes `fx`; returns the store's acknowledgements of its durable
    /// writes, for the caller to await before it answers.
    pub fn publish(&mut self, fx: Effects, sinks: &Sinks) -> Vec<Durable> {
        let mut durable = Vec::new();
        let mut counters = None;
        for op in fx.persist {
            counters = Some(op.counters);
            durable.extend(sinks.store.write(op.record, op.counters, op.durable));
        }
        for id in &fx.forgotten {
            self.watchers.remove(id);
        }
        // The state sends its counters along with what it forgets.
        if let (false, Some(counters)) = (fx.forgotten.is_empty(), counters) {
            let ids = fx.forgotten.iter().map(|id| id.0).collect();
            sinks.store.forget(ids, counters);
        }
        for event in fx.events {
            let id = event.job.id;
            let ended = event.job.state.is_terminal();
            if let Some(tx) = self.watchers.get(&id) {
                // No receivers is fine: nobody is watching.
                let _ = tx.send(event);
            }
            if ended {
                // Watchers end with this event; later ones see a terminal snapshot.
                self.watchers.remove(&id);
            }
        }
        for observation in &fx.observations {
            crate::metrics::record(&sinks.metrics, observation);
        }
        for r in fx.reports {
            sinks.reports.submit(r.dir, r.title, r.rows);
        }
        for op in fx.tensorboard {
            sinks.tensorboard.submit(op);
        }
        durable
    }

    /// The events of `job` published from now on.
    pub fn subscribe(&mut self, job: JobId) -> broadcast::Receiver<JobEvent> {
        self.watchers
            .entry(job)
            .or_insert_with(|| broadcast::channel(WATCH_BACKLOG).0)
            .subscribe()
    }
}
