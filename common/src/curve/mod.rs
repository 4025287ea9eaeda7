//! A job's training curve: rows of (step, loss, throughput, evaluation),
//! kept by the coordinator (bounded, see [`push_step`]), written as
//! `metrics.csv` and drawn as `metrics.png` ([`render`]) next to its
//! checkpoints, and fetched and drawn by `ringtrain plot`.

pub mod render;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use render::render_png;

/// One completed step; the evaluation taken after it, if any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricRow {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub samples_per_s: f64,
    pub workers: u32,
    /// (test accuracy, test loss)
    pub eval: Option<(f64, f64)>,
    /// (earliest member's start, latest member's end) of the step, in
    /// Unix seconds: the fair clock for throughput over a span of steps.
    pub wall: Option<(f64, f64)>,
}

/// Rows kept per job. Past it the history is thinned (see [`push_step`]), so a
/// job of a million steps holds at most this many rows, and its curve keeps
/// its shape: the first row, every recent row and, while they are sparse
/// enough, every evaluation survive.
pub const MAX_ROWS: usize = 20_000;

/// Appends the row of a completed step. A step at or below the last row's
/// (the job rolled back to a checkpoint and is redoing steps) first drops the
/// rows from that step on, so the curve follows the run that produced the
/// parameters; an evaluation-only row of the same step (see [`record_eval`])
/// is merged instead.
pub fn push_step(rows: &mut Vec<MetricRow>, row: MetricRow) {
    if let Some(last) = rows.last_mut() {
        if last.step == row.step && !last.loss.is_finite() {
            *last = MetricRow {
                eval: row.eval.or(last.eval),
                ..row
            };
            return;
        }
        if last.step >= row.step {
            let keep = rows.partition_point(|r| r.step < row.step);
            rows.truncate(keep);
        }
    }
    rows.push(row);
    if rows.len() > MAX_ROWS {
        thin(rows);
    }
}

/// Drops every other row of the older half of the rows without an
/// evaluation, keeping the first; where rows with an evaluation are the more
/// numerous (an evaluation every step or two), of those instead. The kind
/// thinned is at least half the rows, so at least an eighth go: thinning runs
/// at most once every `MAX_ROWS / 8` steps (amortised O(1) per step), and the
/// older a part of the curve, the coarser it gets.
fn thin(rows: &mut Vec<MetricRow>) {
    let evals = rows.iter().filter(|r| r.eval.is_some()).count();
    let thin_evals = evals * 2 > rows.len();
    let of_kind = |r: &MetricRow| r.eval.is_some() == thin_evals;
    let half = rows.iter().filter(|r| of_kind(r)).count() / 2;
    let mut i = 0;
    rows.retain(|r| {
        if !of_kind(r) {
            return true;
        }
        i += 1;
        i == 1 || i > half || i % 2 == 0
    });
}

/// Records an evaluation on the row of its step, or on a new row in step
/// order when that step has none (yet).
pub fn record_eval(rows: &mut Vec<MetricRow>, step: u64, accuracy: f64, loss: f64) {
    // Evaluations follow their step: search from the end.
    let at = rows.len() - rows.iter().rev().take_while(|r| r.step > step).count();
    if let Some(r) = at.checked_sub(1).and_then(|i| rows.get_mut(i)) {
        if r.step == step {
            r.eval = Some((accuracy, loss));
            return;
        }
    }
    rows.insert(
        at,
        MetricRow {
            step,
            eval: Some((accuracy, loss)),
            loss: f64::NAN,
            ..MetricRow::default()
        },
    );
    if rows.len() > MAX_ROWS {
        thin(rows);
    }
}

/// The CSV header, also what [`from_csv`] expects.
pub const CSV_HEADER: &str = "step,epoch,loss,samples_per_s,workers,test_accuracy,test_loss";

