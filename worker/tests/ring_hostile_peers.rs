//! Anonymous peers against a worker's ring endpoints: whatever they send (or
//! do not send), the worker's file descriptors and parked links return to
//! their baseline within the handshake deadline. One test in its own binary,
//! so that no other test's sockets move the process's descriptor count.

use std::time::{Duration, Instant};

use futures::StreamExt;
use ringtrain_common::{JobId, Rank, RingGeneration};
use ringtrain_proto::ring_client::RingClient;
use ringtrain_proto::RingFrame;
use ringtrain_worker::ring::inbox::{InboxLimits, LinkKey};
use ringtrain_worker::ring::secure::Hello;
use ringtrain_worker::ring::{grpc, tcp, RingSecurity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HANDSHAKE: Duration = Duration::from_millis(1000);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn fds_back_to(baseline: usize, what: &str) {
    let deadline = Instant::now() + HANDSHAKE + Duration::from_secs(3);
    loop {
        let now = open_fds();
        if now <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} descriptors open, baseline {baseline}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unexpected_hello() -> Hello {
    Hello::new(
        LinkKey {
            job: JobId(1),
            generation: RingGeneration(1),
            from_rank: Rank(1),
        },
        Rank(0),
        RingSecurity::default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_peers_leave_no_descriptor_or_parked_link_behind() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        println!("SKIPPED: no /proc/self/fd to count descriptors");
        assert!(std::env::var_os("CI").is_none(), "CI needs /proc");
        return;
    }
    let limits = InboxLimits {
        max_pending: 32,
        handshake_timeout: HANDSHAKE,
    };

    // TCP: 1000 connections that send nothing, garbage, half a hello or a
    // hello nobody expects, each held until the worker drops it. At most
    // IN_FLIGHT at once: over the 32 handshake slots, under the listen
    // backlog (128, tokio's). Past the backlog the kernel drops the final
    // ACK, and a peer that sends nothing then waits on a connection the
    // worker has not seen until the SYN-ACK is resent, seconds later
    // (TcpExtListenOverflows; a CI run failed so).
    const IN_FLIGHT: usize = 64;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let inbox = tcp::TcpInbox::serve_with(listener, limits, std::future::pending()).expect("serve");
    let baseline = open_fds();
    let clients = futures::stream::iter(0..1000).map(|i| async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let connected = Instant::now();
        let hello = unexpected_hello().to_bytes();
        let _ = match i % 4 {
            0 => Ok(()),
            1 => s.write_all(&[0xa5; 300]).await,
            2 => s.write_all(&hello[..20]).await,
            _ => s.write_all(&hello).await,
        };
        let mut buf = [0u8; 512];
        let held = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(held.is_ok(), "the worker never dropped anonymous peer {i}");
        assert!(
            connected.elapsed() < HANDSHAKE + Duration::from_secs(2),
            "anonymous peer {i} was held for {:?}",
            connected.elapsed()
        );
    });
    clients
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    fds_back_to(baseline, "tcp").await;
    assert_eq!(inbox.held(), (0, 0), "nothing parked");

    // gRPC: 200 streams with no hello, a bad one, or one nobody expects,
    // on 4 connections; then the connections close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let grpc_inbox = grpc::serve_with(listener, limits, std::future::pending());
    let baseline = open_fds();
    let hello_hex: String = unexpected_hello()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect"),
        );
    }
    let calls = (0..200).map(|i| {
        let mut client = RingClient::new(channels[i % 4].clone());
        let hello_hex = hello_hex.clone();
        async move {
            let (_tx, rx) = tokio::sync::mpsc::channel::<RingFrame>(1);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let meta = match i % 3 {
                0 => None,
                1 => Some("not hex".to_string()),
                _ => Some(hello_hex),
            };
            if let Some(m) = meta {
                req.metadata_mut()
                    .insert("x-ringtrain-hello", m.parse().expect("ascii"));
            }
            let status = client.stream(req).await.expect_err("anonymous stream");
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::Unavailable
                        | tonic::Code::ResourceExhausted
                ),
                "{status:?}"
            );
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(grpc_inbox.held(), (0, 0), "nothing parked");
    drop(channels);
    fds_back_to(baseline, "grpc").await;
    // Every handshake slot is free again.
    let slots: Vec<_> = (0..limits.max_pending)
        .map(|_| grpc_inbox.handshake_slot())
        .collect();
    assert!(slots.iter().all(Option::is_some), "a handshake slot leaked");
}
