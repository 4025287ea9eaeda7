//! Client commands: `submit`, `status`, `watch`, `cancel`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ringtrain_common::jobspec::{JobSpec, ModelSource};
use ringtrain_common::security::{default_token, CertRole, Transport};
use ringtrain_proto as pb;
use ringtrain_proto::coordinator_client::CoordinatorClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:50051";

#[derive(clap::Args, Clone)]
pub struct Target {
    /// Coordinator URL.
    #[arg(long, env = "RINGTRAIN_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    #[command(flatten)]
    pub security: ClientSecurity,
}

/// How a client reaches a server: mutual TLS from a TLS dir, or in the
/// clear only when asked.
#[derive(clap::Args, Clone, Default)]
pub struct ClientSecurity {
    /// TLS dir holding ca.pem, client.pem and client.key (`ringtrain certs init`).
    #[arg(long, env = "RINGTRAIN_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Connect in the clear, without TLS (the server must run --insecure too).
    #[arg(long, env = "RINGTRAIN_INSECURE", value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure: bool,
    /// Bearer token (default: the TLS dir's `token` file).
    #[arg(long, env = "RINGTRAIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientSecurity {
    pub fn transport(&self) -> anyhow::Result<Transport> {
        Ok(Transport::from_flags(
            self.tls_dir.as_deref(),
            self.insecure,
        )?)
    }

    /// `--token`, else the TLS dir's token file.
    pub fn token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| self.tls_dir.as_deref().and_then(default_token))
    }
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the coordinator's client API.
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Job spec (TOML).
    pub spec: PathBuf,
    /// Override a spec key, e.g. --set batch_size=16 --set optimizer.lr=0.1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Watch the job until it ends.
    #[arg(long)]
    pub watch: bool,
    /// End with one JSON line (with --watch).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// A job id; without it, every job and worker.
    pub job: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(clap::Args)]
pub struct WatchArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(clap::Args)]
pub struct CancelArgs {
    pub job: String,
    #[command(flatten)]
    pub target: Target,
}

pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let transport = target.security.transport()?;
    connect_with(&target.coordinator, &transport, target.security.token()).await
}

/// A client of a [`LocalCluster`](ringtrain_common::local_cluster::LocalCluster),
/// with its certificates and admin token.
pub async fn connect_cluster(
    cluster: &ringtrain_common::local_cluster::LocalCluster,
) -> anyhow::Result<Client> {
    let security = ClientSecurity {
        tls_dir: cluster.tls_dir.clone(),
        insecure: cluster.tls_dir.is_none(),
        token: None,
    };
    connect_with(
        &cluster.coordinator_url,
        &security.transport()?,
        security.token(),
    )
    .await
}

/// The innermost cause of an error ("Connection refused", a certificate
/// problem): the useful one.
pub fn innermost(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

pub async fn connect_with(
    url: &str,
    transport: &Transport,
    token: Option<String>,
) -> anyhow::Result<Client> {
    let endpoint = transport
        .endpoint(url, CertRole::Client, Some(CertRole::Coordinator))?
        .connect_timeout(Duration::from_secs(5));
    INSECURE.store(!transport.is_tls(), std::sync::atomic::Ordering::Relaxed);
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = innermost(&e);
        // A TLS server hangs up on a plaintext client: say what probably happened.
        let hint = match transport {
            Transport::Insecure if !cause.contains("refused") => {
                " (if the coordinator serves TLS, pass --tls-dir instead of --insecure)"
            }
            _ => "",
        };
        anyhow!("cannot reach the coordinator at {url}: {cause}{hint}")
    })?;
    let header = token
        .map(|t| MetadataValue::try_from(format!("Bearer {t}")))
        .transpose()
        .map_err(|_| anyhow!("the token holds characters a gRPC header cannot carry"))?;
    Ok(CoordinatorClient::with_interceptor(channel, Bearer(header)))
}

