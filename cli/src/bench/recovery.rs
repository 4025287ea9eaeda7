//! `ringtrain bench recovery`: how fast training resumes after a worker dies
//! and after one joins, on a local cluster.
//!
//! Each trial kill -9s a random ring member and times until the first step
//! completed by the re-formed ring (a new ring generation), then starts a
//! replacement worker and times from its process start to the first step of
//! the ring that includes it. One JSON line with the medians.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ringtrain_common::jobspec::JobSpec;
use ringtrain_proto as pb;

use crate::commands::client;
use crate::commands::local::{check_dataset, start_cluster};

#[derive(clap::Args)]
pub struct RecoveryArgs {
    /// Run the cluster in the clear (default: mutual TLS, as a real cluster should).
    #[arg(long)]
    insecure: bool,
    #[arg(long, default_value_t = 4)]
    world: usize,
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// cnn or mlp.
    #[arg(long, default_value = "mlp")]
    model: String,
    #[arg(
        long,
        env = "RINGTRAIN_DATA",
        default_value = "/usr/share/datasets/fashion-mnist"
    )]
    data: String,
}

/// (when, step, ring generation, ring size) of every step event.
type Timeline = Arc<Mutex<Vec<(Instant, u64, u64, u32)>>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Waits until a step event of a generation above `generation` (and with
/// `ring` members, when given) arrives after `since`; returns its time.
async fn first_step_after(
    timeline: &Timeline,
    generation: u64,
    ring: Option<u32>,
    since: Instant,
) -> anyhow::Result<(Instant, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hit = timeline
            .lock()
            .map_err(|_| anyhow!("timeline poisoned"))?
            .iter()
            .find(|(t, _, g, n)| *t >= since && *g > generation && ring.is_none_or(|r| *n == r))
            .map(|(t, _, g, _)| (*t, *g));
        if let Some(hit) = hit {
            return Ok(hit);
        }
        if Instant::now() > deadline {
            bail!("no step of a new ring within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn run(args: RecoveryArgs) -> anyhow::Result<()> {
    check_dataset(&args.data)?;
    let text = format!(
        "name = \"bench-recovery\"\nmodel = \"{}\"\nbatch_size = 64\nworkers = {}\nmin_workers = 1\nmax_steps = 100000000\n\
         [dataset]\nformat = \"idx\"\npath = \"{}\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.01\nmomentum = 0.9\n",
        args.model, args.world, args.data
    );
    let spec = JobSpec::parse(&text, &[])?;
    let dir = tempfile::tempdir()?;
    let mut cluster = start_cluster(dir.path(), args.world, args.insecure)?;
    let mut c = client::connect_cluster(&cluster).await?;
    let job = client::submit_spec(&mut c, &spec, None).await?;
    let mut stream = client::events(&mut c, &job).await?;
    let timeline: Timeline = Arc::default();
    let recorder = timeline.clone();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            if let (Some(s), "step") = (ev.status, ev.kind.as_str()) {
                if let Ok(mut t) = recorder.lock() {
                    t.push((Instant::now(), s.step, s.ring_generation, s.workers));
                }
            }
        }
    });
    let mut alive: Vec<String> = (0..args.world).map(|i| format!("worker-{i}")).collect();
    let (mut deaths, mut joins) = (Vec::new(), Vec::new());
    let mut generation = first_step_after(
        &timeline,
        0,
        Some(args.world as u32),
        Instant::now() - Duration::from_secs(3600),
    )
    .await?
    .1;
    for trial in 0..args.trials {
        // Let the full ring take a few steps first.
        let settle = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        first_step_after(&timeline, generation - 1, None, settle).await?;
        let victim = alive.remove((trial * 7 + 3) % alive.len());
        let killed = Instant::now();
        tokio::task::block_in_place(|| cluster.kill(&victim))?;
        let (t, g) = first_step_after(&timeline, generation, None, killed).await?;
        deaths.push(t.duration_since(killed).as_secs_f64());
        generation = g;
        let started = Instant::now();
        let name = tokio::task::block_in_place(|| cluster.add_worker())?;
        alive.push(name);
        let (t, g) =
            first_step_after(&timeline, generation, Some(args.world as u32), started).await?;
        joins.push(t.duration_since(started).as_secs_f64());
        generation = g;
        eprintln!(
            "trial {}: death -> next step {:.3}s, join (from process start) -> next step {:.3}s",
            trial + 1,
            deaths[trial],
            joins[trial]
        );
    }
    let _ = c.cancel_job(pb::CancelJobRequest { job_id: job }).await;
    drop(cluster);
    let line = serde_json::json!({
        "impl": "ringtrain",
        "model": args.model,
        "world": args.world,
        "trials": args.trials,
        "death_to_next_step_median_s": median(deaths.clone()),
        "death_to_next_step_s": deaths,
        "join_to_next_step_median_s": median(joins.clone()),
        "join_to_next_step_s": joins,
    });
    println!("{line}");
    Ok(())
}