pub fn to_csv(rows: &[MetricRow]) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    for r in rows {
        let (acc, tl) = match r.eval {
            Some((a, l)) => (a.to_string(), l.to_string()),
            None => (String::new(), String::new()),
        };
        let loss = if r.loss.is_finite() {
            r.loss.to_string()
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{},{},{loss},{},{},{acc},{tl}",
            r.step, r.epoch, r.samples_per_s, r.workers
        );
    }
    out
}

/// Reads what [`to_csv`] wrote (a coordinator restarting picks a job's curve
/// up from its `metrics.csv`). Lines that do not parse are skipped.
pub fn from_csv(text: &str) -> Vec<MetricRow> {
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| *l != CSV_HEADER) {
        let f: Vec<&str> = line.split(',').collect();
        let [step, epoch, loss, sps, workers, acc, tl] = f[..] else {
            continue;
        };
        let (Ok(step), Ok(epoch), Ok(samples_per_s), Ok(workers)) =
            (step.parse(), epoch.parse(), sps.parse(), workers.parse())
        else {
            continue;
        };
        let eval = acc.parse().ok().zip(tl.parse().ok());
        let row = MetricRow {
            step,
            epoch,
            loss: loss.parse().unwrap_or(f64::NAN),
            samples_per_s,
            workers,
            eval,
            wall: None,
        };
        if !row.loss.is_finite() && row.eval.is_none() {
            continue;
        }
        if rows.last().is_some_and(|l: &MetricRow| l.step >= row.step) {
            continue;
        }
        rows.push(row);
    }
    rows
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {message}")]
    Write { path: String, message: String },
    #[error("no steps to plot yet")]
    Empty,
}

pub(crate) fn write_err(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A hidden sibling of `path` to write into before renaming it over `path`,
/// so nobody reads a half-written file. It ends in `.png` when `path` is a
/// PNG to be: the encoder picks the format by extension.
pub(crate) fn temp_beside(path: &Path, png: bool) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = if png { ".png" } else { "" };
    path.with_file_name(format!(".{name}.{}.tmp{ext}", std::process::id()))
}

pub(crate) fn replace_with(tmp: &Path, path: &Path) -> Result<(), ReportError> {
    std::fs::rename(tmp, path).map_err(|x| {
        let _ = std::fs::remove_file(tmp);
        write_err(path, x)
    })
}

/// Writes `text` to `path` atomically (a temporary file renamed over it).
pub fn write_atomically(path: &Path, text: &str) -> Result<(), ReportError> {
    let tmp = temp_beside(path, false);
    std::fs::write(&tmp, text).map_err(|x| write_err(path, x))?;
    replace_with(&tmp, path)
}

/// Writes `metrics.csv` and `metrics.png` into `dir` (created if missing),
/// each replaced atomically.
pub fn write_report(dir: &Path, title: &str, rows: &[MetricRow]) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|x| write_err(dir, x))?;
    write_atomically(&dir.join("metrics.csv"), &to_csv(rows))?;
    render_png(&dir.join("metrics.png"), title, rows)
}

