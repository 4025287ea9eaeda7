//! `ringtrain local`: a coordinator and N workers on loopback as child
//! processes, one job submitted and watched to the end, then everything
//! stopped (also on Ctrl-C; children also die if this process is killed).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use ringtrain_common::local_cluster::{ClusterOptions, LocalCluster};

use super::client;
use crate::settings::shutdown_signal;

#[derive(clap::Args)]
pub struct LocalArgs {
    /// Job spec (TOML).
    pub spec: PathBuf,
    /// Worker processes (default: the spec's `workers`).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Override a spec key, e.g. --set batch_size=16 --set max_steps=20.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where logs and (by default) checkpoints go; default runs/NAME-TIMESTAMP.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// End with one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Continue from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Run every process in the clear (default: mutual TLS with throwaway
    /// certificates in RUN_DIR/tls).
    #[arg(long)]
    pub insecure: bool,
}

/// A coordinator and `workers` workers of this very binary on loopback.
pub fn start_cluster(
    run_dir: &Path,
    workers: usize,
    insecure: bool,
) -> anyhow::Result<LocalCluster> {
    let program = std::env::current_exe().context("locating the ringtrain binary")?;
    start_with(
        run_dir,
        workers,
        ClusterOptions::loopback(program),
        insecure,
    )
}

/// A cluster on the emulated multi-host lab of `scripts/netlab.sh`: the
/// coordinator on the lab's bridge (10.77.0.254), worker R in namespace
/// rtlabR at 10.77.0.(R+1), so ring traffic crosses the shaped links.
pub fn start_netlab_cluster(
    run_dir: &Path,
    workers: usize,
    insecure: bool,
) -> anyhow::Result<LocalCluster> {
    const BRIDGE_IP: &str = "10.77.0.254";
    let program = std::env::current_exe().context("locating the ringtrain binary")?;
    let options = ClusterOptions {
        listen_ip: BRIDGE_IP.into(),
        advertise: BRIDGE_IP.into(),
        ..ClusterOptions::loopback(program)
    };
    let mut cluster = start_with(run_dir, 0, options, insecure)
        .context("starting the coordinator on the lab's bridge (is the netlab up? scripts/netlab.sh up W RATE DELAY)")?;
    let port = cluster
        .coordinator_url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let scheme = if insecure { "http" } else { "https" };
    let url = format!("{scheme}://{BRIDGE_IP}:{port}");
    // It listens on the bridge only, so clients on this host dial it there too.
    cluster.coordinator_url = url.clone();
    for rank in 0..workers {
        let netns = format!("rtlab{rank}");
        let ip = format!("10.77.0.{}", rank + 1);
        tokio::task::block_in_place(|| {
            cluster.add_worker_with(
                &["ip", "netns", "exec", &netns],
                &url,
                &format!("{ip}:0"),
                &ip,
            )
        })
        .with_context(|| format!("starting worker {rank} in namespace {netns}"))?;
    }
    Ok(cluster)
}

fn start_with(
    run_dir: &Path,
    workers: usize,
    options: ClusterOptions,
    insecure: bool,
) -> anyhow::Result<LocalCluster> {
    let options = ClusterOptions {
        insecure,
        ..options
    };
    if insecure {
        tracing::warn!("--insecure: the local cluster runs in the clear, without authentication");
    }
    Ok(tokio::task::block_in_place(|| {
        LocalCluster::start(run_dir, workers, options)
    })?)
}

/// A clear error before anything starts, rather than N workers failing: the
/// data set's files are there (their contents are the workers' to check).
pub fn check_data(spec: &ringtrain_common::jobspec::DatasetSpec) -> anyhow::Result<()> {
    use ringtrain_common::jobspec::DataFormat;
    if spec.format == DataFormat::Idx {
        return check_dataset(&spec.path);
    }
    for path in [&spec.path, &spec.test_path] {
        if !path.is_empty() && !Path::new(path).exists() {
            bail!("dataset not found: {path} does not exist");
        }
    }
    Ok(())
}

/// A clear error before anything starts, rather than N workers failing.
pub fn check_dataset(path: &str) -> anyhow::Result<()> {
    let dir = Path::new(path);
    let present = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
        .iter()
        .any(|f| dir.join(f).is_file());
    if !present {
        bail!(
            "dataset not found: {} has no train-images-idx3-ubyte(.gz) (install Debian's dataset-fashion-mnist, or set dataset.path)",
            dir.display()
        );
    }
    Ok(())
}

/// The local user owns what its spec names: the coordinator's roots cover
/// the spec's paths and the checkpoint it resumes from (besides its usual
/// defaults, so examples naming /usr/share/datasets work).
fn local_roots(
    program: PathBuf,
    spec: &ringtrain_common::jobspec::JobSpec,
    args: &LocalArgs,
) -> ClusterOptions {
    use ringtrain_common::jobspec::ModelSource;
    let mut options = ClusterOptions::loopback(program);
    let model = match &spec.model {
        ModelSource::ScriptFile(p) => p.as_str(),
        _ => "",
    };
    let mut roots: Vec<PathBuf> = [
        spec.dataset.path.as_str(),
        spec.dataset.test_path.as_str(),
        spec.init_from.as_str(),
        model,
    ]
    .iter()
    .filter(|p| !p.is_empty())
    .map(PathBuf::from)
    .collect();
    roots.extend(args.resume.iter().cloned());
    if let Some(data) = std::env::var_os("RINGTRAIN_DATA").filter(|d| !d.is_empty()) {
        roots.push(PathBuf::from(data));
    }
    roots.push(PathBuf::from("/usr/share/datasets"));
    options.data_roots = roots
        .into_iter()
        .filter_map(|p| std::path::absolute(p).ok())
        .collect();
    if !spec.checkpoint.dir.is_empty() {
        options.checkpoint_root = std::path::absolute(&spec.checkpoint.dir).ok();
    }
    options
}

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(n) = args.workers {
        overrides.push(format!("workers={n}"));
    }
    let spec = client::load_spec(&args.spec, &overrides)?;
    check_data(&spec.dataset)?;
    if let Some(dir) = &args.resume {
        client::check_resume(dir)?;
    }
    let run_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!("{}-{secs}", spec.name))
        }
    };
    let run_dir = std::path::absolute(&run_dir)?;
    eprintln!(
        "starting a coordinator and {} workers (logs in {})",
        spec.workers,
        run_dir.join("logs").display()
    );
    let program = std::env::current_exe().context("locating the ringtrain binary")?;
    let options = local_roots(program, &spec, &args);
    let cluster = start_with(&run_dir, spec.workers, options, args.insecure)?;
    let mut client = client::connect_cluster(&cluster).await?;
    let job = client::submit_spec(&mut client, &spec, args.resume.as_deref()).await?;
    eprintln!(
        "submitted job {job} ({} on {} workers)",
        spec.model, spec.workers
    );
    let mut watcher = client.clone();
    let end = tokio::select! {
        end = client::watch_job(&mut watcher, &job, true) => end.context("watching the job")?,
        _ = shutdown_signal() => {
            let _ = client.cancel_job(ringtrain_proto::CancelJobRequest { job_id: job.clone() }).await;
            drop(cluster);
            bail!("interrupted: job {job} cancelled and every local process stopped");
        }
    };
    let logs = cluster.logs().to_path_buf();
    drop(cluster);
    let result = client::finish(&end, args.json);
    eprintln!("logs: {}", logs.display());
    result
}
