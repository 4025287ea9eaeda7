//! `ringtrain bench train`: the workload of `ddp_train.py` on a local
//! cluster, one JSON line with the same fields.
//!
//! Step times are wall-clock intervals between the coordinator's step events,
//! so they include everything a step costs here (data, compute, all-reduce,
//! optimizer, reporting).

use std::time::Instant;

use anyhow::{anyhow, ensure};
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
    let dir = tempfile::tempdir()?;
    let cluster = if args.netlab {
        start_netlab_cluster(dir.path(), args.world, args.insecure)?
    } else {
        start_cluster(dir.path(), args.world, args.insecure)?
    };
    let mut c = client::connect_cluster(&cluster).await?;
    let job = client::submit_spec(&mut c, &spec, None).await?;
    let mut stream = client::events(&mut c, &job).await?;
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    let mut last = None;
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|e| anyhow!("{}", e.message()))?
    {
        if let Some(s) = ev.status {
            if ev.kind == "step" && seen.last().is_none_or(|(step, _)| *step < s.step) {
                seen.push((s.step, Instant::now()));
            }
            last = Some(s);
        }
    }
    drop(cluster);
    let end = last.ok_or_else(|| anyhow!("no status for job {job}"))?;
    ensure!(
        end.state == pb::JobState::Succeeded as i32,
        "training job {}: {}",
        client::state_name(end.state),
        end.error
    );
    let timed: Vec<&(u64, Instant)> = seen.iter().filter(|(s, _)| *s >= args.warmup).collect();
    let (first, final_) = (
        timed.first().ok_or_else(|| anyhow!("no timed steps"))?,
        timed[timed.len() - 1],
    );
    let steps = (final_.0 - first.0) as f64;
    let secs = final_.1.duration_since(first.1).as_secs_f64();
    let mut per_step: Vec<f64> = timed
        .windows(2)
        .map(|w| w[1].1.duration_since(w[0].1).as_secs_f64() / (w[1].0 - w[0].0) as f64)
        .collect();
    per_step.sort_by(f64::total_cmp);
    let median = per_step
        .get(per_step.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let line = serde_json::json!({
        "impl": "ringtrain",
        "security": if args.insecure { "insecure" } else { "mtls" },
        "netlab": args.netlab,
        "overrides": args.overrides,
        "model": args.model,
        "world": args.world,
        "batch_per_rank": args.batch,
        "steps": end.step,
        "samples_per_s": steps * (args.batch * args.world) as f64 / secs,
        "median_step_s": median,
        "final_loss": end.loss,
        "test_accuracy": if end.has_eval { Some(end.test_accuracy) } else { None },
    });
    println!("{line}");
    Ok(())
}
