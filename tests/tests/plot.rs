//! Every job leaves metrics.csv and metrics.png next to its checkpoints, and
//! `ringtrain plot` draws one on demand.

use std::path::Path;

use ringtrain_tests::{examples, last_json, stderr, stdout, Cluster, FASHION_MNIST};

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.len() > 5_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

#[test]
fn a_finished_job_has_its_curve_as_csv_and_png_and_plot_draws_it() {
    if !Path::new(FASHION_MNIST).is_dir() {
        eprintln!("SKIPPED: {FASHION_MNIST} missing");
        return;
    }
    let cluster = Cluster::start(2);
    let spec = examples()
        .join("fashion-mlp.toml")
        .to_string_lossy()
        .into_owned();
    let o = cluster.cli(&[
        "submit",
        &spec,
        "--set",
        "max_steps=30",
        "--set",
        "eval_every_steps=10",
        "--watch",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = last_json(&o);
    let job = v["job"].as_str().expect("job").to_string();
    let dir = Path::new(v["checkpoint_dir"].as_str().expect("dir")).to_path_buf();

    let csv = ringtrain_tests::wait_for("metrics.csv", std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .ok()
            .filter(|t| t.lines().count() == 31)
    });
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 30, "a row per step");
    assert!(
        rows.iter().all(|r| r[2].parse::<f64>().is_ok()),
        "every step has a loss"
    );
    let evaluated: Vec<&str> = rows
        .iter()
        .filter(|r| !r[5].is_empty())
        .map(|r| r[0])
        .collect();
    assert_eq!(evaluated, vec!["10", "20", "30"]);
    ringtrain_tests::wait_for("metrics.png", std::time::Duration::from_secs(10), || {
        is_png(&dir.join("metrics.png")).then_some(())
    });

    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("curve.png");
    let csv_out = out.path().join("curve.csv");
    let o = cluster.cli(&[
        "plot",
        &job,
        "-o",
        png.to_str().expect("path"),
        "--csv",
        csv_out.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("curve.png"));
    assert!(is_png(&png));
    assert_eq!(std::fs::read_to_string(&csv_out).expect("csv"), csv);

    let o = cluster.cli(&["plot", "0123456789abcdef"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.trim().ends_with("no job 0123456789abcdef") && err.lines().count() == 1,
        "{err}"
    );
}
