//! Raw TCP transport: a 64-byte [`FrameHeader`] then the payload, written
//! straight from (and read straight into) the caller's buffer.
//!
//! Setup is async (accepting and handshaking under a deadline); the data path
//! runs on the engine's blocking threads with socket timeouts as deadlines.

use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ringtrain_common::retry::{retry, GaveUp};
use ringtrain_common::wire::FrameHeader;
use ringtrain_common::{JobId, Rank, RingGeneration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::inbox::{Inbox, LinkKey};
use super::transport::{FrameReceiver, FrameSender, LinkAbort, RingLinks};
use super::{Peer, RingError, RingSpec, DIAL_BACKOFF};

const HELLO_MAGIC: u32 = 0x5254_4831; // "RTH1"
const HELLO_LEN: usize = 32;
/// Socket buffer size. Bigger is slower here: data that waits long in a
/// large kernel buffer has left the cache when the receiver copies it out.
/// Measured on loopback, 100 MB, W=4: 8 MiB ~135 ms, kernel autotuning
/// ~118 ms, 1 MiB ~110 ms (with 512 KiB segments ~107 ms).
const SOCKET_BUFFER: usize = 1 << 20;

fn hello(key: &LinkKey) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&key.from_rank.0.to_le_bytes());
    b[8..16].copy_from_slice(&key.job.0.to_le_bytes());
    b[16..24].copy_from_slice(&key.generation.0.to_le_bytes());
    b
}

fn parse_hello(b: &[u8; HELLO_LEN]) -> Option<LinkKey> {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    (magic == HELLO_MAGIC).then(|| LinkKey {
        from_rank: Rank(u32::from_le_bytes([b[4], b[5], b[6], b[7]])),
        job: JobId(word(8)),
        generation: RingGeneration(word(16)),
    })
}

/// The local TCP ring endpoint: accepts neighbours and parks their links.
pub struct TcpInbox {
    inbox: Inbox<TcpStream>,
    addr: std::net::SocketAddr,
}

impl TcpInbox {
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Starts accepting on an already-bound listener. The accept loop ends
    /// when `shutdown` resolves.
    pub fn serve(
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            inbox: Inbox::default(),
            addr: listener.local_addr()?,
        });
        let inbox = me.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, from)) => {
                            let inbox = inbox.clone();
                            tokio::spawn(async move {
                                if let Err(e) = inbox.handshake(stream).await {
                                    tracing::warn!(%from, error = %e, "refused ring connection");
                                }
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "ring listener accept failed"),
                    },
                }
            }
        });
        Ok(me)
    }

    async fn handshake(&self, mut stream: tokio::net::TcpStream) -> Result<(), String> {
        let mut b = [0u8; HELLO_LEN];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut b))
            .await
            .map_err(|_| "no hello within 10s".to_string())?
            .map_err(|e| format!("reading hello: {e}"))?;
        let key = parse_hello(&b).ok_or("not a ringtrain hello")?;
        let std_stream = stream
            .into_std()
            .map_err(|e| format!("detaching stream: {e}"))?;
        let reply_to = std_stream
            .try_clone()
            .map_err(|e| format!("cloning stream: {e}"))?;
        let verdict = self.inbox.deliver(key, std_stream);
        // One status byte then, on refusal, the reason (u16 length + UTF-8).
        let mut reply = reply_to;
        reply
            .set_nonblocking(false)
            .map_err(|e| format!("socket mode: {e}"))?;
        let msg = match &verdict {
            Ok(()) => vec![0u8],
            Err(why) => {
                let why = why.as_bytes();
                let len = why.len().min(u16::MAX as usize);
                let mut m = vec![1u8];
                m.extend_from_slice(&(len as u16).to_le_bytes());
                m.extend_from_slice(&why[..len]);
                m
            }
        };
        reply
            .write_all(&msg)
            .map_err(|e| format!("replying: {e}"))?;
        verdict
    }
}

fn tune(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let sock = socket2::SockRef::from(stream);
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    Ok(())
}

/// Connects to the right neighbour and claims the left one's connection.
pub async fn connect(spec: &RingSpec, inbox: &TcpInbox) -> Result<RingLinks, RingError> {
    let timeout = spec.options.timeout;
    let (left, right) = (spec.left(), spec.right());
    let key = LinkKey {
        job: spec.job,
        generation: spec.generation,
        from_rank: spec.rank,
    };
    let dial = dial_right(&right, key, timeout);
    let accept = async {
        let left_key = LinkKey {
            from_rank: left.rank,
            ..key
        };
        inbox
            .inbox
            .claim(left_key, timeout)
            .await
            .ok_or_else(|| RingError::Timeout {
                peer: left.clone(),
                timeout,
                during: "waiting for it to connect".into(),
            })
    };
    let (to_right, from_left) = tokio::try_join!(dial, accept)?;
    let io = |peer: &Peer, e| RingError::io(peer, "setting up the link", timeout, e);
    tune(&to_right, timeout).map_err(|e| io(&right, e))?;
    tune(&from_left, timeout).map_err(|e| io(&left, e))?;
    let abort = Arc::new(TcpAbort {
        streams: vec![
            to_right.try_clone().map_err(|e| io(&right, e))?,
            from_left.try_clone().map_err(|e| io(&left, e))?,
        ],
    });
    Ok(RingLinks {
        sender: Box::new(TcpSender {
            stream: to_right,
            peer: right.clone(),
            timeout,
        }),
        receiver: Box::new(TcpReceiver {
            stream: from_left,
            peer: left.clone(),
            timeout,
            piece: vec![0u32; PIECE_BYTES / 4],
        }),
        left,
        right,
        abort,
    })
}

