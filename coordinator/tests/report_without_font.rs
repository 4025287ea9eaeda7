//! Where no font is installed the chart is still drawn (axes and curves, no
//! text). Its own test binary: no other test has registered a font here.

use ringtrain_coordinator::report::{render_png_without_text, MetricRow};

#[test]
fn a_chart_without_a_font_has_its_axes_and_curves() {
    let rows: Vec<MetricRow> = (1..=50u64)
        .map(|step| MetricRow {
            step,
            loss: 2.0 / step as f64,
            eval: (step % 10 == 0).then_some((0.5 + step as f64 / 200.0, 0.4)),
            ..MetricRow::default()
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("metrics.png");
    render_png_without_text(&path, &rows).expect("drawn without a font");
    let png = std::fs::read(&path).expect("png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(png.len() > 3_000, "{}", png.len());
}
