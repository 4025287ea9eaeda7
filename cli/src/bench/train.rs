//! `ringtrain bench train`: the workload of `ddp_train.py` on a local
//! cluster, one JSON line with the same fields.
//!
//! The clock is `ddp_train.py`'s: wall time from the start of the first
//! timed step on the earliest worker to the end of the last step on the
//! latest (each worker reports its steps' wall-clock start and end; the
//! coordinator keeps the extremes per step), so it includes everything a
//! step costs here (data, compute, all-reduce, optimizer, reporting).

use anyhow::{anyhow, ensure, Context};
use ringtrain_common::curve::MetricRow;
use ringtrain_common::jobspec::JobSpec;
use ringtrain_proto as pb;

use crate::commands::client;
use crate::commands::local::{check_dataset, start_cluster, start_netlab_cluster};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run the cluster in the clear (default: mutual TLS, as a real cluster should).
    #[arg(long)]
    insecure: bool,
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// cnn or mlp.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 60)]
    steps: u64,
    /// Untimed first steps.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// libtorch threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(
        long,
        env = "RINGTRAIN_DATA",
        default_value = "/usr/share/datasets/fashion-mnist"
    )]
    data: String,
    /// Workers in the emulated multi-host lab (`scripts/netlab.sh up W ...`):
    /// worker R in namespace rtlabR, so the ring crosses shaped links.
    #[arg(long)]
    netlab: bool,
    /// Extra spec overrides (KEY=VALUE), e.g. ring.encoding=bf16.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Keep the cluster's logs (one file per process) in this directory
    /// instead of a temporary one.
    #[arg(long)]
    run_dir: Option<std::path::PathBuf>,
}

pub async fn run(args: TrainArgs) -> anyhow::Result<()> {
    ensure!(args.steps > args.warmup, "--steps must exceed --warmup");
    check_dataset(&args.data)?;
    let text = format!(
        "name = \"bench-train\"\nmodel = \"{}\"\nbatch_size = {}\nworkers = {}\nmax_steps = {}\nthreads = {}\n\
         [dataset]\nformat = \"idx\"\npath = \"{}\"\n[optimizer]\nkind = \"sgd\"\nlr = {}\nmomentum = 0.9\n",
        args.model, args.batch, args.world, args.steps, args.threads, args.data, args.lr
    );
    let spec = JobSpec::parse(&text, &args.overrides)?;
    let temp = tempfile::tempdir()?;
    let dir = match &args.run_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating the run directory {}", d.display()))?;
            d.as_path()
        }
        None => temp.path(),
    };
    let cluster = if args.netlab {
        start_netlab_cluster(dir, args.world, args.insecure)?
    } else {
        start_cluster(dir, args.world, args.insecure)?
    };
    let mut c = client::connect_cluster(&cluster).await?;
    let job = client::submit_spec(&mut c, &spec, None).await?;
    let mut stream = client::events(&mut c, &job).await?;
    let mut last = None;
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|e| anyhow!("{}", e.message()))?
    {
        if let Some(s) = ev.status {
            last = Some(s);
        }
    }
    let end = last.ok_or_else(|| anyhow!("no status for job {job}"))?;
    ensure!(
        end.state == pb::JobState::Succeeded as i32,
        "training job {}: {}",
        client::state_name(end.state),
        end.error
    );
    let rows = client::job_metrics(&mut c, &job.to_string()).await?;
    drop(cluster);
    let clock = FairClock::of(&rows, args.warmup)?;
    let line = serde_json::json!({
        "impl": "ringtrain",
        "security": if args.insecure { "insecure" } else { "mtls" },
        "netlab": args.netlab,
        "overrides": args.overrides,
        "model": args.model,
        "world": args.world,
        "batch_per_rank": args.batch,
        "steps": end.step,
        "samples_per_s": clock.steps as f64 * (args.batch * args.world) as f64 / clock.seconds,
        "median_step_s": clock.median_step_s,
        "final_loss": end.loss,
        "test_accuracy": if end.has_eval { Some(end.test_accuracy) } else { None },
    });
    println!("{line}");
    Ok(())
}

/// Steps after the warm-up, timed from the earliest worker's start of the
/// first to the latest worker's end of the last.
#[derive(Debug, PartialEq)]
struct FairClock {
    steps: u64,
    seconds: f64,
    /// Median gap between consecutive steps' latest ends.
    median_step_s: f64,
}

impl FairClock {
    fn of(rows: &[MetricRow], warmup: u64) -> anyhow::Result<Self> {
        let timed: Vec<(u64, (f64, f64))> = rows
            .iter()
            .filter(|r| r.step > warmup)
            .filter_map(|r| Some((r.step, r.wall?)))
            .collect();
        let (Some(first), Some(last)) = (timed.first(), timed.last()) else {
            return Err(anyhow!(
                "no step after the warm-up of {warmup} carries its wall-clock times"
            ));
        };
        let seconds = last.1 .1 - first.1 .0;
        ensure!(seconds > 0.0, "steps {}..={} took no time", first.0, last.0);
        let mut gaps: Vec<f64> = timed
            .windows(2)
            .map(|w| (w[1].1 .1 - w[0].1 .1) / (w[1].0 - w[0].0) as f64)
            .collect();
        gaps.sort_by(f64::total_cmp);
        Ok(Self {
            steps: last.0 - first.0 + 1,
            seconds,
            median_step_s: gaps.get(gaps.len() / 2).copied().unwrap_or(seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, wall: Option<(f64, f64)>) -> MetricRow {
        MetricRow {
            step,
            wall,
            ..MetricRow::default()
        }
    }

    #[test]
    fn the_clock_runs_from_the_first_timed_start_to_the_last_end() {
        let rows: Vec<MetricRow> = (1..=10)
            .map(|s| row(s, Some((100.0 + s as f64, 100.8 + s as f64))))
            .collect();
        let c = FairClock::of(&rows, 5).unwrap();
        assert_eq!(c.steps, 5, "steps 6..=10");
        assert!((c.seconds - (110.8 - 106.0)).abs() < 1e-9, "{c:?}");
        assert!((c.median_step_s - 1.0).abs() < 1e-9, "{c:?}");
        let untimed: Vec<MetricRow> = (1..=10).map(|s| row(s, None)).collect();
        let e = FairClock::of(&untimed, 5).unwrap_err().to_string();
        assert!(e.contains("wall-clock"), "{e}");
    }
}
