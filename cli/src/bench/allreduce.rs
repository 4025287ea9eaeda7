//! `ringtrain bench allreduce`: W rank processes on loopback all-reduce (sum)
//! one f32 buffer `reps` times after `warmup` untimed rounds, like
//! `gloo_allreduce.py`, and print one JSON line with the same fields.
//!
//! Ranks are supervised children ([`Supervisor`]): each binds port 0 and
//! writes its address to its ready file; the parent writes every address to
//! the peers file the ranks wait for; each rank writes its times to its
//! result file. A rep's time is the slowest rank's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use ringtrain_common::process::Supervisor;
use ringtrain_common::wire::WireEncoding;
use ringtrain_common::{JobId, Rank, RingGeneration};
use ringtrain_worker::ring::{
    grpc, tcp, ReduceOp, Ring, RingEndpoints, RingKey, RingOptions, RingSecurity, RingSpec,
    TransportKind,
};

/// Namespaces and addresses of `scripts/netlab.sh`.
const NETLAB_PREFIX: &str = "rtlab";
const NETLAB_SUBNET: &str = "10.77.0";

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Number of rank processes.
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// f32 elements in the buffer.
    #[arg(long, default_value_t = 25_000_000)]
    elements: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// tcp or grpc.
    #[arg(long, default_value = "tcp")]
    transport: TransportKind,
    /// f32, f16 or bf16 on the wire (sums are f32).
    #[arg(long, default_value = "f32")]
    encoding: WireEncoding,
    /// Pipelined segment size in KiB of f32.
    #[arg(long, default_value_t = 512)]
    segment_kib: usize,
    /// Seconds a silent neighbour is tolerated.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Frame protection: aead, mac or none (the handshake runs in every mode).
    #[arg(long, default_value_t = RingSecurity::default())]
    security: RingSecurity,
    /// Let ranks on this host (same network namespace) move frames through
    /// shared memory instead of loopback TCP.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    shared_memory: bool,
    /// Seal frames through shared memory too (off by default: they never
    /// touch a network; see the README, "Same-host links").
    #[arg(long)]
    seal_shared_memory: bool,
    /// Run rank R in network namespace rtlabR at 10.77.0.(R+1), the emulated
    /// multi-host lab that `scripts/netlab.sh up W RATE DELAY` makes.
    #[arg(long)]
    netlab: bool,
}

#[derive(clap::Args, Clone)]
pub struct RankArgs {
    #[arg(long)]
    rank: usize,
    /// Print `REP i` on stdout after each repetition.
    #[arg(long)]
    progress: bool,
    /// Written once listening: {"addr": "HOST:PORT"}.
    #[arg(long)]
    ready_file: PathBuf,
    /// Waited for: a JSON list of every rank's address.
    #[arg(long)]
    peers_file: PathBuf,
    /// Written at the end: the timed repetitions' seconds (JSON list).
    #[arg(long)]
    result_file: PathBuf,
    /// The ring's key, 64 hex digits (the parent makes a random one).
    #[arg(long, value_parser = parse_ring_key)]
    ring_key: RingKey,
    #[command(flatten)]
    common: Args,
}

fn parse_ring_key(s: &str) -> Result<RingKey, String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    RingKey::from_slice(&bytes.ok_or("a ring key is 64 hex digits")?)
}

fn ring_key_hex(key: &RingKey) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

impl Args {
    fn ring_options(&self) -> RingOptions {
        RingOptions {
            transport: self.transport,
            encoding: self.encoding,
            segment_elems: (self.segment_kib * 1024 / 4).max(1),
            timeout: Duration::from_secs(self.timeout_s),
            security: self.security,
            shared_memory: self.shared_memory,
            seal_shared_memory: self.seal_shared_memory,
        }
    }

