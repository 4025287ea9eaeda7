//! Writes jobs' `metrics.csv` and `metrics.png` (see
//! [`ringtrain_common::curve`]) on one background thread, off the state lock
//! and the async runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

use ringtrain_common::curve::{write_report, MetricRow};

struct Request {
    dir: PathBuf,
    title: String,
    rows: Vec<MetricRow>,
}

/// One background thread that writes job reports in the order asked, off the
/// caller's locks and async runtime. Requests for a directory that queue up
/// while it is busy are coalesced to the newest. Failures are logged.
#[derive(Default)]
pub struct ReportWriter {
    queue: Mutex<Option<(mpsc::Sender<Request>, JoinHandle<()>)>>,
}

impl ReportWriter {
    /// Queues writing `rows` as `dir/metrics.csv` and `dir/metrics.png`.
    pub fn submit(&self, dir: PathBuf, title: String, rows: Vec<MetricRow>) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.is_none() {
            let (tx, rx) = mpsc::channel();
            match std::thread::Builder::new()
                .name("metrics-report".into())
                .spawn(move || write_loop(rx))
            {
                Ok(handle) => *queue = Some((tx, handle)),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the metrics report writer");
                    return;
                }
            }
        }
        if let Some((tx, _)) = queue.as_ref() {
            let _ = tx.send(Request { dir, title, rows });
        }
    }

    /// Writes what is queued and stops the thread (blocking; at shutdown).
    /// A later [`Self::submit`] starts a new one.
    pub fn finish(&self) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, handle)) = queue {
            drop(tx);
            let _ = handle.join();
        }
    }
}

fn write_loop(rx: mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // Newest request per directory, in the order they were asked.
        let mut newest: HashMap<PathBuf, usize> = HashMap::new();
        for (i, r) in batch.iter().enumerate() {
            newest.insert(r.dir.clone(), i);
        }
        for (i, r) in batch.iter().enumerate() {
            if newest.get(&r.dir) != Some(&i) {
                continue;
            }
            if let Err(e) = write_report(&r.dir, &r.title, &r.rows) {
                tracing::warn!(error = %e, "could not write the job's metrics report");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ringtrain_common::curve::read_report;

    use super::*;

    fn rows(n: u64) -> Vec<MetricRow> {
        (1..=n)
            .map(|step| MetricRow {
                step,
                loss: 1.0 / step as f64,
                ..MetricRow::default()
            })
            .collect()
    }

    #[test]
    fn the_writer_writes_the_newest_report_of_each_job() {
        let dir = tempfile::tempdir().unwrap();
        let writer = ReportWriter::default();
        for n in [10, 20, 30] {
            writer.submit(dir.path().join("a"), "a".into(), rows(n));
        }
        writer.submit(dir.path().join("b"), "b".into(), rows(5));
        writer.finish();
        assert_eq!(read_report(&dir.path().join("a")).len(), 30);
        assert_eq!(read_report(&dir.path().join("b")).len(), 5);
        assert!(dir.path().join("b/metrics.png").is_file());
    }
}
