//! Writes jobs' TensorBoard event files (format in
//! [`ringtrain_common::tensorboard`]) on one background thread, off the
//! state lock and the async runtime.
//!
//! The coordinator writes them, not a worker: it holds what a step means for
//! the whole ring (the loss is the mean over every member's samples, which no
//! single member knows), it sees the steps committed in order across ring
//! re-formations, and it already writes each job's `metrics.csv` there.
//!
//! Each job gets its own file, opened at its first scalar and kept open
//! until the job ends; a resumed job, or a coordinator restarted, opens a
//! new one in the same directory, and TensorBoard reads them in order as one
//! run. A file starts with a session START at its first step, as does a job
//! that goes back to an earlier step (a rollback to a checkpoint), so
//! TensorBoard drops what an earlier file or the abandoned steps left from
//! that step on and the curve follows the run that produced the parameters
//! (as `metrics.csv` does). Writes are buffered and flushed at most
//! [`FLUSH_EVERY`] after they were made, and when the job ends.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringtrain_common::tensorboard::EventWriter;
use ringtrain_common::JobId;

use crate::state::TensorBoardOp;

/// Longest a written scalar waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// Files kept open at once: past it, the least recently written is closed
/// (its job's next scalar opens a new file).
const MAX_OPEN: usize = 256;

/// An op and when it was made (the events' wall time).
type Request = (TensorBoardOp, f64);

/// One background thread that writes every job's scalars in the order asked.
/// Failures are logged once per job, which then writes no more scalars.
#[derive(Default)]
pub struct TensorBoardWriter {
    queue: Mutex<Option<(mpsc::Sender<Request>, JoinHandle<()>)>>,
}

impl TensorBoardWriter {
    pub fn submit(&self, op: TensorBoardOp) {
        let wall_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.is_none() {
            let (tx, rx) = mpsc::channel();
            match std::thread::Builder::new()
                .name("tensorboard".into())
                .spawn(move || write_loop(rx))
            {
                Ok(handle) => *queue = Some((tx, handle)),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the TensorBoard writer");
                    return;
                }
            }
        }
        if let Some((tx, _)) = queue.as_ref() {
            let _ = tx.send((op, wall_time));
        }
    }

    /// Writes and flushes what is queued and stops the thread (blocking; at
    /// shutdown). A later [`Self::submit`] starts a new one.
    pub fn finish(&self) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, handle)) = queue {
            drop(tx);
            let _ = handle.join();
        }
    }
}

struct Open {
    writer: EventWriter,
    last_write: Instant,
    dirty: bool,
}

#[derive(Default)]
struct Files {
    open: HashMap<JobId, Open>,
    /// Jobs whose file could not be written: no more tries until they end.
    failed: HashSet<JobId>,
}

