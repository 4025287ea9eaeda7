//! The coordinator's job store: an embedded redb file, written
//! transactionally, so a killed and restarted coordinator forgets no job.
//!
//! Each job is one row (JSON of [`JobRecord`]); counters that must stay
//! monotonic across restarts (ring generations, worker ids) are in `meta`.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
#[error("job store {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
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
        let bytes = serde_json::to_vec(job).map_err(|e| self.err(e))?;
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            txn.set_durability(Durability::None)
                .map_err(|e| self.err(e))?;
        }
        {
            let mut jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            jobs.insert(job.id, bytes.as_slice())
                .map_err(|e| self.err(e))?;
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
}