/// The curve a job left in `dir` (its `metrics.csv`), if any.
pub fn read_report(dir: &Path) -> Vec<MetricRow> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .map(|t| from_csv(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u64) -> Vec<MetricRow> {
        let mut rows = Vec::new();
        for step in 1..=n {
            push_step(
                &mut rows,
                MetricRow {
                    step,
                    epoch: 0,
                    loss: 2.0 / step as f64,
                    samples_per_s: 1000.0,
                    workers: 2,
                    eval: None,
                    wall: None,
                },
            );
            if step % 10 == 0 {
                record_eval(&mut rows, step, 0.5 + step as f64 / 100.0, 0.4);
            }
        }
        rows
    }

    #[test]
    fn csv_has_a_row_per_step_and_evaluations_on_their_step() {
        let csv = to_csv(&rows(30));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "step,epoch,loss,samples_per_s,workers,test_accuracy,test_loss"
        );
        assert_eq!(lines.len(), 31);
        assert_eq!(lines[1], "1,0,2,1000,2,,");
        assert_eq!(lines[10], "10,0,0.2,1000,2,0.6,0.4");
    }

    #[test]
    fn long_histories_are_thinned_but_keep_evaluations_and_recent_steps() {
        let rows = rows(50_000);
        assert!(rows.len() <= MAX_ROWS, "{}", rows.len());
        assert_eq!(rows.iter().filter(|r| r.eval.is_some()).count(), 5_000);
        assert_eq!(rows.first().map(|r| r.step), Some(1));
        assert_eq!(rows.last().map(|r| r.step), Some(50_000));
        assert!(rows.windows(2).all(|w| w[0].step < w[1].step));
        // The newest steps are all there.
        assert!(rows.iter().rev().take(5_000).all(|r| r.step > 45_000));
    }

    #[test]
    fn an_evaluation_every_step_is_thinned_too() {
        let mut rows = Vec::new();
        for step in 1..=1_000_000u64 {
            push_step(
                &mut rows,
                MetricRow {
                    step,
                    loss: 1.0,
                    ..MetricRow::default()
                },
            );
            record_eval(&mut rows, step, 0.5, 0.5);
        }
        assert!(rows.len() <= MAX_ROWS, "{}", rows.len());
        assert!(rows.len() > MAX_ROWS / 2, "{}", rows.len());
        assert_eq!(rows.first().map(|r| r.step), Some(1));
        assert_eq!(rows.last().map(|r| r.step), Some(1_000_000));
        assert!(rows.windows(2).all(|w| w[0].step < w[1].step));
    }

    #[test]
    fn a_rollback_drops_the_abandoned_steps_and_an_early_evaluation_is_merged() {
        let mut rows = rows(30);
        let step = |step, loss| MetricRow {
            step,
            loss,
            ..MetricRow::default()
        };
        // Back to the checkpoint of step 20: steps 21.. are redone.
        push_step(&mut rows, step(21, 9.0));
        assert_eq!(rows.len(), 21);
        assert_eq!(rows[20].loss, 9.0);
        assert!(rows[19].eval.is_some(), "the evaluation at 20 stays");
        // An evaluation ahead of its step's row, then the row.
        record_eval(&mut rows, 22, 0.7, 0.3);
        push_step(&mut rows, step(22, 8.0));
        assert_eq!(rows.len(), 22);
        assert_eq!(rows[21].loss, 8.0);
        assert_eq!(rows[21].eval, Some((0.7, 0.3)));
        // An evaluation of an older step lands in step order.
        let mut sparse = vec![step(5, 1.0), step(9, 1.0)];
        record_eval(&mut sparse, 7, 0.5, 0.5);
        let steps: Vec<u64> = sparse.iter().map(|r| r.step).collect();
        assert_eq!(steps, [5, 7, 9]);
    }

    #[test]
    fn the_csv_reads_back() {
        let mut rows = rows(30);
        rows.push(MetricRow {
            step: 31,
            loss: f64::NAN,
            eval: Some((0.9, 0.1)),
            ..MetricRow::default()
        });
        let back = from_csv(&to_csv(&rows));
        assert_eq!(to_csv(&back), to_csv(&rows));
        assert_eq!(back.len(), 31);
        assert!(from_csv("garbage\n1,2\n").is_empty());
    }

    #[test]
    fn the_report_is_a_csv_and_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job/checkpoint");
        write_report(&job, "test job", &rows(30)).unwrap();
        let png = std::fs::read(job.join("metrics.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000);
        assert_eq!(read_report(&job), rows(30));
        assert!(matches!(
            render_png(&dir.path().join("x.png"), "t", &[]),
            Err(ReportError::Empty)
        ));
        // Any name: the output is a PNG all the same, and no temporary is left.
        render_png(&dir.path().join("curve"), "t", &rows(3)).unwrap();
        let png = std::fs::read(dir.path().join("curve")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }
}
