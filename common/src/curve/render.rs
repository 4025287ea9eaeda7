//! Draws a job's curve as a PNG: train loss (left axis) and test accuracy
//! (right axis) against step. One renderer for the coordinator's
//! `metrics.png` and `ringtrain plot`.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::{replace_with, temp_beside, write_err, MetricRow, ReportError};

/// Fonts looked for, in order, unless `RINGTRAIN_FONT` names one.
const SYSTEM_FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for chart text, once: the TrueType file that
/// `RINGTRAIN_FONT` names, else the first of [`SYSTEM_FONTS`] installed
/// (Debian: fonts-dejavu-core). Returns false when there is none; charts are
/// then drawn with axes and curves but without any text (plotters draws no
/// glyph without a font) rather than not at all.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let chosen = std::env::var("RINGTRAIN_FONT").ok();
        let candidates: Vec<&str> = match &chosen {
            Some(path) => vec![path.as_str()],
            None => SYSTEM_FONTS.to_vec(),
        };
        let found = candidates.iter().any(|p| {
            let Ok(bytes) = std::fs::read(p) else {
                return false;
            };
            // plotters keeps fonts for the process' lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        });
        if !found {
            tracing::warn!(
                tried = %candidates.join(", "),
                "no font for chart text: charts are drawn without titles and labels \
                 (install fonts-dejavu-core, or set RINGTRAIN_FONT to a .ttf file)"
            );
        }
        found
    })
}

/// Draws train loss (blue, left axis) and test accuracy (red with dots, right
/// axis, 0 to 1) against step into a 960x540 PNG at `path` (whatever its
/// extension), replacing it atomically.
pub fn render_png(path: &Path, title: &str, rows: &[MetricRow]) -> Result<(), ReportError> {
    render(path, title, rows, font_available())
}

fn render(path: &Path, title: &str, rows: &[MetricRow], text: bool) -> Result<(), ReportError> {
    let losses: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let evals: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| r.eval.map(|(a, _)| (r.step as f64, a)))
        // No accuracy where the model computes its own loss.
        .filter(|(_, a)| a.is_finite())
        .collect();
    if losses.is_empty() && evals.is_empty() {
        return Err(ReportError::Empty);
    }
    let tmp = temp_beside(path, true);
    draw(&tmp, title, &losses, &evals, text)
        .map_err(|x| {
            let _ = std::fs::remove_file(&tmp);
            write_err(path, x)
        })
        .and_then(|()| replace_with(&tmp, path))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(
    path: &Path,
    title: &str,
    losses: &[(f64, f64)],
    evals: &[(f64, f64)],
    text: bool,
) -> DrawResult {
    let first_step = losses
        .iter()
        .chain(evals)
        .map(|p| p.0)
        .fold(f64::MAX, f64::min);
    let last_step = losses.iter().chain(evals).map(|p| p.0).fold(0.0, f64::max);
    // From 0, unless the curve starts well in (a job resumed from a checkpoint).
    let x0 = if first_step <= (last_step - first_step) / 20.0 {
        0.0
    } else {
        first_step.min(last_step - 1.0).max(0.0)
    };
    let x1 = last_step.max(x0 + 1.0);
    let max_loss = losses.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if text {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(64)
            .right_y_label_area_size(64);
    } else {
        builder
            .x_label_area_size(8)
            .y_label_area_size(8)
            .right_y_label_area_size(8);
    }
    let mut chart = builder
        .build_cartesian_2d(x0..x1, 0f64..max_loss)?
        .set_secondary_coord(x0..x1, 0f64..1f64);
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("train loss")
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("test accuracy")
            .draw()?;
    } else {
        // Axis lines only: a label would need a font.
        chart.configure_mesh().x_labels(0).y_labels(0).draw()?;
        chart
            .configure_secondary_axes()
            .x_labels(0)
            .y_labels(0)
            .draw()?;
    }
    let loss_series = chart.draw_series(LineSeries::new(
        losses.iter().copied(),
        BLUE.stroke_width(2),
    ))?;
    if text {
        loss_series
            .label("train loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    }
    let acc_series =
        chart.draw_secondary_series(LineSeries::new(evals.iter().copied(), RED.stroke_width(2)))?;
    if text {
        acc_series
            .label("test accuracy")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart.draw_secondary_series(evals.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
