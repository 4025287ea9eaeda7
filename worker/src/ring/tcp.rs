//! Raw TCP transport: a 64-byte [`FrameHeader`] then the payload, written
//! straight from (and read straight into) the caller's buffer.
//!
//! Setup is async (accepting and handshaking under a deadline); the data path
//! runs on the engine's blocking threads with socket timeouts as deadlines.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ringtrain_common::retry::{retry, GaveUp};
use ringtrain_common::wire::FrameHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::inbox::{Expectation, Inbox, InboxLimits, LinkKey, Unexpected};
use super::secure::{
    piece_range, proof_matches, Hello, LinkCipher, RingKey, RingSecurity, Transcript, MAX_TAG_LEN,
    NONCE_LEN, PIECE_BYTES, PROOF_LEN,
};
use super::shm::{self, BATCH_PIECES};
use super::transport::{receiving, sending, FrameReceiver, FrameSender, LinkAbort, RingLinks};
use super::{Peer, RingError, RingSpec, DIAL_BACKOFF};

/// Socket buffer size. Bigger is slower here: data that waits long in a
/// large kernel buffer has left the cache when the receiver copies it out.
/// Measured on loopback, 100 MB, W=4: 8 MiB ~135 ms, kernel autotuning
/// ~118 ms, 1 MiB ~110 ms (with 512 KiB segments ~107 ms).
const SOCKET_BUFFER: usize = 1 << 20;

/// The acceptor's verdicts, one byte each; a refusal is followed by its
/// reason (u16 length + UTF-8).
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
/// Nobody expects the link yet: the dialer retries until its deadline.
const NOT_YET: u8 = 2;
/// Longest refusal reason a dialer reads.
const MAX_REASON: usize = 512;

/// An authenticated link parked until claimed.
pub struct TcpInbound {
    stream: TcpStream,
    cipher: LinkCipher,
}

#[cfg(test)]
impl TcpInbound {
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// The local TCP ring endpoint: accepts neighbours, handshakes them and
/// parks their links.
pub struct TcpInbox {
    pub(crate) inbox: Inbox<TcpInbound>,
    addr: std::net::SocketAddr,
}

impl TcpInbox {
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Links parked and expectations registered now.
    pub fn held(&self) -> (usize, usize) {
        self.inbox.held()
    }

    /// Starts accepting on an already-bound listener. The accept loop ends
    /// when `shutdown` resolves.
    pub fn serve(
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        Self::serve_with(listener, InboxLimits::default(), shutdown)
    }

