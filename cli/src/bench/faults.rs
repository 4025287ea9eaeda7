//! `ringtrain bench faults`: does losing a worker change what training
//! reaches? For each seed, one fault-free run and one run per kill step in
//! which one of the workers is killed (-9) once the job has completed that
//! step; the ring re-forms with the survivors and finishes the job. One JSON
//! line per run, then the per-seed table and the medians.

use std::time::Instant;

use anyhow::{anyhow, ensure, Context};
use ringtrain_common::jobspec::JobSpec;
use ringtrain_proto as pb;

use crate::commands::client;
use crate::commands::local::{check_dataset, start_cluster};

#[derive(clap::Args)]
pub struct FaultsArgs {
    /// Run the cluster in the clear (default: mutual TLS, as a real cluster should).
    #[arg(long)]
    insecure: bool,
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// cnn or mlp.
    #[arg(long, default_value = "cnn")]
    model: String,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "11,12,13")]
    seeds: Vec<u64>,
    /// Steps after which a worker is killed, comma-separated (one run each).
    #[arg(long, value_delimiter = ',', default_value = "60,112,180")]
    kill_at: Vec<u64>,
    /// Keep the global batch when the ring shrinks (each survivor takes a
    /// bigger slice): a fault then changes nothing but float summation order.
    #[arg(long)]
    keep_global_batch: bool,
    #[arg(
        long,
        env = "RINGTRAIN_DATA",
        default_value = "/usr/share/datasets/fashion-mnist"
    )]
    data: String,
}

struct Outcome {
    accuracy: f64,
    steps: u64,
    generations: u64,
    seconds: f64,
}

/// One job on a fresh local cluster; kills `worker-1` once step `kill_at`
/// has completed, if given.
async fn one_run(args: &FaultsArgs, seed: u64, kill_at: Option<u64>) -> anyhow::Result<Outcome> {
    let text = format!(
        "name = \"bench-faults\"\nmodel = \"{}\"\nbatch_size = 64\nworkers = {}\nepochs = {}\nseed = {seed}\nkeep_global_batch = {}\n\
         [dataset]\nformat = \"idx\"\npath = \"{}\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n",
        args.model, args.world, args.epochs, args.keep_global_batch, args.data
    );
    let spec = JobSpec::parse(&text, &[])?;
    let dir = tempfile::tempdir()?;
    let mut cluster = start_cluster(dir.path(), args.world, args.insecure)?;
    let started = Instant::now();
    let mut c = client::connect_cluster(&cluster).await?;
    let job = client::submit_spec(&mut c, &spec, None).await?;
    let mut stream = client::events(&mut c, &job).await?;
    let mut killed = kill_at.is_none();
    let mut last = None;
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|e| anyhow!("watching job {job}: {}", e.message()))?
    {
        let Some(s) = ev.status else { continue };
        if !killed && kill_at.is_some_and(|k| s.step >= k) {
            tokio::task::block_in_place(|| cluster.kill("worker-1"))?;
            killed = true;
        }
        last = Some(s);
    }
    let end = last.ok_or_else(|| anyhow!("no status for job {job}"))?;
    ensure!(
        end.state == pb::JobState::Succeeded as i32,
        "job {job} {}: {}",
        client::state_name(end.state),
        end.error
    );
    ensure!(end.has_eval, "job {job} ended without an evaluation");
    Ok(Outcome {
        accuracy: end.test_accuracy,
        steps: end.step,
        generations: end.ring_generation,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub async fn run(args: FaultsArgs) -> anyhow::Result<()> {
    check_dataset(&args.data)?;
    ensure!(
        args.world >= 2,
        "--world must be at least 2 (one worker is killed)"
    );
    let mut table: Vec<(u64, f64, Vec<f64>)> = Vec::new();
    for &seed in &args.seeds {
        let mut row = (seed, f64::NAN, Vec::new());
        for kill_at in std::iter::once(None).chain(args.kill_at.iter().copied().map(Some)) {
            let o = one_run(&args, seed, kill_at)
                .await
                .with_context(|| format!("seed {seed}, kill at {kill_at:?}"))?;
            let line = serde_json::json!({
                "impl": "ringtrain", "model": args.model, "world": args.world,
                "epochs": args.epochs, "seed": seed, "kill_at_step": kill_at,
                "keep_global_batch": args.keep_global_batch,
                "test_accuracy": o.accuracy, "steps": o.steps,
                "ring_generations": o.generations, "seconds": o.seconds,
            });
            println!("{line}");
            match kill_at {
                None => row.1 = o.accuracy,
                Some(_) => row.2.push(o.accuracy),
            }
        }
        table.push(row);
    }
    let kills: Vec<String> = args.kill_at.iter().map(|k| format!("kill@{k}")).collect();
    println!("seed  fault-free  {}", kills.join("  "));
    for (seed, free, faults) in &table {
        let cells: Vec<String> = faults.iter().map(|a| format!("{a:>8.4}")).collect();
        println!("{seed:>4}  {free:>10.4}  {}", cells.join("  "));
    }
    let free = median(table.iter().map(|r| r.1).collect());
    let mut cells = Vec::new();
    for i in 0..args.kill_at.len() {
        cells.push(format!(
            "{:>8.4}",
            median(table.iter().map(|r| r.2[i]).collect())
        ));
    }
    println!("median {free:>9.4}  {}", cells.join("  "));
    let all_faults = median(table.iter().flat_map(|r| r.2.clone()).collect());
    println!(
        "{}",
        serde_json::json!({
            "fault_free_median": free,
            "fault_median": all_faults,
            "difference_pp": (all_faults - free) * 100.0,
        })
    );
    Ok(())
}
