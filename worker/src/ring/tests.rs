//! Rings of real sockets inside one process.

use std::time::{Duration, Instant};

use ringtrain_common::wire::WireEncoding;
use ringtrain_common::{JobId, Rank, RingGeneration};

use super::*;

struct Member {
    endpoints: RingEndpoints,
    addr: String,
}

async fn start_member(transport: TransportKind) -> Member {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let endpoints = match transport {
        TransportKind::Tcp => RingEndpoints {
            tcp: Some(tcp::TcpInbox::serve(listener, std::future::pending()).expect("serve")),
            grpc: None,
        },
        TransportKind::Grpc => RingEndpoints {
            tcp: None,
            grpc: Some(grpc::serve(listener, std::future::pending())),
        },
    };
    Member { endpoints, addr }
}

fn spec(rank: usize, members: &[String], generation: u64, options: &RingOptions) -> RingSpec {
    RingSpec {
        job: JobId(42),
        generation: RingGeneration(generation),
        rank: Rank(rank as u32),
        members: members.to_vec(),
        options: options.clone(),
    }
}

async fn ring_of(world: usize, options: &RingOptions) -> Vec<Ring> {
    let mut members = Vec::new();
    for _ in 0..world {
        members.push(start_member(options.transport).await);
    }
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    let connects = members
        .iter()
        .enumerate()
        .map(|(r, m)| Ring::connect(spec(r, &addrs, 1, options), &m.endpoints));
    futures::future::try_join_all(connects)
        .await
        .expect("ring connects")
}