    pub fn serve_with(
        listener: TcpListener,
        limits: InboxLimits,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            inbox: Inbox::new(limits),
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
                            let Some(slot) = inbox.inbox.handshake_slot() else {
                                tracing::warn!(%from, "refused ring connection: too many handshakes in progress");
                                continue;
                            };
                            let inbox = inbox.clone();
                            tokio::spawn(async move {
                                let deadline = tokio::time::Instant::now() + inbox.inbox.limits().handshake_timeout;
                                match tokio::time::timeout_at(deadline, inbox.handshake(stream, deadline)).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(e)) => tracing::warn!(%from, reason = %e, "refused ring connection"),
                                    Err(_) => tracing::warn!(%from, reason = "handshake not completed in time", "refused ring connection"),
                                }
                                drop(slot);
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "ring listener accept failed"),
                    },
                }
            }
        });
        Ok(me)
    }

    /// The acceptor's side of the handshake (see [`super::secure`]). Every
    /// way out but success drops the stream.
    async fn handshake(
        &self,
        mut stream: tokio::net::TcpStream,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let mut b = [0u8; Hello::LEN];
        stream
            .read_exact(&mut b)
            .await
            .map_err(|e| format!("reading hello: {e}"))?;
        let hello = Hello::from_bytes(&b)?;
        let key = hello.link_key();
        let e = match self.inbox.expectation(&key, deadline).await {
            Ok(e) => e,
            Err(why) => {
                let code = match why {
                    Unexpected::NotYet(_) => NOT_YET,
                    Unexpected::Stale(_) => REFUSED,
                };
                let _ = refuse(&mut stream, code, &why.to_string()).await;
                return Err(why.to_string());
            }
        };
        if let Err(why) = check_hello(&hello, &e) {
            let _ = refuse(&mut stream, REFUSED, &why).await;
            return Err(why);
        }
        let nonce: [u8; NONCE_LEN] = rand::random();
        let transcript = Transcript::new(&hello, &nonce);
        let mut challenge = [0u8; 1 + NONCE_LEN + PROOF_LEN];
        challenge[0] = ACCEPTED;
        challenge[1..1 + NONCE_LEN].copy_from_slice(&nonce);
        challenge[1 + NONCE_LEN..].copy_from_slice(&transcript.acceptor_proof(&e.key));
        stream
            .write_all(&challenge)
            .await
            .map_err(|e| format!("sending challenge: {e}"))?;
        let mut proof = [0u8; PROOF_LEN];
        stream
            .read_exact(&mut proof)
            .await
            .map_err(|e| format!("reading proof: {e}"))?;
        if !proof_matches(&transcript.dialer_proof(&e.key), &proof) {
            let why = format!(
                "{} failed the handshake for generation {} of job {}: it does not hold this ring's key",
                key.from_rank, key.generation.0, key.job
            );
            let _ = refuse(&mut stream, REFUSED, &why).await;
            return Err(why);
        }
        stream
            .write_all(&[ACCEPTED])
            .await
            .map_err(|e| format!("accepting: {e}"))?;
        let stream = stream
            .into_std()
            .map_err(|e| format!("detaching stream: {e}"))?;
        let cipher = LinkCipher::new(e.security, &transcript.session_key(&e.key));
        self.inbox.deliver(key, TcpInbound { stream, cipher })
    }
}

/// Refuses a hello addressed to someone else or speaking another mode.
pub(crate) fn check_hello(hello: &Hello, e: &Expectation) -> Result<(), String> {
    if hello.to_rank != e.rank {
        return Err(format!(
            "hello from {} is addressed to {}, but this is {}",
            hello.from_rank, hello.to_rank, e.rank
        ));
    }
    if hello.security != e.security {
        return Err(format!(
            "{} speaks ring security {}, this member {}",
            hello.from_rank, hello.security, e.security
        ));
    }
    Ok(())
}