/// Set when this client connects in the clear (for the hint below).
static INSECURE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn status_error(e: tonic::Status) -> anyhow::Error {
    // A TLS server hangs up on a plaintext client's first call.
    // Depending on timing the hang-up surfaces as an h2 error, a transport
    // error or a cancelled call; a status made from a local transport error
    // carries that error as its source, one the server sent does not.
    let transport_failed = matches!(
        e.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    ) && (std::error::Error::source(&e).is_some()
        || e.message().contains("h2 protocol error")
        || e.message().contains("transport error")
        || e.message().contains("operation was canceled"));
    if transport_failed && INSECURE.load(std::sync::atomic::Ordering::Relaxed) {
        return anyhow!(
            "{} (if the coordinator serves TLS, pass --tls-dir instead of --insecure)",
            e.message()
        );
    }
    anyhow!("{}", e.message())
}

/// Reads and validates a spec file, applying overrides, and makes its paths
/// absolute (relative to the current directory) so workers elsewhere agree.
pub fn load_spec(path: &Path, overrides: &[String]) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job spec {}", path.display()))?;
    let mut spec =
        JobSpec::parse(&text, overrides).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let abs = |p: &str| -> anyhow::Result<String> {
        Ok(std::path::absolute(p)?.to_string_lossy().into_owned())
    };
    spec.dataset.path = abs(&spec.dataset.path)?;
    for path in [
        &mut spec.checkpoint.dir,
        &mut spec.dataset.test_path,
        &mut spec.init_from,
    ] {
        if !path.is_empty() {
            *path = abs(path)?;
        }
    }
    if let ModelSource::ScriptFile(path) = &spec.model {
        spec.model = ModelSource::ScriptFile(abs(path)?);
    }
    Ok(spec)
}

/// Bytes per upload message (well under gRPC's 4 MiB limit).
const UPLOAD_CHUNK: usize = 1 << 20;

/// Streams a TorchScript file to the coordinator; returns what a job names
/// it by (`sha256:HEX`).
pub async fn upload_model(client: &mut Client, path: &Path) -> anyhow::Result<ModelSource> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read model file {}", path.display()))?;
    let chunks: Vec<pb::FileChunk> = bytes
        .chunks(UPLOAD_CHUNK)
        .map(|c| pb::FileChunk {
            data: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    let reply = client
        .upload_model(futures::stream::iter(chunks))
        .await
        .map_err(|e| anyhow!("uploading {}: {}", path.display(), e.message()))?
        .into_inner();
    ModelSource::try_from(reply.model).map_err(|e| anyhow!("the coordinator answered: {e}"))
}

pub fn check_resume(dir: &Path) -> anyhow::Result<String> {
    if !dir.join("checkpoint.json").is_file() {
        bail!(
            "cannot resume: {} holds no checkpoint (checkpoint.json missing)",
            dir.display()
        );
    }
    Ok(std::path::absolute(dir)?.to_string_lossy().into_owned())
}

pub async fn submit_spec(
    client: &mut Client,
    spec: &JobSpec,
    resume: Option<&Path>,
) -> anyhow::Result<String> {
    let resume_from = resume.map(check_resume).transpose()?.unwrap_or_default();
    // The model file travels with the job: workers fetch it from the coordinator.
    let mut spec = spec.clone();
    if let ModelSource::ScriptFile(path) = &spec.model {
        spec.model = upload_model(client, Path::new(path)).await?;
    }
    let resp = client
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.to_toml(),
            resume_from,
        })
        .await
        .map_err(status_error)?;
    Ok(resp.into_inner().job_id)
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let spec = load_spec(&args.spec, &args.overrides)?;
    let mut client = connect(&args.target).await?;
    let job = submit_spec(&mut client, &spec, args.resume.as_deref()).await?;
    if !args.watch {
        println!("{job}");
        return Ok(());
    }
    eprintln!("submitted job {job}");
    let end = watch_job(&mut client, &job, !args.json).await?;
    finish(&end, args.json)
}

pub use ringtrain_proto::convert::job_state_name as state_name;

