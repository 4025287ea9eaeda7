//! `ringtrain plot JOB`: the job's train loss and test accuracy against step,
//! as a PNG (and optionally the rows as CSV), from the coordinator's record.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use ringtrain_common::curve::{self, MetricRow};
use ringtrain_proto as pb;

use super::client::{self, Target};

#[derive(clap::Args)]
pub struct PlotArgs {
    pub job: String,
    /// PNG to write (default JOB.png).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Also write the rows as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
}

pub async fn run(args: PlotArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&args.target).await?;
    let job = c
        .get_job(pb::GetJobRequest {
            job_id: args.job.clone(),
        })
        .await
        .map_err(|e| anyhow!("{}", e.message()))?
        .into_inner();
    let rows: Vec<MetricRow> = client::job_metrics(&mut c, &args.job).await?;
    if rows.is_empty() {
        bail!("job {} has no completed steps to plot yet", args.job);
    }
    let output = args
        .output
        .unwrap_or_else(|| PathBuf::from(format!("{}.png", args.job)));
    let title = format!("{} ({}, job {})", job.name, job.model, job.job_id);
    curve::render_png(&output, &title, &rows)?;
    println!("{}", output.display());
    if let Some(csv) = &args.csv {
        std::fs::write(csv, curve::to_csv(&rows))
            .with_context(|| format!("writing {}", csv.display()))?;
        println!("{}", csv.display());
    }
    Ok(())
}