async fn refuse(stream: &mut tokio::net::TcpStream, code: u8, why: &str) -> std::io::Result<()> {
    let why = &why.as_bytes()[..why.len().min(MAX_REASON)];
    let mut m = vec![code];
    m.extend_from_slice(&(why.len() as u16).to_le_bytes());
    m.extend_from_slice(why);
    stream.write_all(&m).await
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
    let security = spec.options.security;
    let (left, right) = (spec.left(), spec.right());
    let key = LinkKey {
        job: spec.job,
        generation: spec.generation,
        from_rank: spec.rank,
    };
    let left_key = LinkKey {
        from_rank: left.rank,
        ..key
    };
    let _expecting = inbox.inbox.expect(
        left_key,
        Expectation {
            key: spec.key.clone(),
            rank: spec.rank,
            security,
        },
    );
    let dial = dial_right(&right, key, &spec.key, security, timeout);
    let accept = async {
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
    let ((to_right, send_cipher), from_left) = tokio::try_join!(dial, accept)?;
    let io = |peer: &Peer, e| RingError::io(peer, "setting up the link", timeout, e);
    tune(&to_right, timeout).map_err(|e| io(&right, e))?;
    tune(&from_left.stream, timeout).map_err(|e| io(&left, e))?;
    let abort = Arc::new(TcpAbort {
        streams: vec![
            to_right.try_clone().map_err(|e| io(&right, e))?,
            from_left.stream.try_clone().map_err(|e| io(&left, e))?,
        ],
    });
    let shared_memory = spec.options.shared_memory;
    let seal_shared_memory = spec.options.seal_shared_memory;
    let (sender, receiver) = tokio::task::spawn_blocking({
        let (left, right) = (left.clone(), right.clone());
        move || {
            planes(
                (to_right, send_cipher, right),
                (from_left.stream, from_left.cipher, left),
                timeout,
                shared_memory,
                seal_shared_memory,
            )
        }
    })
    .await
    .map_err(|e| RingError::Setup(format!("ring link setup failed: {e}")))??;
    Ok(RingLinks {
        sender,
        receiver,
        left,
        right,
        abort,
    })
}

type Planes = (Box<dyn FrameSender>, Box<dyn FrameReceiver>);

/// Chooses how frames travel on each of this rank's two links: through
/// shared memory where the neighbour is on this host (see [`shm`]), else on
/// the TCP connection itself. Every rank writes its offer before it reads
/// anything, so the exchange cannot deadlock around the ring.
fn planes(
    (to_right, send_cipher, right): (TcpStream, LinkCipher, Peer),
    (from_left, recv_cipher, left): (TcpStream, LinkCipher, Peer),
    timeout: Duration,
    shared_memory: bool,
    seal_shared_memory: bool,
) -> Result<Planes, RingError> {
    // Frames through shared memory need no sealing: see `RingOptions`.
    let shm_cipher = |cipher: LinkCipher| {
        if seal_shared_memory {
            cipher
        } else {
            LinkCipher::plain()
        }
    };
    let offer = shm::Offer::create(shared_memory);
    let during = "choosing the link's data plane";
    (&to_right)
        .write_all(&offer.to_bytes())
        .map_err(|e| RingError::io(&right, during, timeout, e))?;
    let mut theirs = [0u8; shm::OFFER_BYTES];
    (&from_left)
        .read_exact(&mut theirs)
        .map_err(|e| RingError::io(&left, during, timeout, e))?;
    let inbound = shm::take_offer(&theirs, shared_memory);
    let answer = if inbound.is_some() {
        shm::ANSWER_TAKEN
    } else {
        shm::ANSWER_DECLINED
    };
    (&from_left)
        .write_all(&[answer])
        .map_err(|e| RingError::io(&left, during, timeout, e))?;
    let mut answer = [0u8; 1];
    (&to_right)
        .read_exact(&mut answer)
        .map_err(|e| RingError::io(&right, during, timeout, e))?;
    let taken = match answer[0] {
        shm::ANSWER_TAKEN => true,
        shm::ANSWER_DECLINED => false,
        other => {
            return Err(RingError::Setup(format!(
                "{right} answered the data-plane offer with {other:#x}"
            )))
        }
    };
    let sender: Box<dyn FrameSender> = match offer.settle(taken) {
        Some(map) => {
            tracing::debug!(%right, "ring link to the right through shared memory");
            Box::new(shm::ShmSender::new(
                map,
                to_right,
                shm_cipher(send_cipher),
                right,
                timeout,
            ))
        }
        None => {
            let scratch = if send_cipher.encrypts() {
                vec![0u8; BATCH_PIECES * (PIECE_BYTES + MAX_TAG_LEN)]
            } else {
                Vec::new()
            };
            Box::new(TcpSender {
                stream: to_right,
                peer: right,
                timeout,
                cipher: send_cipher,
                scratch,
            })
        }
    };
    let receiver: Box<dyn FrameReceiver> = match inbound {
        Some(map) => Box::new(shm::ShmReceiver::new(
            map,
            from_left,
            shm_cipher(recv_cipher),
            left,
            timeout,
        )),
        None => Box::new(TcpReceiver {
            stream: from_left,
            cipher: recv_cipher,
            peer: left,
            timeout,
            pieces: vec![0u32; BATCH_PIECES * (PIECE_BYTES + MAX_TAG_LEN) / 4],
        }),
    };
    Ok((sender, receiver))
}

/// How one dial attempt ended, short of an I/O error.
enum Dialed {
    Linked(tokio::net::TcpStream, LinkCipher),
    /// The neighbour does not expect us yet: try again.
    NotYet(String),
}

async fn dial_right(
    right: &Peer,
    key: LinkKey,
    ring_key: &RingKey,
    security: RingSecurity,
    timeout: Duration,
) -> Result<(TcpStream, LinkCipher), RingError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = |during: &str| RingError::Timeout {
        peer: right.clone(),
        timeout,
        during: during.into(),
    };
    loop {
        // The neighbour may not be listening yet: retry until the deadline.
        let stream = retry(
            deadline,
            DIAL_BACKOFF,
            || tokio::net::TcpStream::connect(&right.addr),
            |e| tracing::debug!(peer = %right, error = %e, "ring connect retry"),
        )
        .await
        .map_err(|gave_up| match gave_up {
            GaveUp::Failed(e) => RingError::io(right, "connecting", timeout, e),
            GaveUp::Deadline => timed_out("connecting"),
        })?;
        let hello = Hello::new(key, right.rank, security);
        match tokio::time::timeout_at(deadline, dial_handshake(stream, &hello, ring_key)).await {
            Err(_) => return Err(timed_out("handshaking")),
            Ok(Err(e)) => return Err(RingError::io(right, "handshaking", timeout, e)),
            Ok(Ok(Err(why))) => {
                return Err(RingError::Setup(format!("{right} refused the link: {why}")))
            }
            Ok(Ok(Ok(Dialed::Linked(stream, cipher)))) => {
                let stream = stream
                    .into_std()
                    .map_err(|e| RingError::io(right, "handshaking", timeout, e))?;
                return Ok((stream, cipher));
            }
            Ok(Ok(Ok(Dialed::NotYet(why)))) => {
                tracing::debug!(peer = %right, reason = %why, "ring handshake retry");
                if tokio::time::Instant::now() + DIAL_BACKOFF.first >= deadline {
                    return Err(timed_out("waiting for it to expect us"));
                }
                tokio::time::sleep(DIAL_BACKOFF.first).await;
            }
        }
    }
}

