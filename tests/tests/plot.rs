//! Every job leaves metrics.csv and metrics.png next to its checkpoints, and
//! `ringtrain plot` draws one on demand.

use std::path::Path;
use std::time::Duration;

use ringtrain_tests::{mlp_spec, skip_without_data, stderr, stdout, Cluster, Signal};

/// `ringtrain plot JOB -o PNG --csv CSV` against the cluster.
fn plot(cluster: &Cluster, job: &str, png: &Path, csv: &Path) -> std::process::Output {
    let (png, csv) = (png.to_str().expect("path"), csv.to_str().expect("path"));
    cluster.cli(&["plot", job, "-o", png, "--csv", csv])
}

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.len() > 5_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// Dark pixels (text, axes) in the top band of an RGB PNG, away from the
/// side axes (where the title is drawn), and whether any pixel is blue (the
/// loss curve).
fn ink(path: &Path) -> (usize, bool) {
    let decoder = png::Decoder::new(std::fs::File::open(path).expect("png"));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgb, "an RGB chart");
    let width = info.width as usize;
    let pixel = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        (buf[i], buf[i + 1], buf[i + 2])
    };
    let mut dark = 0;
    let mut blue = false;
    for y in 0..info.height as usize {
        for x in 0..width {
            let (r, g, b) = pixel(x, y);
            let title_band = y < 40 && (100..width - 100).contains(&x);
            if title_band && r < 100 && g < 100 && b < 100 {
                dark += 1;
            }
            blue |= b > 200 && r < 60 && g < 60;
        }
    }
    (dark, blue)
}

#[test]
fn a_finished_job_has_its_curve_as_csv_and_png_and_plot_draws_it() {
    if skip_without_data() {
        return;
    }
    let cluster = Cluster::start(2);
    let spec = mlp_spec();
    let v = cluster.submit_and_watch(&spec, &["max_steps=30", "eval_every_steps=10"]);
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
    let o = plot(&cluster, &job, &png, &csv_out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("curve.png"));
    assert!(is_png(&png));
    assert_eq!(std::fs::read_to_string(&csv_out).expect("csv"), csv);

    // Without -o: JOB.png in the working directory.
    let o = cluster
        .command(&["plot", &job, "--coordinator", &cluster.coordinator])
        .current_dir(out.path())
        .output()
        .expect("run ringtrain");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(is_png(&out.path().join(format!("{job}.png"))));

    // Where no font can be had, the chart is drawn all the same, without
    // text: the title band is blank, the curve is there, and the user is
    // told why.
    let bare = out.path().join("bare.png");
    let o = cluster
        .command(&["plot", &job, "--coordinator", &cluster.coordinator, "-o"])
        .arg(&bare)
        .env("RINGTRAIN_FONT", out.path().join("no-such-font.ttf"))
        .output()
        .expect("run ringtrain");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no font for chart text"),
        "{}",
        stderr(&o)
    );
    assert!(is_png(&bare));
    let (with_text, curve) = ink(&png);
    let (without_text, bare_curve) = ink(&bare);
    assert!(curve && bare_curve, "both charts draw the loss curve");
    assert!(
        with_text > 100,
        "the title is drawn with a font ({with_text} dark pixels)"
    );
    assert_eq!(without_text, 0, "no text without a font");

    let o = cluster.cli(&["plot", "0123456789abcdef"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.trim() == "error: no job 0123456789abcdef" && err.lines().count() == 1,
        "{err}"
    );

    // A job that has not stepped yet (it waits for a third worker).
    let pending = cluster.submit(&spec, &["workers=3", "min_workers=3"]);
    let o = cluster.cli(&["plot", &pending, "-o", png.to_str().expect("path")]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.trim() == format!("error: job {pending} has no completed steps to plot yet")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(is_png(&png), "the earlier plot is left as it was");
    assert!(cluster.cli(&["cancel", &pending]).status.success());
}

#[test]
fn a_restarted_coordinator_keeps_the_curve_from_before() {
    if skip_without_data() {
        return;
    }
    let mut cluster = Cluster::start(2);
    let spec = mlp_spec();
    let job = cluster.submit(
        &spec,
        &[
            "max_steps=300",
            "checkpoint.every_steps=20",
            "eval_every_steps=50",
        ],
    );
    let steps = |c: &Cluster| c.status(&job)["steps"].as_u64().unwrap_or(0);
    ringtrain_tests::wait_for("step 60", Duration::from_secs(60), || {
        (steps(&cluster) >= 60).then_some(())
    });
    cluster.signal("coordinator", Signal::Kill);
    cluster.restart_coordinator();
    let end = ringtrain_tests::wait_for("the end", Duration::from_secs(120), || {
        let v = cluster.status(&job);
        ["succeeded", "failed", "cancelled"]
            .contains(&v["state"].as_str().unwrap_or(""))
            .then_some(v)
    });
    assert_eq!(end["state"], "succeeded", "{end}");
    let dir = Path::new(end["checkpoint_dir"].as_str().expect("dir")).to_path_buf();
    let csv = ringtrain_tests::wait_for("the final metrics.csv", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .ok()
            .filter(|t| t.lines().last().is_some_and(|l| l.starts_with("300,")))
    });
    let steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(
        steps.first(),
        Some(&1),
        "the steps before the restart are kept"
    );
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "in step order");
    assert!(steps.len() >= 200, "{} rows", steps.len());

    // Restarted again after the end: `plot` draws from the job's metrics.csv.
    cluster.signal("coordinator", Signal::Kill);
    cluster.restart_coordinator();
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("after.png");
    let csv_out = out.path().join("after.csv");
    let o = plot(&cluster, &job, &png, &csv_out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(is_png(&png));
    assert_eq!(std::fs::read_to_string(&csv_out).expect("csv"), csv);
}