/// A job's training curve (one row per committed step).
pub async fn job_metrics(
    c: &mut Client,
    job: &str,
) -> anyhow::Result<Vec<ringtrain_common::curve::MetricRow>> {
    Ok(c.get_job_metrics(pb::GetJobRequest {
        job_id: job.to_string(),
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .rows
    .iter()
    .map(ringtrain_common::curve::MetricRow::from)
    .collect())
}

/// The one JSON line scripts read.
pub fn result_json(s: &pb::JobStatus) -> serde_json::Value {
    let opt = |has: bool, v: f64| {
        if has {
            serde_json::json!(v)
        } else {
            serde_json::Value::Null
        }
    };
    serde_json::json!({
        "job": s.job_id,
        "state": state_name(s.state),
        "steps": s.step,
        "epochs": s.epoch,
        "workers": s.workers_wanted,
        "ring_workers": s.workers,
        "ring_generation": s.ring_generation,
        "test_accuracy": opt(s.has_eval && s.test_accuracy.is_finite(), s.test_accuracy),
        "test_bits_per_byte": opt(s.test_bits_per_byte > 0.0, s.test_bits_per_byte),
        "loss": opt(s.loss.is_finite(), s.loss),
        "test_loss": opt(s.has_eval, s.test_loss),
        "checkpoint_dir": s.checkpoint_dir,
        "skipped_steps": s.skipped_steps,
        "owner": s.owner,
        "error": if s.error.is_empty() { serde_json::Value::Null } else { serde_json::json!(s.error) },
    })
}

/// Prints the end of a job; an unsuccessful end is an error (non-zero exit).
pub fn finish(s: &pb::JobStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", result_json(s));
    } else {
        let eval = if s.has_eval {
            format!(
                ", test accuracy {:.4}, test loss {:.4}",
                s.test_accuracy, s.test_loss
            )
        } else {
            String::new()
        };
        println!(
            "job {} {} after {} steps{eval}",
            s.job_id,
            state_name(s.state),
            s.step
        );
        if !s.checkpoint_dir.is_empty() && s.state == pb::JobState::Succeeded as i32 {
            println!("checkpoint: {}", s.checkpoint_dir);
            println!("curve: {0}/metrics.png ({0}/metrics.csv)", s.checkpoint_dir);
        }
    }
    match pb::JobState::try_from(s.state) {
        Ok(pb::JobState::Succeeded) => Ok(()),
        Ok(pb::JobState::Failed) => bail!("job {} failed: {}", s.job_id, s.error),
        _ => bail!("job {} ended {}", s.job_id, state_name(s.state)),
    }
}

fn progress_line(s: &pb::JobStatus) -> String {
    let total = s.total_steps.max(1);
    let width = 24usize;
    let filled = ((s.step.min(total) as f64 / total as f64) * width as f64) as usize;
    let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
    let loss = if s.loss.is_finite() {
        format!("{:.4}", s.loss)
    } else {
        "-".into()
    };
    format!(
        "[{bar}] step {}/{} epoch {} loss {loss} {:.0} samples/s {} workers {}",
        s.step,
        s.total_steps,
        s.epoch,
        s.samples_per_s,
        s.workers,
        state_name(s.state)
    )
}

/// Opens the stream of a job's events (a snapshot first).
pub async fn events(
    client: &mut Client,
    job: &str,
) -> anyhow::Result<tonic::Streaming<pb::JobEvent>> {
    Ok(client
        .watch_job(pb::WatchJobRequest { job_id: job.into() })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Streams a job's events to the end, drawing a progress bar on stderr.
/// Returns the final status.
pub async fn watch_job(
    client: &mut Client,
    job: &str,
    show: bool,
) -> anyhow::Result<pb::JobStatus> {
    let mut stream = events(client, job).await?;
    let tty = std::io::stderr().is_terminal();
    let mut last: Option<pb::JobStatus> = None;
    let mut last_printed_step = 0;
    let mut stderr = std::io::stderr();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|e| anyhow!("watching job {job}: {}", e.message()))?
    {
        let Some(status) = event.status else { continue };
        if show {
            let line = progress_line(&status);
            // A step event with a message is a skipped step: worth a line.
            let noteworthy = matches!(event.kind.as_str(), "eval" | "state" | "checkpoint")
                || (event.kind == "step" && !event.message.is_empty());
            if noteworthy {
                let _ = write!(stderr, "{}", if tty { "\r\x1b[2K" } else { "" });
                let _ = writeln!(stderr, "{}: {}", event.kind, event.message);
            }
            if tty {
                let _ = write!(stderr, "\r\x1b[2K{line}");
                let _ = stderr.flush();
            } else if status.step >= last_printed_step + (status.total_steps / 20).max(1) {
                let _ = writeln!(stderr, "{line}");
                last_printed_step = status.step;
            }
        }
        last = Some(status);
    }
    if show && tty {
        let _ = writeln!(stderr);
    }
    last.ok_or_else(|| anyhow!("job {job}: the coordinator closed the stream without a status"))
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.target).await?;
    let end = watch_job(&mut client, &args.job, !args.json).await?;
    finish(&end, args.json)
}

pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.target).await?;
    let resp = client
        .cancel_job(pb::CancelJobRequest {
            job_id: args.job.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let state = resp.job.map(|j| state_name(j.state)).unwrap_or("unknown");
    println!("job {} {state}", args.job);
    Ok(())
}

/// Every job and worker, following `ListJobs` pages to the last.
async fn list_all(client: &mut Client) -> anyhow::Result<pb::ListJobsResponse> {
    let mut all = pb::ListJobsResponse::default();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                page_size: 0,
                page_token: page_token.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        all.jobs.extend(page.jobs);
        all.workers.extend(page.workers);
        // A token that does not move would loop for ever.
        if page.next_page_token.is_empty() || page.next_page_token == page_token {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.target).await?;
    if let Some(job) = &args.job {
        let s = client
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if args.json {
            println!("{}", result_json(&s));
        } else {
            println!("{} ({}, {})", s.job_id, s.name, s.model);
            if !s.owner.is_empty() {
                println!("  submitted by {}", s.owner);
            }
            println!("  {}", progress_line(&s));
            if s.has_eval {
                println!(
                    "  test accuracy {:.4}, test loss {:.4}",
                    s.test_accuracy, s.test_loss
                );
            }
            if s.skipped_steps > 0 {
                println!(
                    "  skipped steps: {} (non-finite gradient, on_nonfinite = \"skip_step\")",
                    s.skipped_steps
                );
            }
            if !s.error.is_empty() {
                println!("  error: {}", s.error);
            }
            if !s.checkpoint_dir.is_empty() {
                println!("  checkpoint: {}", s.checkpoint_dir);
            }
        }
        return Ok(());
    }
    let list = list_all(&mut client).await?;
    if args.json {
        let jobs: Vec<_> = list.jobs.iter().map(result_json).collect();
        let workers: Vec<_> = list
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker": w.worker_id, "address": w.address, "job": w.job_id,
                    "rank": w.rank, "last_step": w.last_step, "samples_per_s": w.samples_per_s,
                    "last_heartbeat_age_s": w.last_heartbeat_age_s, "alive": w.alive,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "jobs": jobs, "workers": workers })
        );
        return Ok(());
    }
    println!(
        "{:<18} {:<16} {:<10} {:>11} {:>6} {:>8} {:>9}",
        "JOB", "NAME", "STATE", "STEP", "EPOCH", "WORKERS", "TEST ACC"
    );
    for j in &list.jobs {
        let acc = if j.has_eval {
            format!("{:.4}", j.test_accuracy)
        } else {
            "-".into()
        };
        println!(
            "{:<18} {:<16} {:<10} {:>11} {:>6} {:>8} {:>9}",
            j.job_id,
            j.name,
            state_name(j.state),
            format!("{}/{}", j.step, j.total_steps),
            j.epoch,
            format!("{}/{}", j.workers, j.workers_wanted),
            acc
        );
    }
    println!();
    println!(
        "{:<8} {:<22} {:<18} {:>5} {:>9} {:>10} {:>15}",
        "WORKER", "ADDRESS", "JOB", "RANK", "STEP", "SAMPLES/S", "LAST HEARTBEAT"
    );
    for w in &list.workers {
        let rank = if w.rank < 0 {
            "-".into()
        } else {
            w.rank.to_string()
        };
        let beat = if w.alive {
            format!("{:.1}s ago", w.last_heartbeat_age_s)
        } else {
            "lost".into()
        };
        println!(
            "{:<8} {:<22} {:<18} {:>5} {:>9} {:>10.0} {:>15}",
            w.worker_id,
            w.address,
            if w.job_id.is_empty() { "-" } else { &w.job_id },
            rank,
            w.last_step,
            w.samples_per_s,
            beat
        );
    }
    Ok(())
}
