//! A job's training curve: rows of (step, loss, throughput, evaluation),
//! written as `metrics.csv` and drawn as `metrics.png` next to its
//! checkpoints, and by `ringtrain plot`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

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
}

/// Rows kept per job; past it, every other step row of the older half is
/// dropped (evaluations are always kept), so a long job's curve keeps its shape
/// in bounded memory.
pub const MAX_ROWS: usize = 20_000;

/// Appends a step row, thinning the history when it grows past [`MAX_ROWS`].
pub fn push_step(rows: &mut Vec<MetricRow>, row: MetricRow) {
    rows.push(row);
    if rows.len() > MAX_ROWS {
        let half = rows.len() / 2;
        let mut i = 0;
        rows.retain(|r| {
            i += 1;
            i > half || r.eval.is_some() || i % 2 == 0
        });
    }
}

/// Records an evaluation on the row of its step (or a new row).
pub fn record_eval(rows: &mut Vec<MetricRow>, step: u64, accuracy: f64, loss: f64) {
    match rows.iter_mut().rev().find(|r| r.step == step) {
        Some(r) => r.eval = Some((accuracy, loss)),
        None => rows.push(MetricRow {
            step,
            eval: Some((accuracy, loss)),
            loss: f64::NAN,
            ..MetricRow::default()
        }),
    }
}

pub fn to_csv(rows: &[MetricRow]) -> String {
    let mut out = String::from("step,epoch,loss,samples_per_s,workers,test_accuracy,test_loss\n");
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

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {message}")]
    Write { path: String, message: String },
    #[error("no steps to plot yet")]
    Empty,
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Registers a system font for chart text, once. Returns false when none is
/// installed (Debian: fonts-dejavu-core); charts are then drawn without any
/// text or axes (plotters draws no glyph without a font) rather than not at all.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ];
        candidates.iter().any(|p| {
            let Ok(bytes) = std::fs::read(p) else {
                return false;
            };
            // plotters keeps fonts for the process' lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// Draws train loss (left axis) and test accuracy (right axis) against step.
pub fn render_png(path: &Path, title: &str, rows: &[MetricRow]) -> Result<(), ReportError> {
    let losses: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let evals: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| r.eval.map(|(a, _)| (r.step as f64, a)))
        .collect();
    if losses.is_empty() && evals.is_empty() {
        return Err(ReportError::Empty);
    }
    let text = font_available();
    let max_step = rows.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    let max_loss = losses.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| write_err(path, e);
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .right_y_label_area_size(56);
    if text {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..max_step, 0f64..max_loss)
        .map_err(|x| e(&x))?
        .set_secondary_coord(0f64..max_step, 0f64..1f64);
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("train loss")
            .draw()
            .map_err(|x| e(&x))?;
        chart
            .configure_secondary_axes()
            .y_desc("test accuracy")
            .draw()
            .map_err(|x| e(&x))?;
    }
    let loss_series = chart
        .draw_series(LineSeries::new(losses, BLUE.stroke_width(2)))
        .map_err(|x| e(&x))?;
    if text {
        loss_series
            .label("train loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    }
    let acc_series = chart
        .draw_secondary_series(LineSeries::new(evals.clone(), RED.stroke_width(2)))
        .map_err(|x| e(&x))?;
    if text {
        acc_series
            .label("test accuracy")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    chart
        .draw_secondary_series(evals.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|x| e(&x))?;
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Writes `metrics.csv` and `metrics.png` into `dir`.
pub fn write_report(dir: &Path, title: &str, rows: &[MetricRow]) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|x| write_err(dir, x))?;
    let csv = dir.join("metrics.csv");
    std::fs::write(&csv, to_csv(rows)).map_err(|x| write_err(&csv, x))?;
    render_png(&dir.join("metrics.png"), title, rows)
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
        assert!(rows.len() <= MAX_ROWS + 1, "{}", rows.len());
        assert_eq!(rows.iter().filter(|r| r.eval.is_some()).count(), 5_000);
        assert_eq!(rows.last().map(|r| r.step), Some(50_000));
        assert!(rows.windows(2).all(|w| w[0].step < w[1].step));
    }

    #[test]
    fn the_report_is_a_csv_and_a_png() {
        let dir = tempfile::tempdir().unwrap();
        write_report(dir.path(), "test job", &rows(30)).unwrap();
        let png = std::fs::read(dir.path().join("metrics.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000);
        assert!(std::fs::read_to_string(dir.path().join("metrics.csv"))
            .unwrap()
            .starts_with("step,"));
        assert!(matches!(
            render_png(&dir.path().join("x.png"), "t", &[]),
            Err(ReportError::Empty)
        ));
    }
}
