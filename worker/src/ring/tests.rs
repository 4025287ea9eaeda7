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
    start_member_with(transport, inbox::InboxLimits::default()).await
}

async fn start_member_with(transport: TransportKind, limits: inbox::InboxLimits) -> Member {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let endpoints = match transport {
        TransportKind::Tcp => RingEndpoints {
            tcp: Some(
                tcp::TcpInbox::serve_with(listener, limits, std::future::pending()).expect("serve"),
            ),
            grpc: None,
        },
        TransportKind::Grpc => RingEndpoints {
            tcp: None,
            grpc: Some(grpc::serve_with(listener, limits, std::future::pending())),
        },
    };
    Member { endpoints, addr }
}

/// The key every test ring shares.
fn ring_key() -> RingKey {
    RingKey([7u8; 32])
}

fn spec(rank: usize, members: &[String], generation: u64, options: &RingOptions) -> RingSpec {
    RingSpec {
        job: JobId(42),
        generation: RingGeneration(generation),
        rank: Rank(rank as u32),
        members: members.to_vec(),
        key: ring_key(),
        options: options.clone(),
    }
}

pub(crate) async fn ring_of(world: usize, options: &RingOptions) -> Vec<Ring> {
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

pub(crate) fn options(transport: TransportKind, segment_elems: usize) -> RingOptions {
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

async fn check_exact_sums(
    transport: TransportKind,
    security: RingSecurity,
    worlds: &[usize],
    lens: &[usize],
) {
    for &world in worlds {
        for &len in lens {
            let opts = RingOptions {
                security,
                ..options(transport, 97)
            };
            let rings = ring_of(world, &opts).await;
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
                    "{transport} {security} world {world} len {len} rank {rank}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sums_are_exact_for_every_world_size_and_odd_lengths() {
    check_exact_sums(
        TransportKind::Tcp,
        RingSecurity::default(),
        &[1, 2, 3, 4, 5, 6, 7, 8],
        &[0, 1, 5, 1001, 20_011],
    )
    .await;
    // Segments of several sealed pieces, in every mode, on both planes.
    for shared_memory in [true, false] {
        for security in [RingSecurity::Aead, RingSecurity::Mac, RingSecurity::None] {
            let opts = RingOptions {
                security,
                shared_memory,
                ..options(TransportKind::Tcp, 100_003)
            };
            check_ring(&opts, 3, 300_007).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_links_use_shared_memory_unless_disabled_and_sum_alike() {
    for (shared_memory, plane) in [(true, "shared-memory"), (false, "tcp")] {
        let opts = RingOptions {
            shared_memory,
            ..options(TransportKind::Tcp, 97)
        };
        let rings = ring_of(4, &opts).await;
        for ring in &rings {
            assert_eq!(ring.plane(), Some(plane), "shared_memory = {shared_memory}");
        }
        let len = 20_011;
        let inputs: Vec<_> = (0..4).map(|r| input(r, len)).collect();
        let expected: Vec<f32> = (0..len)
            .map(|i| inputs.iter().map(|v| v[i]).sum())
            .collect();
        let outs =
            tokio::task::spawn_blocking(move || all_reduce_all(rings, inputs, ReduceOp::Sum))
                .await
                .expect("join");
        for out in outs {
            assert_eq!(out.expect("all-reduce"), expected, "{plane}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_sums_are_exact_for_every_world_size_and_odd_lengths() {
    check_exact_sums(
        TransportKind::Grpc,
        RingSecurity::default(),
        &[1, 2, 3, 5, 8],
        &[0, 3, 1001, 20_011],
    )
    .await;
    for security in [RingSecurity::Aead, RingSecurity::Mac, RingSecurity::None] {
        let opts = RingOptions {
            security,
            ..options(TransportKind::Grpc, 100_003)
        };
        check_ring(&opts, 3, 300_007).await;
    }
}

/// One all-reduce of `len` elements: every rank holds the exact sum.
async fn check_ring(opts: &RingOptions, world: usize, len: usize) {
    let rings = ring_of(world, opts).await;
    let inputs: Vec<_> = (0..world).map(|r| input(r, len)).collect();
    let expected: Vec<f32> = (0..len)
        .map(|i| inputs.iter().map(|v| v[i]).sum())
        .collect();
    let outs = tokio::task::spawn_blocking(move || all_reduce_all(rings, inputs, ReduceOp::Sum))
        .await
        .expect("join");
    for (rank, out) in outs.into_iter().enumerate() {
        let out = out.unwrap_or_else(|e| panic!("{opts:?} rank {rank}: {e}"));
        assert!(out == expected, "{opts:?} rank {rank}: wrong sum");
    }
}

/// Runs `f(rank, ring)` for every member at once, each on its own thread
/// (ring calls block until every member makes them), and returns what each
/// returned, by rank.
pub(crate) async fn on_every_rank<T: Send + 'static>(
    rings: Vec<Ring>,
    f: impl Fn(usize, Ring) -> T + Clone + Send + 'static,
) -> Vec<T> {
    tokio::task::spawn_blocking(move || {
        let handles: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(rank, ring)| {
                let f = f.clone();
                std::thread::spawn(move || f(rank, ring))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mean_divides_by_the_world_and_a_ring_serves_many_calls() {
    let world = 4;
    let rings = ring_of(world, &options(TransportKind::Tcp, 1000)).await;
    let outs = on_every_rank(rings, |r, mut ring| {
        let mut last = Vec::new();
        for step in 0..5u64 {
            let mut v = vec![(r as f32 + 1.0) * (step as f32 + 1.0); 10_001];
            ring.all_reduce(step, &mut v, ReduceOp::Mean)
                .expect("all-reduce");
            last = v;
        }
        last
    })
    .await;
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

/// The finiteness the ring reports is the reduced buffer's, on every rank,
/// wherever the bad value lands: in the chunk a rank owns or in one it
/// gathers, from one rank's NaN or infinity or from a sum that overflows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rank_learns_whether_the_reduced_values_are_all_finite() {
    let world = 3;
    let len = 3001; // 3 chunks of 3 segments (the last shorter)
    for encoding in [WireEncoding::F32, WireEncoding::Bf16] {
        let opts = RingOptions {
            encoding,
            ..options(TransportKind::Tcp, 400)
        };
        let rings = ring_of(world, &opts).await;
        // (which rank, where, what): None is a clean call.
        let cases: Vec<Option<(usize, usize, f32)>> = vec![
            None,
            Some((0, 0, f32::NAN)),
            Some((1, len / 2, f32::INFINITY)),
            Some((2, len - 1, f32::NEG_INFINITY)),
            Some((0, 1700, f32::MAX)), // with rank 1's f32::MAX below: overflow
        ];
        let outs = on_every_rank(rings, move |rank, mut ring| {
            let mut finite = Vec::new();
            for (call, case) in cases.iter().enumerate() {
                let mut v = vec![0.5f32; len];
                if let Some((who, at, value)) = *case {
                    if who == rank {
                        v[at] = value;
                    }
                    if value == f32::MAX && rank == 1 {
                        v[at] = f32::MAX;
                    }
                }
                let ok = ring
                    .all_reduce_finite(call as u64, &mut v, ReduceOp::Sum)
                    .expect("all-reduce");
                assert_eq!(ok, crate::optim::all_finite(&v), "rank {rank} call {call}");
                finite.push(ok);
            }
            finite
        })
        .await;
        for out in outs {
            assert_eq!(out, vec![true, false, false, false, false], "{encoding:?}");
        }
    }
}

/// A dialer that speaks the TCP handshake with whatever hello and key it is
/// given: an impostor, or (with the right key) a neighbour whose frames a
/// test tampers with.
struct Rogue {
    stream: tokio::net::TcpStream,
    cipher: secure::LinkCipher,
}

async fn rogue_dial(target: &str, hello: secure::Hello, key: &RingKey) -> Result<Rogue, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn reason(s: &mut tokio::net::TcpStream) -> String {
        let len = s.read_u16_le().await.unwrap_or(0);
        let mut why = vec![0u8; usize::from(len)];
        let _ = s.read_exact(&mut why).await;
        String::from_utf8_lossy(&why).into_owned()
    }
    let io = |e: std::io::Error| format!("dropped: {e}");
    let mut s = tokio::net::TcpStream::connect(target).await.map_err(io)?;
    s.write_all(&hello.to_bytes()).await.map_err(io)?;
    let status = s.read_u8().await.map_err(io)?;
    if status != 0 {
        return Err(format!("refused ({status}): {}", reason(&mut s).await));
    }
    let mut challenge = [0u8; secure::NONCE_LEN + secure::PROOF_LEN];
    s.read_exact(&mut challenge).await.map_err(io)?;
    let nonce: [u8; secure::NONCE_LEN] = challenge[..secure::NONCE_LEN].try_into().expect("nonce");
    let t = secure::Transcript::new(&hello, &nonce);
    // An impostor sends a proof whatever the acceptor proved.
    s.write_all(&t.dialer_proof(key)).await.map_err(io)?;
    let verdict = s.read_u8().await.map_err(io)?;
    if verdict != 0 {
        return Err(format!("refused ({verdict}): {}", reason(&mut s).await));
    }
    // Frames on this TCP connection: offer no shared memory.
    s.write_all(&super::shm::Offer::create(false).to_bytes())
        .await
        .map_err(io)?;
    Ok(Rogue {
        stream: s,
        cipher: secure::LinkCipher::new(hello.security, &t.session_key(key)),
    })
}

impl Rogue {
    /// One sealed frame's bytes (payloads under one piece).
    fn frame(&mut self, header: &ringtrain_common::wire::FrameHeader, payload: &[f32]) -> Vec<u8> {
        let head = header.to_bytes();
        let mut body = bytemuck::cast_slice::<f32, u8>(payload).to_vec();
        assert!(body.len() <= secure::PIECE_BYTES);
        let mut tag = vec![0u8; self.cipher.tag_len()];
        self.cipher.seal_in_place(&head, 0, &mut body, &mut tag);
        self.cipher.next_frame();
        [&head[..], &body, &tag].concat()
    }
}

fn hello(from: u32, generation: u64, to: u32, security: RingSecurity) -> secure::Hello {
    secure::Hello::new(
        inbox::LinkKey {
            job: JobId(42),
            generation: RingGeneration(generation),
            from_rank: Rank(from),
        },
        Rank(to),
        security,
    )
}

async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn tcp_inbox(m: &Member) -> std::sync::Arc<tcp::TcpInbox> {
    m.endpoints.tcp.clone().expect("tcp endpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_from_a_non_neighbour_another_generation_or_without_the_key_are_refused() {
    let limits = inbox::InboxLimits {
        max_pending: 32,
        handshake_timeout: Duration::from_millis(500),
    };
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(start_member_with(TransportKind::Tcp, limits).await);
    }
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    let opts = options(TransportKind::Tcp, 97);
    let connect = |rank: usize| {
        let endpoints = members[rank].endpoints.clone();
        let spec = spec(rank, &addrs, 1, &opts);
        tokio::spawn(async move { Ring::connect(spec, &endpoints).await })
    };
    // Ranks 0 and 1 wait for their left neighbours; rank 2 (rank 0's left)
    // comes only after the impostors had their go.
    let (c0, c1) = (connect(0), connect(1));
    let inbox0 = tcp_inbox(&members[0]);
    wait_until("rank 0 to expect its left", || inbox0.held().1 == 1).await;
    let security = RingSecurity::default();
    let impostors = [
        ("a non-neighbour", hello(1, 1, 0, security), ring_key()),
        ("another generation", hello(2, 2, 0, security), ring_key()),
        (
            "a dialer without the key",
            hello(2, 1, 0, security),
            RingKey([9u8; 32]),
        ),
        (
            "a hello for another rank",
            hello(2, 1, 1, security),
            ring_key(),
        ),
        (
            "another security mode",
            hello(2, 1, 0, RingSecurity::None),
            ring_key(),
        ),
    ];
    for (who, hello, key) in impostors {
        let refused = rogue_dial(&addrs[0], hello, &key).await;
        let why = refused
            .err()
            .unwrap_or_else(|| panic!("{who} was accepted"));
        assert!(!why.is_empty(), "{who}");
    }
    assert_eq!(inbox0.held().0, 0, "nothing an impostor sent is parked");
    let c2 = connect(2);
    let rings: Vec<Ring> = [c0, c1, c2]
        .into_iter()
        .map(|c| async { c.await.expect("task").expect("ring connects") })
        .collect::<futures::future::JoinAll<_>>()
        .await;
    let len = 5003;
    let inputs: Vec<_> = (0..3).map(|r| input(r, len)).collect();
    let expected: Vec<f32> = (0..len)
        .map(|i| inputs.iter().map(|v| v[i]).sum())
        .collect();
    let outs = tokio::task::spawn_blocking(move || all_reduce_all(rings, inputs, ReduceOp::Sum))
        .await
        .expect("join");
    for out in outs {
        assert_eq!(out.expect("all-reduce"), expected);
    }
}

/// Rank 0 of a ring of 2 whose left (and right) neighbour rank 1 is played
/// by the test: rank 1's listener expects rank 0 (its frames are never
/// read; they fit in the socket buffers), and the rogue dials rank 0 with
/// the ring's key.
async fn ring_with_rogue_left(security: RingSecurity) -> (Ring, Rogue, tcp::TcpInbound) {
    let me = start_member(TransportKind::Tcp).await;
    let right = start_member(TransportKind::Tcp).await;
    let addrs = vec![me.addr.clone(), right.addr.clone()];
    let opts = RingOptions {
        security,
        ..options(TransportKind::Tcp, 1024)
    };
    let right_inbox = tcp_inbox(&right);
    let right_key = inbox::LinkKey {
        job: JobId(42),
        generation: RingGeneration(1),
        from_rank: Rank(0),
    };
    let expecting = right_inbox.inbox.expect(
        right_key,
        inbox::Expectation {
            key: ring_key(),
            rank: Rank(1),
            security,
        },
    );
    let endpoints = me.endpoints.clone();
    let spec0 = spec(0, &addrs, 1, &opts);
    let mine = tokio::spawn(async move { Ring::connect(spec0, &endpoints).await });
    let inbox0 = tcp_inbox(&me);
    wait_until("rank 0 to expect its left", || inbox0.held().1 == 1).await;
    let rogue = rogue_dial(&me.addr, hello(1, 1, 0, security), &ring_key())
        .await
        .expect("the key holder is accepted");
    // Hold rank 0's link to the right open for the rest of the test, on TCP.
    let to_right = right_inbox
        .inbox
        .claim(right_key, Duration::from_secs(5))
        .await
        .expect("rank 0 dialled its right");
    std::io::Write::write_all(&mut to_right.stream(), &[super::shm::ANSWER_DECLINED])
        .expect("decline shared memory");
    let ring = mine.await.expect("task").expect("ring connects");
    drop(expecting);
    (ring, rogue, to_right)
}

/// The header of the frame rank 0 of a ring of 2 expects from rank 1 at
/// ring step `t` of an all-reduce of 8 elements.
fn frame_to_rank0(t: usize) -> (ringtrain_common::wire::FrameHeader, std::ops::Range<usize>) {
    let l = layout::Layout::new(8, 2, 1024);
    let chunk = l.recv_chunk(0, t);
    let seg = l.segment(chunk, 0);
    let header = ringtrain_common::wire::FrameHeader {
        job: JobId(42),
        generation: RingGeneration(1),
        step: 7,
        phase: if t == 0 {
            ringtrain_common::wire::Phase::ReduceScatter
        } else {
            ringtrain_common::wire::Phase::AllGather
        },
        ring_step: t as u32,
        chunk: chunk as u32,
        offset: seg.start as u64,
        elements: seg.len() as u32,
        encoding: WireEncoding::F32,
        from_rank: Rank(1),
    };
    (header, l.chunk(chunk))
}

fn all_reduce_ones(mut ring: Ring) -> (Ring, Result<(), RingError>, Vec<f32>) {
    let mut data = vec![1.0f32; 8];
    let r = ring.all_reduce(7, &mut data, ReduceOp::Sum);
    (ring, r, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_frame_is_an_error_and_is_not_summed() {
    use tokio::io::AsyncWriteExt;
    for security in [RingSecurity::Aead, RingSecurity::Mac] {
        let (ring, mut rogue, _right) = ring_with_rogue_left(security).await;
        let (header, chunk) = frame_to_rank0(0);
        let mut bytes = rogue.frame(&header, &vec![2.0; header.elements as usize]);
        bytes[ringtrain_common::wire::FrameHeader::LEN + 5] ^= 0x10;
        rogue.stream.write_all(&bytes).await.expect("send");
        let (_, result, data) = tokio::task::spawn_blocking(move || all_reduce_ones(ring))
            .await
            .expect("join");
        let err = result.expect_err("tampered frame").to_string();
        assert!(err.contains("failed authentication"), "{security}: {err}");
        assert!(
            err.contains("rank 1"),
            "{security}: names the neighbour: {err}"
        );
        assert!(
            data[chunk].iter().all(|&x| x == 1.0),
            "{security}: nothing of the tampered frame was summed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_frame_is_refused() {
    use tokio::io::AsyncWriteExt;
    for security in [RingSecurity::Aead, RingSecurity::Mac] {
        let (ring, mut rogue, _right) = ring_with_rogue_left(security).await;
        let (rs, rs_chunk) = frame_to_rank0(0);
        let (ag, ag_chunk) = frame_to_rank0(1);
        let first = rogue.frame(&rs, &vec![2.0; rs.elements as usize]);
        let gather = rogue.frame(&ag, &vec![5.0; ag.elements as usize]);
        rogue.stream.write_all(&first).await.expect("send");
        rogue.stream.write_all(&gather).await.expect("send");
        let (ring, result, data) = tokio::task::spawn_blocking(move || all_reduce_ones(ring))
            .await
            .expect("join");
        result.expect("genuine frames are summed");
        assert!(data[rs_chunk.clone()].iter().all(|&x| x == 3.0), "{data:?}");
        assert!(data[ag_chunk].iter().all(|&x| x == 5.0), "{data:?}");
        // The same step again: the first frame's bytes, replayed verbatim,
        // have a valid header and a valid tag for an earlier position.
        rogue.stream.write_all(&first).await.expect("send");
        let (_, result, data) = tokio::task::spawn_blocking(move || all_reduce_ones(ring))
            .await
            .expect("join");
        let err = result.expect_err("replay").to_string();
        assert!(err.contains("failed authentication"), "{security}: {err}");
        assert!(
            data[rs_chunk].iter().all(|&x| x == 1.0),
            "{security}: replay summed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_without_the_key_is_refused_and_not_parked() {
    use ringtrain_proto::ring_client::RingClient;
    use ringtrain_proto::RingFrame;
    let me = start_member(TransportKind::Grpc).await;
    let inbox = me.endpoints.grpc.clone().expect("grpc");
    let security = RingSecurity::default();
    let _expecting = inbox.expect(
        inbox::LinkKey {
            job: JobId(42),
            generation: RingGeneration(1),
            from_rank: Rank(1),
        },
        inbox::Expectation {
            key: ring_key(),
            rank: Rank(0),
            security,
        },
    );
    let mut client = RingClient::connect(format!("http://{}", me.addr))
        .await
        .expect("connect");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // Unexpected sender, bad metadata: refused at the call.
    for (meta, code) in [
        (
            hex(&hello(0, 1, 0, security).to_bytes()),
            tonic::Code::Unavailable,
        ),
        ("zz".to_string(), tonic::Code::InvalidArgument),
    ] {
        let (_tx, rx) = tokio::sync::mpsc::channel::<RingFrame>(1);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("x-ringtrain-hello", meta.parse().expect("ascii"));
        let status = client.stream(req).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
    }
    // The expected sender without the key: the call opens, the proof fails.
    let (tx, rx) = tokio::sync::mpsc::channel::<RingFrame>(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let h = hello(1, 1, 0, security);
    req.metadata_mut().insert(
        "x-ringtrain-hello",
        hex(&h.to_bytes()).parse().expect("ascii"),
    );
    let mut replies = client.stream(req).await.expect("call opens").into_inner();
    let nonce = rand::random();
    let wrong = secure::Transcript::new(&h, &nonce).dialer_proof(&RingKey([9u8; 32]));
    tx.send(RingFrame {
        proof: wrong.to_vec(),
        ..RingFrame::default()
    })
    .await
    .expect("send proof");
    let status = replies.message().await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("key"), "{status:?}");
    assert_eq!(inbox.held(), (0, 1), "nothing parked");
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
    let (a, b) = tokio::join!(
        Ring::connect(spec(0, &addrs, 3, &opts), &me.endpoints),
        Ring::connect(spec(1, &addrs, 3, &opts), &other.endpoints),
    );
    a.and(b).expect("generation 3 forms");
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
        // Both survivors fail; each names the neighbour it saw go first
        // (rank 0 may see rank 1 give up before its own left, rank 2, is
        // noticed gone), and rank 2 is named by at least one of them.
        let errs: Vec<String> = outs
            .iter()
            .map(|o| {
                o.as_ref()
                    .expect_err("a survivor cannot finish")
                    .to_string()
            })
            .collect();
        assert!(
            errs.iter().any(|e| e.contains("rank 2")),
            "{transport}: {errs:?}"
        );
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