    fn as_cli(&self) -> Vec<String> {
        [
            ("--world", self.world.to_string()),
            ("--elements", self.elements.to_string()),
            ("--reps", self.reps.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--transport", self.transport.to_string()),
            ("--encoding", format!("{:?}", self.encoding).to_lowercase()),
            ("--segment-kib", self.segment_kib.to_string()),
            ("--timeout-s", self.timeout_s.to_string()),
            ("--security", self.security.to_string()),
            ("--shared-memory", self.shared_memory.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .chain(self.netlab.then(|| "--netlab".to_string()))
        .chain(
            self.seal_shared_memory
                .then(|| "--seal-shared-memory".to_string()),
        )
        .collect()
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.world >= 1, "--world must be at least 1");
    ensure!(args.reps >= 1, "--reps must be at least 1");
    ensure!(
        args.elements <= u32::MAX as usize * args.world,
        "--elements too large"
    );
    let exe = std::env::current_exe().context("locating the ringtrain binary")?;
    let dir = tempfile::tempdir()?;
    let mut ranks = Supervisor::new(dir.path())?;
    let peers_file = dir.path().join("peers.json");
    let result = |rank: usize| dir.path().join(format!("rank-{rank}.json"));
    let ring_key = ring_key_hex(&RingKey::random());
    for rank in 0..args.world {
        let mut cli = vec![
            "bench".to_string(),
            "allreduce-rank".into(),
            "--rank".into(),
            rank.to_string(),
            "--peers-file".into(),
            peers_file.to_string_lossy().into_owned(),
            "--result-file".into(),
            result(rank).to_string_lossy().into_owned(),
            "--ring-key".into(),
            ring_key.clone(),
        ];
        cli.extend(args.as_cli());
        let cli: Vec<&str> = cli.iter().map(String::as_str).collect();
        let netns = format!("{NETLAB_PREFIX}{rank}");
        let wrapper: &[&str] = if args.netlab {
            &["ip", "netns", "exec", &netns]
        } else {
            &[]
        };
        ranks.spawn(&format!("rank-{rank}"), wrapper, &exe, &cli)?;
    }
    let mut addrs = Vec::new();
    for rank in 0..args.world {
        let ready = ranks.wait_ready(&format!("rank-{rank}"), Duration::from_secs(30))?;
        let addr = ready["addr"]
            .as_str()
            .ok_or_else(|| anyhow!("rank {rank} wrote no address"))?;
        addrs.push(addr.to_string());
    }
    write_atomically(&peers_file, &serde_json::to_vec(&addrs)?)?;
    let mut per_rank: Vec<Vec<f64>> = Vec::new();
    // Generous: the slowest transport at the largest size, and the neighbour
    // timeout of a failing run.
    let limit = Duration::from_secs(600 + args.timeout_s);
    for rank in 0..args.world {
        let name = format!("rank-{rank}");
        let status = ranks
            .wait_exit(&name, limit)?
            .ok_or_else(|| anyhow!("rank {rank} still runs after {limit:?}"))?;
        ensure!(
            status.success(),
            "rank {rank} exited with {status}: {}",
            ranks
                .get(&name)
                .map(|p| ringtrain_common::process::tail(&p.log, 1))
                .unwrap_or_default()
        );
        let times = std::fs::read(result(rank)).with_context(|| format!("rank {rank} times"))?;
        per_rank
            .push(serde_json::from_slice(&times).with_context(|| format!("rank {rank} times"))?);
    }
    // The slowest rank defines each repetition's time.
    let mut slowest: Vec<f64> = (0..args.reps)
        .map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    slowest.sort_by(f64::total_cmp);
    let median = if slowest.len() % 2 == 1 {
        slowest[slowest.len() / 2]
    } else {
        (slowest[slowest.len() / 2 - 1] + slowest[slowest.len() / 2]) / 2.0
    };
    let bytes = args.elements * 4;
    let algbw = bytes as f64 / median / 1e9;
    let w = args.world as f64;
    let line = serde_json::json!({
        "impl": format!(
            "ringtrain-{}{}-{}",
            args.transport,
            match (args.shared_memory && !args.netlab && args.transport == TransportKind::Tcp, args.seal_shared_memory) {
                (true, false) => "+shm",
                (true, true) => "+sealed-shm",
                (false, _) => "",
            },
            args.security
        ),
        "world": args.world,
        "elements": args.elements,
        "bytes": bytes,
        "median_s": median,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2.0 * (w - 1.0) / w,
        "encoding": format!("{:?}", args.encoding).to_lowercase(),
        "segment_kib": args.segment_kib,
        "netlab": args.netlab,
    });
    println!("{line}");
    Ok(())
}

pub fn run_rank(args: RankArgs) -> anyhow::Result<()> {
    let RankArgs {
        rank,
        progress,
        ready_file,
        peers_file,
        result_file,
        ring_key,
        common: args,
    } = args;
    // The runtime drives the ring's servers and gRPC streams while this
    // thread runs the blocking all-reduce loop.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ring = rt.block_on(join_ring(rank, &args, ring_key, &ready_file, &peers_file))?;
    let times = reps(ring, rank, &args, progress)?;
    write_atomically(&result_file, &serde_json::to_vec(&times)?)?;
    Ok(())
}

/// Writes `bytes` to a sibling and renames it into place: readers see the
/// whole file or none.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn join_ring(
    rank: usize,
    args: &Args,
    key: RingKey,
    ready_file: &Path,
    peers_file: &Path,
) -> anyhow::Result<Ring> {
    let bind = if args.netlab {
        format!("{NETLAB_SUBNET}.{}:0", rank + 1)
    } else {
        "127.0.0.1:0".to_string()
    };
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .with_context(|| format!("rank {rank} listening on {bind} (is the netlab up?)"))?;
    let addr = listener.local_addr()?;
    let endpoints = match args.transport {
        TransportKind::Tcp => RingEndpoints {
            tcp: Some(tcp::TcpInbox::serve(listener, std::future::pending())?),
            grpc: None,
        },
        TransportKind::Grpc => RingEndpoints {
            tcp: None,
            grpc: Some(grpc::serve(listener, std::future::pending())),
        },
    };
    write_atomically(
        ready_file,
        &serde_json::to_vec(&serde_json::json!({"addr": addr}))?,
    )?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s.max(30));
    let members: Vec<String> = loop {
        if let Ok(bytes) = std::fs::read(peers_file) {
            break serde_json::from_slice(&bytes).context("peers file")?;
        }
        ensure!(
            Instant::now() < deadline,
            "no peers file {} within {}s",
            peers_file.display(),
            args.timeout_s.max(30)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ensure!(
        members.len() == args.world,
        "the peers file lists {} ranks, expected {}",
        members.len(),
        args.world
    );
    let spec = RingSpec {
        job: JobId(1),
        generation: RingGeneration(1),
        rank: Rank(rank as u32),
        members,
        key,
        options: args.ring_options(),
    };
    Ok(Ring::connect(spec, &endpoints).await?)
}

/// The timed loop. Each repetition starts from the same values after a
/// one-element all-reduce that acts as a barrier.
fn reps(mut ring: Ring, rank: usize, args: &Args, progress: bool) -> anyhow::Result<Vec<f64>> {
    let mut data = vec![0f32; args.elements];
    let mut barrier = [0f32; 1];
    let mut times = Vec::with_capacity(args.reps);
    for i in 0..(args.warmup + args.reps) as u64 {
        data.fill(rank as f32 + 1.0);
        ring.all_reduce(2 * i, &mut barrier, ReduceOp::Sum)?;
        let started = Instant::now();
        ring.all_reduce(2 * i + 1, &mut data, ReduceOp::Sum)?;
        if i >= args.warmup as u64 {
            times.push(started.elapsed().as_secs_f64());
        }
        if progress {
            println!("REP {i}");
            std::io::stdout().flush()?;
        }
    }
    let expect = (args.world * (args.world + 1) / 2) as f32;
    let tolerance = if args.encoding == WireEncoding::F32 {
        0.0
    } else {
        expect * 1e-2
    };
    for &x in [data.first(), data.last()].iter().flatten() {
        ensure!(
            (x - expect).abs() <= tolerance,
            "wrong all-reduce result {x}, expected {expect}"
        );
    }
    Ok(times)
}
