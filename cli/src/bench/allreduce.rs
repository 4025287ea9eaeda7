//! `ringtrain bench allreduce`: W rank processes on loopback all-reduce (sum)
//! one f32 buffer `reps` times after `warmup` untimed rounds, like
//! `gloo_allreduce.py`, and print one JSON line with the same fields.
//!
//! Rendezvous goes through pipes: each rank binds port 0 and prints
//! `READY addr`; the parent answers every rank with `PEERS a0 a1 ...`; each
//! rank ends with `TIMES [...]`. A rep's time is the slowest rank's.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use ringtrain_common::wire::WireEncoding;
use ringtrain_common::{JobId, Rank, RingGeneration};
use ringtrain_worker::ring::{
    grpc, tcp, ReduceOp, Ring, RingEndpoints, RingOptions, RingSpec, TransportKind,
};

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
}

#[derive(clap::Args, Clone)]
pub struct RankArgs {
    #[arg(long)]
    rank: usize,
    /// Print `REP i` on stdout after each repetition.
    #[arg(long)]
    progress: bool,
    #[command(flatten)]
    common: Args,
}

impl Args {
    fn ring_options(&self) -> RingOptions {
        RingOptions {
            transport: self.transport,
            encoding: self.encoding,
            segment_elems: (self.segment_kib * 1024 / 4).max(1),
            timeout: Duration::from_secs(self.timeout_s),
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
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// Kills every rank still running when the benchmark ends, however it ends.
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_tagged(out: &mut BufReader<ChildStdout>, rank: usize, tag: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("rank {rank} exited before sending {tag} (see its error above)");
        }
        if let Some(rest) = line.trim_end().strip_prefix(tag) {
            return Ok(rest.trim().to_string());
        }
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
    let mut ranks = Ranks(Vec::new());
    for rank in 0..args.world {
        let child = Command::new(&exe)
            .args(["bench", "allreduce-rank", "--rank", &rank.to_string()])
            .args(args.as_cli())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        ranks.0.push(child);
    }
    let mut outs = Vec::new();
    let mut addrs = Vec::new();
    for (rank, child) in ranks.0.iter_mut().enumerate() {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("rank {rank} has no stdout"))?;
        let mut out = BufReader::new(stdout);
        addrs.push(read_tagged(&mut out, rank, "READY")?);
        outs.push(out);
    }
    let peers = format!("PEERS {}\n", addrs.join(" "));
    for (rank, child) in ranks.0.iter_mut().enumerate() {
        let stdin = child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("rank {rank} has no stdin"))?;
        stdin.write_all(peers.as_bytes())?;
        stdin.flush()?;
    }
    let mut per_rank: Vec<Vec<f64>> = Vec::new();
    for (rank, out) in outs.iter_mut().enumerate() {
        let times = read_tagged(out, rank, "TIMES")?;
        per_rank.push(serde_json::from_str(&times).with_context(|| format!("rank {rank} times"))?);
    }
    for (rank, child) in ranks.0.iter_mut().enumerate() {
        let status = child.wait()?;
        ensure!(status.success(), "rank {rank} exited with {status}");
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
        "impl": format!("ringtrain-{}", args.transport),
        "world": args.world,
        "elements": args.elements,
        "bytes": bytes,
        "median_s": median,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2.0 * (w - 1.0) / w,
        "encoding": format!("{:?}", args.encoding).to_lowercase(),
        "segment_kib": args.segment_kib,
    });
    println!("{line}");
    Ok(())
}

pub fn run_rank(args: RankArgs) -> anyhow::Result<()> {
    let RankArgs {
        rank,
        progress,
        common: args,
    } = args;
    // The runtime drives the ring's servers and gRPC streams while this
    // thread runs the blocking all-reduce loop.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ring = rt.block_on(join_ring(rank, &args))?;
    let times = reps(ring, rank, &args, progress)?;
    println!("TIMES {}", serde_json::to_string(&times)?);
    Ok(())
}

async fn join_ring(rank: usize, args: &Args) -> anyhow::Result<Ring> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
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
    println!("READY {addr}");
    std::io::stdout().flush()?;
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    let members: Vec<String> = line
        .trim()
        .strip_prefix("PEERS")
        .map(|p| p.split_whitespace().map(String::from).collect())
        .filter(|m: &Vec<String>| m.len() == args.world)
        .ok_or_else(|| anyhow!("expected PEERS with {} addresses on stdin", args.world))?;
    let spec = RingSpec {
        job: JobId(1),
        generation: RingGeneration(1),
        rank: Rank(rank as u32),
        members,
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