/// The dialer's side of the handshake. `Ok(Err(why))`: refused for good.
async fn dial_handshake(
    mut stream: tokio::net::TcpStream,
    hello: &Hello,
    ring_key: &RingKey,
) -> std::io::Result<Result<Dialed, String>> {
    async fn reason(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
        let len = usize::from(stream.read_u16_le().await?).min(MAX_REASON);
        let mut why = vec![0u8; len];
        stream.read_exact(&mut why).await?;
        Ok(String::from_utf8_lossy(&why).into_owned())
    }
    stream.write_all(&hello.to_bytes()).await?;
    match stream.read_u8().await? {
        ACCEPTED => {}
        NOT_YET => return Ok(Ok(Dialed::NotYet(reason(&mut stream).await?))),
        _ => return Ok(Err(reason(&mut stream).await?)),
    }
    let mut challenge = [0u8; NONCE_LEN + PROOF_LEN];
    stream.read_exact(&mut challenge).await?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&challenge[..NONCE_LEN]);
    let transcript = Transcript::new(hello, &nonce);
    if !proof_matches(
        &transcript.acceptor_proof(ring_key),
        &challenge[NONCE_LEN..],
    ) {
        return Ok(Err(
            "it failed the handshake: it does not hold this ring's key".into(),
        ));
    }
    stream.write_all(&transcript.dialer_proof(ring_key)).await?;
    if stream.read_u8().await? != ACCEPTED {
        return Ok(Err(reason(&mut stream).await?));
    }
    let cipher = LinkCipher::new(hello.security, &transcript.session_key(ring_key));
    Ok(Ok(Dialed::Linked(stream, cipher)))
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
    cipher: LinkCipher,
    /// A sealed piece and its tag, when sealing encrypts.
    scratch: Vec<u8>,
}