impl Files {
    fn scalars(
        &mut self,
        job: JobId,
        dir: PathBuf,
        step: u64,
        values: &[(&str, f64)],
        restart: bool,
        wall_time: f64,
    ) {
        if self.failed.contains(&job) {
            return;
        }
        let opened = !self.open.contains_key(&job);
        if opened {
            if self.open.len() >= MAX_OPEN {
                self.close_oldest();
            }
            match EventWriter::create(&dir) {
                Ok(writer) => {
                    tracing::debug!(%job, file = %writer.path().display(), "TensorBoard event file opened");
                    self.open.insert(
                        job,
                        Open {
                            writer,
                            last_write: Instant::now(),
                            dirty: false,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(%job, dir = %dir.display(), error = %e, "could not create the job's TensorBoard event file; it gets no more scalars");
                    self.failed.insert(job);
                    return;
                }
            }
        }
        let Some(f) = self.open.get_mut(&job) else {
            return;
        };
        // TensorBoard stores float32.
        let values: Vec<(&str, f32)> = values.iter().map(|&(t, v)| (t, v as f32)).collect();
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let written = if opened || restart {
            f.writer.session_start(wall_time, step)
        } else {
            Ok(())
        };
        match written.and_then(|()| f.writer.scalars(wall_time, step, &values)) {
            Ok(()) => {
                f.dirty = true;
                f.last_write = Instant::now();
            }
            Err(e) => self.fail(job, &e),
        }
    }

    fn fail(&mut self, job: JobId, e: &std::io::Error) {
        if let Some(f) = self.open.remove(&job) {
            tracing::warn!(%job, file = %f.writer.path().display(), error = %e, "could not write the job's TensorBoard scalars; it gets no more");
        }
        self.failed.insert(job);
    }

    fn close(&mut self, job: JobId) {
        self.failed.remove(&job);
        if let Some(mut f) = self.open.remove(&job) {
            if let Err(e) = f.writer.flush() {
                tracing::warn!(%job, file = %f.writer.path().display(), error = %e, "could not write the job's TensorBoard scalars");
            }
        }
    }

    fn close_oldest(&mut self) {
        let oldest = self
            .open
            .iter()
            .min_by_key(|(_, f)| f.last_write)
            .map(|(&job, _)| job);
        if let Some(job) = oldest {
            self.close(job);
        }
    }

    fn flush_all(&mut self) {
        let mut failed = Vec::new();
        for (&job, f) in self.open.iter_mut().filter(|(_, f)| f.dirty) {
            match f.writer.flush() {
                Ok(()) => f.dirty = false,
                Err(e) => failed.push((job, e)),
            }
        }
        for (job, e) in failed {
            self.fail(job, &e);
        }
    }

    fn dirty(&self) -> bool {
        self.open.values().any(|f| f.dirty)
    }
}

fn write_loop(rx: mpsc::Receiver<Request>) {
    let mut files = Files::default();
    let mut last_flush = Instant::now();
    loop {
        let next = if files.dirty() {
            let wait = FLUSH_EVERY.saturating_sub(last_flush.elapsed());
            rx.recv_timeout(wait)
        } else {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        };
        match next {
            Ok((
                TensorBoardOp::Scalars {
                    job,
                    dir,
                    step,
                    values,
                    restart,
                },
                wall_time,
            )) => files.scalars(job, dir, step, &values, restart, wall_time),
            Ok((TensorBoardOp::Close { job }, _)) => files.close(job),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if files.dirty() && last_flush.elapsed() >= FLUSH_EVERY {
            files.flush_all();
            last_flush = Instant::now();
        }
    }
    files.flush_all();
}

#[cfg(test)]
mod tests {
    use ringtrain_common::tensorboard::{event_files, read_run};

    use super::*;

    /// (step, tag, value) as TensorBoard shows the directory.
    fn shown(dir: &std::path::Path) -> Vec<(i64, String, f32)> {
        read_run(dir)
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.step, s.tag, s.value))
            .collect()
    }

    fn op(job: u64, dir: &std::path::Path, step: u64, loss: f64, restart: bool) -> TensorBoardOp {
        TensorBoardOp::Scalars {
            job: JobId(job),
            dir: dir.to_path_buf(),
            step,
            values: vec![("loss", loss)],
            restart,
        }
    }

    fn loss(step: i64, value: f32) -> (i64, String, f32) {
        (step, "loss".into(), value)
    }

    #[test]
    fn scalars_are_flushed_within_the_interval_and_at_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let writer = TensorBoardWriter::default();
        writer.submit(op(1, &a, 1, 0.5, false));
        writer.submit(op(2, &b, 1, 2.0, false));
        writer.submit(op(1, &a, 2, 0.25, false));
        // Visible without the job ending, within the flush interval.
        let deadline = Instant::now() + FLUSH_EVERY * 3;
        while shown(&a).len() < 2 {
            assert!(Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(20));
        }
        writer.submit(TensorBoardOp::Close { job: JobId(1) });
        // A job that goes on after a close (a resumed one) gets a new file.
        writer.submit(op(1, &a, 3, 0.125, false));
        writer.finish();
        assert_eq!(event_files(&a).unwrap().len(), 2);
        assert_eq!(shown(&a), [loss(1, 0.5), loss(2, 0.25), loss(3, 0.125)]);
        assert_eq!(shown(&b), [loss(1, 2.0)]);
    }

    /// A job that goes back to an earlier step, in its file or in a new one,
    /// leaves the curve of the run that went on.
    #[test]
    fn a_rollback_replaces_the_steps_it_redoes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let writer = TensorBoardWriter::default();
        for step in 1..=4 {
            writer.submit(op(1, &dir, step, step as f64, false));
        }
        writer.submit(op(1, &dir, 3, 30.0, true));
        writer.submit(op(1, &dir, 4, 40.0, false));
        writer.submit(op(1, &dir, 5, 50.0, false));
        writer.submit(TensorBoardOp::Close { job: JobId(1) });
        // Resumed from an older checkpoint into the same directory.
        writer.submit(op(2, &dir, 2, 200.0, false));
        writer.finish();
        assert_eq!(shown(&dir), [loss(1, 1.0), loss(2, 200.0)]);
    }

    #[test]
    fn a_directory_that_cannot_be_made_fails_only_its_job() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"not a directory").unwrap();
        let good = tmp.path().join("good");
        let writer = TensorBoardWriter::default();
        writer.submit(op(1, &file.join("sub"), 1, 1.0, false));
        writer.submit(op(1, &file.join("sub"), 2, 1.0, false));
        writer.submit(op(2, &good, 1, 3.0, false));
        writer.finish();
        assert_eq!(shown(&good), [loss(1, 3.0)]);
    }
}