/// Runs one all-reduce on every member concurrently, each on its own thread.
fn all_reduce_all(
    rings: Vec<Ring>,
    inputs: Vec<Vec<f32>>,
    op: ReduceOp,
) -> Vec<Result<Vec<f32>, RingError>> {
    let handles: Vec<_> = rings
        .into_iter()
        .zip(inputs)
        .map(|(mut ring, mut data)| {
            std::thread::spawn(move || ring.all_reduce(7, &mut data, op).map(|()| data))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

fn options(transport: TransportKind, segment_elems: usize) -> RingOptions {
    RingOptions {
        transport,
        segment_elems,
        timeout: Duration::from_secs(10),
        ..RingOptions::default()
    }
}

/// Integer-valued inputs, so every summation order gives the exact sum.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
        .collect()
}

async fn check_exact_sums(transport: TransportKind, worlds: &[usize], lens: &[usize]) {
    for &world in worlds {
        for &len in lens {
            let rings = ring_of(world, &options(transport, 97)).await;
            let inputs: Vec<_> = (0..world).map(|r| input(r, len)).collect();
            let expected: Vec<f32> = (0..len)
                .map(|i| inputs.iter().map(|v| v[i]).sum())
                .collect();
            let outs =
                tokio::task::spawn_blocking(move || all_reduce_all(rings, inputs, ReduceOp::Sum))
                    .await
                    .expect("join");
            for (rank, out) in outs.into_iter().enumerate() {
                let out =
                    out.unwrap_or_else(|e| panic!("world {world} len {len} rank {rank}: {e}"));
                assert_eq!(
                    out, expected,
                    "{transport} world {world} len {len} rank {rank}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sums_are_exact_for_every_world_size_and_odd_lengths() {
    check_exact_sums(
        TransportKind::Tcp,
        &[1, 2, 3, 4, 5, 6, 7, 8],
        &[0, 1, 5, 1001, 20_011],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_sums_are_exact_for_every_world_size_and_odd_lengths() {
    check_exact_sums(TransportKind::Grpc, &[1, 2, 3, 5, 8], &[0, 3, 1001, 20_011]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mean_divides_by_the_world_and_a_ring_serves_many_calls() {
    let world = 4;
    let rings = ring_of(world, &options(TransportKind::Tcp, 1000)).await;
    let outs = tokio::task::spawn_blocking(move || {
        let handles: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut ring)| {
                std::thread::spawn(move || {
                    let mut last = Vec::new();
                    for step in 0..5u64 {
                        let mut v = vec![(r as f32 + 1.0) * (step as f32 + 1.0); 10_001];
                        ring.all_reduce(step, &mut v, ReduceOp::Mean)
                            .expect("all-reduce");
                        last = v;
                    }
                    last
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect::<Vec<_>>()
    })
    .await
    .expect("join");
    // ranks contribute 5, 10, 15, 20 at step 4: mean 12.5
    for out in outs {
        assert!(out.iter().all(|&x| x == 12.5), "{:?}", &out[..4]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_precision_wire_stays_within_tolerance_and_replicas_stay_identical() {
    for (encoding, tolerance) in [(WireEncoding::F16, 2e-3f32), (WireEncoding::Bf16, 1.6e-2)] {
        let world = 3;
        let opts = RingOptions {
            encoding,
            ..options(TransportKind::Tcp, 500)
        };
        let rings = ring_of(world, &opts).await;
        let len = 4099;
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|r| {
                (0..len)
                    .map(|i| ((i as f32) * 0.013 + r as f32).sin())
                    .collect()
            })
            .collect();
        let exact: Vec<f32> = (0..len)
            .map(|i| inputs.iter().map(|v| v[i]).sum())
            .collect();
        let outs =
            tokio::task::spawn_blocking(move || all_reduce_all(rings, inputs, ReduceOp::Sum))
                .await
                .expect("join");
        let outs: Vec<Vec<f32>> = outs.into_iter().map(|o| o.expect("all-reduce")).collect();
        for (a, b) in outs[0].iter().zip(&exact) {
            assert!(
                (a - b).abs() <= tolerance * b.abs().max(1.0),
                "{encoding:?}: {a} vs {b}"
            );
        }
        assert!(
            outs.iter().all(|o| o == &outs[0]),
            "{encoding:?}: replicas differ"
        );
    }
}

/// A neighbour that completes the TCP handshake for `key` and then sends one
/// frame of the wrong generation.
async fn rogue_tcp_neighbour(target: &str, hello_generation: u64, frame_generation: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    let mut hello = [0u8; 32];
    hello[0..4].copy_from_slice(&0x5254_4831u32.to_le_bytes());
    hello[4..8].copy_from_slice(&1u32.to_le_bytes()); // rank 1 = left of rank 0 in a ring of 2
    hello[8..16].copy_from_slice(&42u64.to_le_bytes());
    hello[16..24].copy_from_slice(&hello_generation.to_le_bytes());
    s.write_all(&hello).await.expect("hello");
    assert_eq!(s.read_u8().await.expect("status"), 0, "handshake accepted");
    let layout = layout::Layout::new(8, 2, 1024);
    let seg = layout.segment(layout.recv_chunk(0, 0), 0);
    let header = ringtrain_common::wire::FrameHeader {
        job: JobId(42),
        generation: RingGeneration(frame_generation),
        step: 7,
        phase: ringtrain_common::wire::Phase::ReduceScatter,
        ring_step: 0,
        chunk: layout.recv_chunk(0, 0) as u32,
        offset: seg.start as u64,
        elements: seg.len() as u32,
        encoding: WireEncoding::F32,
        from_rank: Rank(1),
    };
    s.write_all(&header.to_bytes()).await.expect("header");
    s.write_all(&vec![0u8; seg.len() * 4])
        .await
        .expect("payload");
    // keep the socket open until the test ends
    std::mem::forget(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_from_another_generation_is_refused_not_summed() {
    let me = start_member(TransportKind::Tcp).await;
    // Our right neighbour is a plain listener that accepts the hello.
    let right = start_member(TransportKind::Tcp).await;
    let addrs = vec![me.addr.clone(), right.addr.clone()];
    let opts = options(TransportKind::Tcp, 1024);
    let target = me.addr.clone();
    tokio::spawn(async move { rogue_tcp_neighbour(&target, 2, 1).await });
    // Our right neighbour's listener accepts (parks) our dial; the rogue is our left.
    let mine = Ring::connect(spec(0, &addrs, 2, &opts), &me.endpoints).await;
    let mut ring = mine.expect("ring connects");
    let data = vec![1.0f32; 8];
    let before = data.clone();
    let (result, data) = tokio::task::spawn_blocking(move || {
        let mut data = data;
        let r = ring.all_reduce(7, &mut data, ReduceOp::Sum);
        (r, data)
    })
    .await
    .expect("join");
    let err = result.expect_err("stale frame must be refused").to_string();
    assert!(err.contains("ring generation 1, expected 2"), "{err}");
    assert!(err.contains("rank 1"), "error names the neighbour: {err}");
    // Nothing of the refused frame was summed into our chunk.
    let l = layout::Layout::new(8, 2, 1024);
    let refused_chunk = l.chunk(l.recv_chunk(0, 0));
    assert_eq!(&data[refused_chunk.clone()], &before[refused_chunk]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_of_a_stale_generation_is_refused_at_handshake() {
    let me = start_member(TransportKind::Tcp).await;
    let other = start_member(TransportKind::Tcp).await;
    let addrs = vec![me.addr.clone(), other.addr.clone()];
    let opts = RingOptions {
        timeout: Duration::from_secs(2),
        ..options(TransportKind::Tcp, 1024)
    };
    // Generation 3 is claimed at `me`...
    let _ = tokio::join!(
        Ring::connect(spec(0, &addrs, 3, &opts), &me.endpoints),
        Ring::connect(spec(1, &addrs, 3, &opts), &other.endpoints),
    );
    // ...so a member still on generation 2 is fenced off.
    let err = Ring::connect(spec(1, &addrs, 2, &opts), &other.endpoints)
        .await
        .err()
        .expect("stale generation must be refused")
        .to_string();
    assert!(err.contains("stale"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_neighbour_fails_the_call_within_the_deadline_and_is_named() {
    for transport in [TransportKind::Tcp, TransportKind::Grpc] {
        let deadline = Duration::from_millis(600);
        let opts = RingOptions {
            timeout: deadline,
            ..options(transport, 1000)
        };
        let mut rings = ring_of(3, &opts).await;
        // Rank 2 stays connected but never takes part: as if SIGSTOPped.
        let _silent = rings.pop();
        let started = Instant::now();
        let outs = tokio::task::spawn_blocking(move || {
            all_reduce_all(rings, vec![vec![1.0; 100_000]; 2], ReduceOp::Sum)
        })
        .await
        .expect("join");
        let elapsed = started.elapsed();
        assert!(elapsed < deadline * 3, "{transport}: took {elapsed:?}");
        let err = outs[0]
            .as_ref()
            .expect_err("rank 0 waits on rank 2")
            .to_string();
        assert!(err.contains("rank 2"), "{transport}: {err}");
        assert!(err.contains("sent nothing for"), "{transport}: {err}");
        assert!(outs[1].is_err(), "{transport}: rank 1 cannot finish either");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_that_goes_away_fails_the_call_fast() {
    for transport in [TransportKind::Tcp, TransportKind::Grpc] {
        let opts = RingOptions {
            timeout: Duration::from_secs(30),
            ..options(transport, 1000)
        };
        let mut rings = ring_of(3, &opts).await;
        drop(rings.pop()); // rank 2's sockets close, as when its process dies
        let started = Instant::now();
        let outs = tokio::task::spawn_blocking(move || {
            all_reduce_all(rings, vec![vec![1.0; 100_000]; 2], ReduceOp::Sum)
        })
        .await
        .expect("join");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{transport}: did not fail fast"
        );
        let err = outs[0]
            .as_ref()
            .expect_err("rank 0 lost its left")
            .to_string();
        assert!(err.contains("rank 2"), "{transport}: {err}");
        assert!(outs[1].is_err());
    }
}

#[test]
fn a_ring_is_unusable_after_a_failure() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let opts = RingOptions {
        timeout: Duration::from_millis(300),
        ..options(TransportKind::Tcp, 1000)
    };
    let mut rings = rt.block_on(ring_of(2, &opts));
    let _peer = rings.pop();
    let mut ring = rings.pop().expect("rank 0");
    let mut v = vec![1.0; 10];
    assert!(ring.all_reduce(1, &mut v, ReduceOp::Sum).is_err());
    let again = ring
        .all_reduce(2, &mut v, ReduceOp::Sum)
        .expect_err("broken ring");
    assert!(again.to_string().contains("new ring generation"), "{again}");
}