async fn dial_right(right: &Peer, key: LinkKey, timeout: Duration) -> Result<TcpStream, RingError> {
    let deadline = tokio::time::Instant::now() + timeout;
    // The neighbour may not be listening yet: retry until the deadline.
    let mut stream = retry(
        deadline,
        DIAL_BACKOFF,
        || tokio::net::TcpStream::connect(&right.addr),
        |e| tracing::debug!(peer = %right, error = %e, "ring connect retry"),
    )
    .await
    .map_err(|gave_up| match gave_up {
        GaveUp::Failed(e) => RingError::io(right, "connecting", timeout, e),
        GaveUp::Deadline => RingError::Timeout {
            peer: right.clone(),
            timeout,
            during: "connecting".into(),
        },
    })?;
    let exchange = async {
        stream.write_all(&hello(&key)).await?;
        let status = stream.read_u8().await?;
        if status == 0 {
            return Ok(Ok(()));
        }
        let len = stream.read_u16_le().await?;
        let mut why = vec![0u8; usize::from(len)];
        stream.read_exact(&mut why).await?;
        Ok::<_, std::io::Error>(Err(String::from_utf8_lossy(&why).into_owned()))
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => Err(RingError::Timeout {
            peer: right.clone(),
            timeout,
            during: "handshaking".into(),
        }),
        Ok(Err(e)) => Err(RingError::io(right, "handshaking", timeout, e)),
        Ok(Ok(Err(why))) => Err(RingError::Setup(format!("{right} refused the link: {why}"))),
        Ok(Ok(Ok(()))) => stream
            .into_std()
            .map_err(|e| RingError::io(right, "handshaking", timeout, e)),
    }
}

struct TcpAbort {
    streams: Vec<TcpStream>,
}

impl LinkAbort for TcpAbort {
    fn abort(&self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

struct TcpSender {
    stream: TcpStream,
    peer: Peer,
    timeout: Duration,
}

impl FrameSender for TcpSender {
    fn send(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), RingError> {
        let during = || {
            format!(
                "sending step {} {} chunk {}",
                header.step, header.phase, header.chunk
            )
        };
        // Header and payload in one writev, so the header never travels alone.
        let head = header.to_bytes();
        let total = head.len() + payload.len();
        let mut sent = 0;
        while sent < total {
            let bufs = if sent < head.len() {
                [IoSlice::new(&head[sent..]), IoSlice::new(payload)]
            } else {
                [
                    IoSlice::new(&payload[sent - head.len()..]),
                    IoSlice::new(&[]),
                ]
            };
            match self.stream.write_vectored(&bufs) {
                Ok(0) => {
                    let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Err(RingError::io(&self.peer, during(), self.timeout, e));
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RingError::io(&self.peer, during(), self.timeout, e)),
            }
        }
        Ok(())
    }
}

struct TcpReceiver {
    stream: TcpStream,
    peer: Peer,
    timeout: Duration,
    /// Small enough to stay in L1/L2 while the engine sums it.
    piece: Vec<u32>,
}

/// Bytes per piece handed to the engine while receiving.
const PIECE_BYTES: usize = 64 * 1024;

impl TcpReceiver {
    fn during(expected: &FrameHeader) -> String {
        format!(
            "receiving step {} {} chunk {}",
            expected.step, expected.phase, expected.chunk
        )
    }

    /// Reads and checks the header of the next frame.
    fn header(&mut self, expected: &FrameHeader) -> Result<(), RingError> {
        let mut raw = [0u8; FrameHeader::LEN];
        self.stream
            .read_exact(&mut raw)
            .map_err(|e| RingError::io(&self.peer, Self::during(expected), self.timeout, e))?;
        let refused = |source| RingError::Refused {
            peer: self.peer.clone(),
            source,
        };
        let got = FrameHeader::from_bytes(&raw).map_err(refused)?;
        got.check(expected).map_err(refused)
    }
}

impl FrameReceiver for TcpReceiver {
    fn recv_pieces(
        &mut self,
        expected: &FrameHeader,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RingError> {
        self.header(expected)?;
        let mut left = expected.payload_bytes();
        while left > 0 {
            let n = left.min(PIECE_BYTES);
            let piece = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut self.piece)[..n];
            self.stream
                .read_exact(piece)
                .map_err(|e| RingError::io(&self.peer, Self::during(expected), self.timeout, e))?;
            sink(piece);
            left -= n;
        }
        Ok(())
    }

    fn recv(&mut self, expected: &FrameHeader, payload: &mut [u8]) -> Result<(), RingError> {
        let during = || Self::during(expected);
        let mut raw = [0u8; FrameHeader::LEN];
        self.stream
            .read_exact(&mut raw)
            .map_err(|e| RingError::io(&self.peer, during(), self.timeout, e))?;
        let refused = |source| RingError::Refused {
            peer: self.peer.clone(),
            source,
        };
        let got = FrameHeader::from_bytes(&raw).map_err(refused)?;
        got.check(expected).map_err(refused)?;
        debug_assert_eq!(got.payload_bytes(), payload.len());
        self.stream
            .read_exact(payload)
            .map_err(|e| RingError::io(&self.peer, during(), self.timeout, e))
    }
}
