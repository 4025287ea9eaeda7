//! The coordinator's job store: an embedded redb file, written
//! transactionally, so a killed and restarted coordinator forgets no job.
//!
//! Each job is one row (JSON of [`JobRecord`]); counters that must stay
//! monotonic across restarts (ring generations, worker ids) are in `meta`.
//!
//! All writes go through one [`StoreWriter`] thread, in the order they were
//! asked for, so no disk I/O happens under the coordinator's state lock or on
//! its async runtime. Writes that queue up while it is busy share one
//! transaction (group commit).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, Clone, thiserror::Error)]
#[error("job store {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
}

impl StoreError {
    pub fn new(path: &Path, e: impl std::fmt::Display) -> Self {
        Self {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// What survives a restart of one job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub id: u64,
    pub spec_toml: String,
    pub resume_from: String,
    pub checkpoint_dir: String,
    pub checkpoint_version: Option<u64>,
    /// pending, running, waiting, succeeded, failed, cancelled
    pub state: String,
    pub error: String,
    pub submitted_unix_s: f64,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    /// None before the first step (JSON has no NaN).
    pub loss: Option<f64>,
    pub eval: Option<(f64, f64)>,
    /// Records written before it existed read as 0.
    #[serde(default)]
    pub skipped_steps: u64,
    /// The submitting principal (absent in stores written before tokens).
    #[serde(default)]
    pub owner: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub next_generation: u64,
    pub next_worker: u64,
}

pub struct Store {
    db: Database,
    path: String,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        let err = |message: String| StoreError {
            path: p.clone(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| err(e.to_string()))?;
        let store = Self {
            db,
            path: p.clone(),
        };
        // Create the tables so a fresh store reads as empty.
        let txn = store.db.begin_write().map_err(|e| err(e.to_string()))?;
        txn.open_table(JOBS).map_err(|e| err(e.to_string()))?;
        txn.open_table(META).map_err(|e| err(e.to_string()))?;
        txn.commit().map_err(|e| err(e.to_string()))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Writes a job and the counters in one transaction. `durable` = wait for
    /// fsync (state changes); progress updates may be eventual.
    pub fn put(
        &self,
        job: &JobRecord,
        counters: Counters,
        durable: bool,
    ) -> Result<(), StoreError> {
        self.put_batch(std::slice::from_ref(job), counters, durable)
    }

    /// Writes jobs and the counters in one transaction.
    pub fn put_batch(
        &self,
        jobs: &[JobRecord],
        counters: Counters,
        durable: bool,
    ) -> Result<(), StoreError> {
        self.apply(jobs, &[], counters, durable)
    }

    /// Writes jobs, deletes the jobs `forget`, and writes the counters, in
    /// one transaction.
    pub fn apply(
        &self,
        jobs: &[JobRecord],
        forget: &[u64],
        counters: Counters,
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            txn.set_durability(Durability::None)
                .map_err(|e| self.err(e))?;
        }
        {
            let mut table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            for job in jobs {
                let bytes = serde_json::to_vec(job).map_err(|e| self.err(e))?;
                table
                    .insert(job.id, bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            for id in forget {
                table.remove(*id).map_err(|e| self.err(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("next_generation", counters.next_generation)
                .map_err(|e| self.err(e))?;
            meta.insert("next_worker", counters.next_worker)
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Every job in submission order, and the counters.
    pub fn load(&self) -> Result<(Vec<JobRecord>, Counters), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in jobs.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            let rec: JobRecord = serde_json::from_slice(v.value()).map_err(|e| self.err(e))?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.submitted_unix_s.total_cmp(&b.submitted_unix_s));
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let get = |k: &str| -> Result<u64, StoreError> {
            Ok(meta
                .get(k)
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let counters = Counters {
            next_generation: get("next_generation")?,
            next_worker: get("next_worker")?,
        };
        Ok((out, counters))
    }
}

/// The answer to a durable write: Ok once it is on disk.
pub type Durable = oneshot::Receiver<Result<(), StoreError>>;

struct Write {
    record: Option<JobRecord>,
    /// Jobs to delete (job retention).
    forget: Vec<u64>,
    counters: Counters,
    durable: bool,
    ack: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// The one thread that writes to the [`Store`].
pub struct StoreWriter {
    queue: Mutex<Option<(mpsc::Sender<Write>, JoinHandle<()>)>>,
}

impl StoreWriter {
    pub fn start(store: Store) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("job-store".into())
            .spawn(move || write_loop(&store, rx))?;
        Ok(Self {
            queue: Mutex::new(Some((tx, handle))),
        })
    }

    /// Queues a write (`record: None` writes only the counters). A durable
    /// write returns the receiver that says when it is on disk.
    pub fn write(
        &self,
        record: Option<JobRecord>,
        counters: Counters,
        durable: bool,
    ) -> Option<Durable> {
        let (ack, done) = if durable {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let sent = queue.as_ref().is_some_and(|(tx, _)| {
            tx.send(Write {
                record,
                forget: Vec::new(),
                counters,
                durable,
                ack,
            })
            .is_ok()
        });
        if !sent {
            tracing::warn!("job store writer stopped; a write was dropped");
        }
        done
    }

    /// Queues deleting the jobs `forget` (not waited for: a job that comes
    /// back after a crash is forgotten again).
    pub fn forget(&self, forget: Vec<u64>, counters: Counters) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tx, _)) = queue.as_ref() {
            let _ = tx.send(Write {
                record: None,
                forget,
                counters,
                durable: false,
                ack: None,
            });
        }
    }

    /// Writes what is queued and stops the thread (blocking; at shutdown).
    pub fn finish(&self) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, handle)) = queue {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn write_loop(store: &Store, rx: mpsc::Receiver<Write>) {
    let mut unflushed = None;
    while let Ok(first) = rx.recv() {
        let batch: Vec<Write> = std::iter::once(first).chain(rx.try_iter()).collect();
        // The newest record of each job; the newest counters.
        let mut newest: HashMap<u64, usize> = HashMap::new();
        for (i, w) in batch.iter().enumerate() {
            if let Some(r) = &w.record {
                newest.insert(r.id, i);
            }
        }
        let mut order: Vec<usize> = newest.into_values().collect();
        order.sort_unstable();
        let records: Vec<JobRecord> = order
            .iter()
            .filter_map(|&i| batch[i].record.clone())
            .collect();
        let forget: Vec<u64> = batch
            .iter()
            .flat_map(|w| w.forget.iter().copied())
            .collect();
        // A job is forgotten only once it has ended: no record of it follows.
        let records: Vec<JobRecord> = records
            .into_iter()
            .filter(|r| !forget.contains(&r.id))
            .collect();
        let counters = batch.last().map(|w| w.counters).unwrap_or_default();
        let durable = batch.iter().any(|w| w.durable);
        let result = store.apply(&records, &forget, counters, durable);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "could not persist jobs");
        }
        unflushed = (!durable).then_some(counters);
        for ack in batch.into_iter().filter_map(|w| w.ack) {
            let _ = ack.send(result.clone());
        }
    }
    // Stopping: progress written lazily goes to disk now.
    if let Some(counters) = unflushed {
        if let Err(e) = store.put_batch(&[], counters, true) {
            tracing::warn!(error = %e, "could not flush the job store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, state: &str) -> JobRecord {
        JobRecord {
            id,
            spec_toml: "name = 'x'".into(),
            resume_from: String::new(),
            checkpoint_dir: "/ckpt".into(),
            checkpoint_version: Some(40),
            state: state.into(),
            error: String::new(),
            submitted_unix_s: id as f64,
            step: 42,
            total_steps: 100,
            epoch: 0,
            loss: Some(0.5),
            eval: Some((0.8, 0.4)),
            skipped_steps: 0,
            owner: "alice".into(),
        }
    }

    #[test]
    fn jobs_and_counters_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let counters = Counters {
            next_generation: 7,
            next_worker: 12,
        };
        {
            let store = Store::open(&path).unwrap();
            store.put(&record(2, "running"), counters, true).unwrap();
            store.put(&record(1, "pending"), counters, false).unwrap();
            store.put(&record(2, "waiting"), counters, true).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let (jobs, c) = store.load().unwrap();
        assert_eq!(c, counters);
        assert_eq!(jobs, vec![record(1, "pending"), record(2, "waiting")]);
    }

    #[test]
    fn an_unwritable_store_is_a_clear_error() {
        let err = Store::open(Path::new("/proc/no/such/dir/jobs.redb"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("job store /proc/no/such/dir/jobs.redb:"),
            "{err}"
        );
    }

    #[test]
    fn the_writer_writes_in_order_and_acknowledges_durable_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let counters = |n| Counters {
            next_generation: n,
            next_worker: n,
        };
        {
            let writer = StoreWriter::start(Store::open(&path).unwrap()).unwrap();
            assert!(writer
                .write(Some(record(1, "pending")), counters(1), false)
                .is_none());
            writer.write(Some(record(1, "running")), counters(2), false);
            writer.write(None, counters(3), false);
            let done = writer
                .write(Some(record(2, "pending")), counters(4), true)
                .expect("a durable write is acknowledged");
            assert!(done.blocking_recv().unwrap().is_ok());
            writer.write(Some(record(1, "succeeded")), counters(5), false);
            writer.finish();
        }
        let (jobs, c) = Store::open(&path).unwrap().load().unwrap();
        assert_eq!(c, counters(5));
        assert_eq!(jobs, vec![record(1, "succeeded"), record(2, "pending")]);
    }
}