/// Writes every byte of `bufs` (std's `write_all_vectored` is unstable).
fn write_all_vectored(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until every byte of `bufs` is filled.
fn read_exact_vectored(
    stream: &mut TcpStream,
    mut bufs: &mut [IoSliceMut<'_>],
) -> std::io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.read_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl TcpSender {
    /// Header, then each piece followed by its tag, [`BATCH_PIECES`] pieces
    /// per write: one syscall per 64 KiB piece cost more than the sealing
    /// saved by staying in L1. The header goes out with the first batch, so
    /// it never travels alone.
    fn send_sealed(
        &mut self,
        head: &[u8; FrameHeader::LEN],
        payload: &[u8],
    ) -> std::io::Result<()> {
        let tag_len = self.cipher.tag_len();
        let pieces = self.cipher.pieces(payload.len());
        for batch in (0..pieces).step_by(BATCH_PIECES) {
            let end = (batch + BATCH_PIECES).min(pieces);
            let first: &[u8] = if batch == 0 { head } else { &[] };
            if self.cipher.encrypts() {
                // Sealing rewrites the bytes: seal a copy, never the caller's values.
                let mut at = 0;
                for i in batch..end {
                    let data = &payload[piece_range(payload.len(), i)];
                    let (body, rest) = self.scratch[at..].split_at_mut(data.len());
                    body.copy_from_slice(data);
                    self.cipher
                        .seal_in_place(head, i as u32, body, &mut rest[..tag_len]);
                    at += data.len() + tag_len;
                }
                write_all_vectored(
                    &mut self.stream,
                    &mut [IoSlice::new(first), IoSlice::new(&self.scratch[..at])],
                )?;
            } else {
                let mut tags = [[0u8; MAX_TAG_LEN]; BATCH_PIECES];
                for i in batch..end {
                    let data = &payload[piece_range(payload.len(), i)];
                    self.cipher
                        .tag(head, i as u32, data, &mut tags[i - batch][..tag_len]);
                }
                let mut bufs = Vec::with_capacity(1 + 2 * BATCH_PIECES);
                bufs.push(IoSlice::new(first));
                for i in batch..end {
                    bufs.push(IoSlice::new(&payload[piece_range(payload.len(), i)]));
                    bufs.push(IoSlice::new(&tags[i - batch][..tag_len]));
                }
                write_all_vectored(&mut self.stream, &mut bufs)?;
            }
        }
        Ok(())
    }
}

impl FrameSender for TcpSender {
    fn plane(&self) -> &'static str {
        "tcp"
    }

    fn send(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), RingError> {
        let head = header.to_bytes();
        let sent = if self.cipher.protects() {
            self.send_sealed(&head, payload)
        } else {
            // Header and payload in one writev, so the header never travels alone.
            write_all_vectored(
                &mut self.stream,
                &mut [IoSlice::new(&head), IoSlice::new(payload)],
            )
        };
        self.cipher.next_frame();
        sent.map_err(|e| RingError::io(&self.peer, sending(header), self.timeout, e))
    }
}

struct TcpReceiver {
    stream: TcpStream,
    cipher: LinkCipher,
    peer: Peer,
    timeout: Duration,
    /// A batch of sealed pieces: small enough to stay in L2 while the engine
    /// sums it (u32 so every piece is 4-aligned for the f32 sink).
    pieces: Vec<u32>,
}

impl TcpReceiver {
    fn io(&self, expected: &FrameHeader, e: std::io::Error) -> RingError {
        RingError::io(&self.peer, receiving(expected), self.timeout, e)
    }

    fn refused(&self, source: ringtrain_common::wire::WireError) -> RingError {
        RingError::Refused {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Reads and checks the header of the next frame: only the expected
    /// frame's length is ever read, whatever a peer claims.
    fn header(&mut self, expected: &FrameHeader) -> Result<[u8; FrameHeader::LEN], RingError> {
        let mut raw = [0u8; FrameHeader::LEN];
        self.stream
            .read_exact(&mut raw)
            .map_err(|e| self.io(expected, e))?;
        let got = FrameHeader::from_bytes(&raw).map_err(|e| self.refused(e))?;
        got.check(expected).map_err(|e| self.refused(e))?;
        Ok(raw)
    }

    /// Hands each checked piece of the next frame to `sink`; nothing unchecked
    /// reaches it. Reads [`BATCH_PIECES`] pieces per syscall.
    fn recv_checked(
        &mut self,
        expected: &FrameHeader,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RingError> {
        let head = self.header(expected)?;
        let total = expected.payload_bytes();
        let tag_len = self.cipher.tag_len();
        let pieces = if self.cipher.protects() {
            self.cipher.pieces(total)
        } else {
            total.div_ceil(PIECE_BYTES)
        };
        let result = (|| {
            for batch in (0..pieces).step_by(BATCH_PIECES) {
                let end = (batch + BATCH_PIECES).min(pieces);
                let bytes: usize = (batch..end)
                    .map(|i| piece_range(total, i).len() + tag_len)
                    .sum();
                let buf = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut self.pieces)[..bytes];
                self.stream
                    .read_exact(buf)
                    .map_err(|e| RingError::io(&self.peer, receiving(expected), self.timeout, e))?;
                let mut at = 0;
                for i in batch..end {
                    let n = piece_range(total, i).len() + tag_len;
                    let plain = self
                        .cipher
                        .open_in_place(&head, i as u32, &mut buf[at..at + n])
                        .map_err(|source| RingError::Refused {
                            peer: self.peer.clone(),
                            source,
                        })?;
                    sink(plain);
                    at += n;
                }
            }
            Ok(())
        })();
        self.cipher.next_frame();
        result
    }

    /// Reads a sealed frame straight into `payload` (tags apart) and opens it
    /// there: no copy. On an error `payload` holds unchecked bytes; the
    /// all-reduce fails, and its caller discards the buffer.
    fn recv_in_place(
        &mut self,
        expected: &FrameHeader,
        payload: &mut [u8],
    ) -> Result<(), RingError> {
        let head = self.header(expected)?;
        let total = payload.len();
        let tag_len = self.cipher.tag_len();
        let pieces = self.cipher.pieces(total);
        let mut tags = [[0u8; MAX_TAG_LEN]; BATCH_PIECES];
        let result = (|| {
            for batch in (0..pieces).step_by(BATCH_PIECES) {
                let end = (batch + BATCH_PIECES).min(pieces);
                let span = piece_range(total, batch).start..piece_range(total, end - 1).end;
                {
                    let mut bufs = Vec::with_capacity(2 * BATCH_PIECES);
                    let mut rest = &mut payload[span.clone()];
                    for tag in tags.iter_mut().take(end - batch) {
                        let (body, tail) = rest.split_at_mut(rest.len().min(PIECE_BYTES));
                        bufs.push(IoSliceMut::new(body));
                        bufs.push(IoSliceMut::new(&mut tag[..tag_len]));
                        rest = tail;
                    }
                    read_exact_vectored(&mut self.stream, &mut bufs).map_err(|e| {
                        RingError::io(&self.peer, receiving(expected), self.timeout, e)
                    })?;
                }
                for i in batch..end {
                    self.cipher
                        .open_detached(
                            &head,
                            i as u32,
                            &mut payload[piece_range(total, i)],
                            &tags[i - batch][..tag_len],
                        )
                        .map_err(|e| self.refused(e))?;
                }
            }
            Ok(())
        })();
        self.cipher.next_frame();
        result
    }
}

impl FrameReceiver for TcpReceiver {
    fn recv_pieces(
        &mut self,
        expected: &FrameHeader,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RingError> {
        self.recv_checked(expected, sink)
    }

    fn recv(&mut self, expected: &FrameHeader, payload: &mut [u8]) -> Result<(), RingError> {
        if !self.cipher.protects() {
            // Straight into place: nothing to check.
            self.header(expected)?;
            debug_assert_eq!(expected.payload_bytes(), payload.len());
            return self
                .stream
                .read_exact(payload)
                .map_err(|e| self.io(expected, e));
        }
        debug_assert_eq!(expected.payload_bytes(), payload.len());
        self.recv_in_place(expected, payload)
    }
}
