//! gRPC transport: the left neighbour opens one bidirectional `Ring.Stream`
//! per ring generation and sends [`RingFrame`]s on it; the receiver answers on
//! the reverse stream only to explain a refusal.
//!
//! The handshake (see [`super::secure`]) rides on the call: the hello in the
//! request metadata, the acceptor's nonce and proof in the response
//! metadata, the dialer's proof in the stream's first message. Payloads are
//! sealed as on TCP. Payloads are `bytes::Bytes` and HTTP/2 windows are sized
//! for megabyte segments. The engine's blocking threads drive the async halves through a
//! runtime handle.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use ringtrain_common::retry::{retry, GaveUp};
use ringtrain_common::wire::{FrameHeader, Phase, WireEncoding, WireError};
use ringtrain_common::{JobId, Rank, RingGeneration};
use ringtrain_proto::ring_client::RingClient;
use ringtrain_proto::ring_server::{Ring as RingRpc, RingServer};
use ringtrain_proto::{RingFrame, RingReply};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::inbox::{Expectation, Inbox, InboxLimits, LinkKey, Unexpected};
use super::secure::{
    proof_matches, Hello, LinkCipher, RingKey, RingSecurity, Transcript, MAX_TAG_LEN, NONCE_LEN,
    PIECE_BYTES, PROOF_LEN,
};
use super::tcp::check_hello;
use super::transport::{FrameReceiver, FrameSender, LinkAbort, RingLinks};
use super::{Peer, RingError, RingSpec, DIAL_BACKOFF, MAX_SEGMENT_BYTES};

/// Large enough for the largest sealed segment, and no larger: what one
/// message from a peer can make us allocate.
pub const MAX_MESSAGE: usize =
    MAX_SEGMENT_BYTES + (MAX_SEGMENT_BYTES / PIECE_BYTES + 1) * MAX_TAG_LEN + 4096;
/// HTTP/2 flow-control windows: several segments in flight per stream.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// The dialer's [`Hello`], hex.
const META_HELLO: &str = "x-ringtrain-hello";
/// The acceptor's nonce then proof, hex.
const META_CHALLENGE: &str = "x-ringtrain-challenge";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// An incoming authenticated stream from a left neighbour, waiting to be claimed.
pub struct GrpcInbound {
    frames: Streaming<RingFrame>,
    replies: mpsc::Sender<Result<RingReply, Status>>,
    cipher: LinkCipher,
}

pub type GrpcInbox = Inbox<GrpcInbound>;

/// The `Ring` gRPC service: parks incoming streams in the inbox.
#[derive(Clone)]
pub struct RingService {
    inbox: Arc<GrpcInbox>,
}

impl RingService {
    pub fn new(inbox: Arc<GrpcInbox>) -> Self {
        Self { inbox }
    }

    /// The tonic service with message limits raised for gradient segments.
    pub fn into_server(self) -> RingServer<Self> {
        RingServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

fn hello_of(req: &Request<Streaming<RingFrame>>) -> Result<Hello, Status> {
    let raw = req
        .metadata()
        .get(META_HELLO)
        .and_then(|v| v.to_str().ok())
        .and_then(unhex)
        .ok_or_else(|| Status::invalid_argument(format!("missing or bad metadata {META_HELLO}")))?;
    Hello::from_bytes(&raw).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl RingRpc for RingService {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<RingReply, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<RingFrame>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let from = request
            .remote_addr()
            .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
        let refused = |status: Status| {
            tracing::warn!(%from, reason = %status.message(), "refused ring stream");
            status
        };
        let slot = self.inbox.handshake_slot().ok_or_else(|| {
            refused(Status::resource_exhausted(
                "too many ring handshakes in progress",
            ))
        })?;
        let deadline = tokio::time::Instant::now() + self.inbox.limits().handshake_timeout;
        let hello = hello_of(&request).map_err(refused)?;
        let key = hello.link_key();
        let e = self
            .inbox
            .expectation(&key, deadline)
            .await
            .map_err(|why| {
                refused(match why {
                    Unexpected::NotYet(w) => Status::unavailable(w),
                    Unexpected::Stale(w) => Status::failed_precondition(w),
                })
            })?;
        check_hello(&hello, &e).map_err(|why| refused(Status::permission_denied(why)))?;
        let nonce: [u8; NONCE_LEN] = rand::random();
        let transcript = Transcript::new(&hello, &nonce);
        let mut challenge = nonce.to_vec();
        challenge.extend_from_slice(&transcript.acceptor_proof(&e.key));
        let (replies, reply_rx) = mpsc::channel(4);
        let mut frames = request.into_inner();
        let inbox = self.inbox.clone();
        // The dialer's proof comes as the first message: wait for it off the
        // call, still holding the handshake slot and under the same deadline.
        tokio::spawn(async move {
            let first = tokio::time::timeout_at(deadline, frames.message()).await;
            let why = match first {
                Err(_) => "handshake not completed in time".to_string(),
                Ok(Err(status)) => format!("reading proof: {}", status.message()),
                Ok(Ok(None)) => "closed before its proof".to_string(),
                Ok(Ok(Some(f))) if f.payload.is_empty() && proof_matches(&transcript.dialer_proof(&e.key), &f.proof) => {
                    let cipher = LinkCipher::new(e.security, &transcript.session_key(&e.key));
                    let inbound = GrpcInbound { frames, replies: replies.clone(), cipher };
                    match inbox.deliver(key, inbound) {
                        Ok(()) => return,
                        Err(why) => why,
                    }
                }
                Ok(Ok(Some(_))) => format!(
                    "{} failed the handshake for generation {} of job {}: it does not hold this ring's key",
                    key.from_rank, key.generation.0, key.job
                ),
            };
            tracing::warn!(%from, reason = %why, "refused ring stream");
            let _ = replies.try_send(Err(Status::permission_denied(why)));
            drop(slot);
        });
        let mut response =
            Response::new(Box::pin(ReceiverStream::new(reply_rx)) as Self::StreamStream);
        let value = hex(&challenge)
            .parse()
            .map_err(|_| Status::internal("challenge metadata"))?;
        response.metadata_mut().insert(META_CHALLENGE, value);
        Ok(response)
    }
}

/// Serves the ring service alone on an already-bound listener (benchmarks and
/// tests; the worker mounts [`RingService`] on its own server instead).
pub fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Arc<GrpcInbox> {
    serve_with(listener, InboxLimits::default(), shutdown)
}

pub fn serve_with(
    listener: tokio::net::TcpListener,
    limits: InboxLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Arc<GrpcInbox> {
    let inbox = Arc::new(GrpcInbox::new(limits));
    let svc = RingService::new(inbox.clone()).into_server();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = ringtrain_common::security::process_transport().server(
            server_builder(),
            ringtrain_common::security::CertRole::Worker,
        );
        let mut server = match server {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "ring gRPC server TLS settings");
                return;
            }
        };
        let result = server
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "ring gRPC server failed");
        }
    });
    inbox
}

/// A server builder with HTTP/2 tuned for large streaming messages.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some((1 << 24) - 1))
}

async fn dial(right: &Peer, timeout: Duration) -> Result<Channel, RingError> {
    // Over TLS (the worker's process transport) with the worker certificate.
    let endpoint = ringtrain_common::security::process_transport()
        .endpoint(
            &right.addr,
            ringtrain_common::security::CertRole::Worker,
            Some(ringtrain_common::security::CertRole::Worker),
        )
        .map_err(|e| RingError::Setup(format!("{right}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW));
    let deadline = tokio::time::Instant::now() + timeout;
    retry(
        deadline,
        DIAL_BACKOFF,
        || endpoint.connect(),
        |e| tracing::debug!(peer = %right, error = %e, "ring connect retry"),
    )
    .await
    .map_err(|gave_up| match gave_up {
        GaveUp::Failed(e) => RingError::Setup(format!("cannot connect to {right}: {e}")),
        GaveUp::Deadline => RingError::Timeout {
            peer: right.clone(),
            timeout,
            during: "connecting".into(),
        },
    })
}

/// Opens the stream to the right neighbour and claims the left one's.
pub async fn connect(spec: &RingSpec, inbox: &GrpcInbox) -> Result<RingLinks, RingError> {
    let timeout = spec.options.timeout;
    let security = spec.options.security;
    let (left, right) = (spec.left(), spec.right());
    let (abort_tx, abort_rx) = watch::channel(false);
    let refusal = Arc::new(Mutex::new(None::<String>));
    let key = LinkKey {
        job: spec.job,
        generation: spec.generation,
        from_rank: spec.rank,
    };
    let left_key = LinkKey {
        from_rank: left.rank,
        ..key
    };
    let _expecting = inbox.expect(
        left_key,
        Expectation {
            key: spec.key.clone(),
            rank: spec.rank,
            security,
        },
    );

    let open_right = async {
        let deadline = tokio::time::Instant::now() + timeout;
        let channel = dial(&right, timeout).await?;
        let client = RingClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (tx, replies, cipher) = loop {
            match open_stream(client.clone(), &right, key, &spec.key, security, deadline).await? {
                Some(opened) => break opened,
                // Not expected yet: the neighbour has not learned of this ring.
                None => tokio::time::sleep(DIAL_BACKOFF.first).await,
            }
        };
        // Remember why the neighbour closed the stream, if it says.
        let slot = refusal.clone();
        tokio::spawn(async move {
            let mut replies = replies;
            let why = match replies.message().await {
                Ok(Some(r)) => r.error,
                Ok(None) => return,
                Err(status) => status.message().to_string(),
            };
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        });
        Ok::<_, RingError>((tx, cipher))
    };
    let claim_left = async {
        inbox
            .claim(left_key, timeout)
            .await
            .ok_or_else(|| RingError::Timeout {
                peer: left.clone(),
                timeout,
                during: "waiting for it to connect".into(),
            })
    };
    let ((tx, cipher), inbound) = tokio::try_join!(open_right, claim_left)?;
    let handle = Handle::current();
    Ok(RingLinks {
        sender: Box::new(GrpcSender {
            tx,
            cipher,
            peer: right.clone(),
            timeout,
            handle: handle.clone(),
            abort: abort_rx.clone(),
            refusal,
        }),
        receiver: Box::new(GrpcReceiver {
            inbound,
            peer: left.clone(),
            timeout,
            handle,
            abort: abort_rx,
            scratch: vec![0u8; PIECE_BYTES + MAX_TAG_LEN],
        }),
        left,
        right,
        abort: Arc::new(GrpcAbort(abort_tx)),
    })
}

type Opened = (mpsc::Sender<RingFrame>, Streaming<RingReply>, LinkCipher);

/// One attempt at the stream and its handshake. `None`: the neighbour does
/// not expect us yet (retry).
async fn open_stream(
    mut client: RingClient<Channel>,
    right: &Peer,
    key: LinkKey,
    ring_key: &RingKey,
    security: RingSecurity,
    deadline: tokio::time::Instant,
) -> Result<Option<Opened>, RingError> {
    let timed_out = || RingError::Timeout {
        peer: right.clone(),
        timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
        during: "opening the ring stream".into(),
    };
    let (tx, rx) = mpsc::channel::<RingFrame>(4);
    let hello = Hello::new(key, right.rank, security);
    let mut req = Request::new(ReceiverStream::new(rx));
    let value = hex(&hello.to_bytes())
        .parse()
        .map_err(|e| RingError::Setup(format!("metadata: {e}")))?;
    req.metadata_mut().insert(META_HELLO, value);
    let resp = match tokio::time::timeout_at(deadline, client.stream(req)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            if tokio::time::Instant::now() + DIAL_BACKOFF.first >= deadline {
                return Err(timed_out());
            }
            return Ok(None);
        }
        Ok(Err(status)) => {
            return Err(RingError::Setup(format!(
                "{right} refused the link: {}",
                status.message()
            )))
        }
        Ok(Ok(resp)) => resp,
    };
    let challenge = resp
        .metadata()
        .get(META_CHALLENGE)
        .and_then(|v| v.to_str().ok())
        .and_then(unhex)
        .filter(|c| c.len() == NONCE_LEN + PROOF_LEN)
        .ok_or_else(|| RingError::Setup(format!("{right} sent no handshake challenge")))?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&challenge[..NONCE_LEN]);
    let transcript = Transcript::new(&hello, &nonce);
    if !proof_matches(
        &transcript.acceptor_proof(ring_key),
        &challenge[NONCE_LEN..],
    ) {
        return Err(RingError::Setup(format!(
            "{right} failed the handshake: it does not hold this ring's key"
        )));
    }
    let proof = RingFrame {
        proof: transcript.dialer_proof(ring_key).to_vec(),
        ..RingFrame::default()
    };
    tx.send(proof).await.map_err(|_| RingError::Disconnected {
        peer: right.clone(),
        during: "handshaking".into(),
    })?;
    let cipher = LinkCipher::new(security, &transcript.session_key(ring_key));
    Ok(Some((tx, resp.into_inner(), cipher)))
}

struct GrpcAbort(watch::Sender<bool>);

impl LinkAbort for GrpcAbort {
    fn abort(&self) {
        let _ = self.0.send(true);
    }
}

async fn aborted(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|a| *a).await;
}

struct GrpcSender {
    tx: mpsc::Sender<RingFrame>,
    cipher: LinkCipher,
    peer: Peer,
    timeout: Duration,
    handle: Handle,
    abort: watch::Receiver<bool>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl FrameSender for GrpcSender {
    fn plane(&self) -> &'static str {
        "grpc"
    }

    fn send(&mut self, h: &FrameHeader, payload: &[u8]) -> Result<(), RingError> {
        let payload = seal(&mut self.cipher, h, payload);
        let frame = RingFrame {
            job_id: h.job.0,
            ring_generation: h.generation.0,
            step: h.step,
            phase: h.phase as u32,
            ring_step: h.ring_step,
            chunk: h.chunk,
            offset: h.offset,
            elements: h.elements,
            encoding: h.encoding.as_u32(),
            from_rank: h.from_rank.0,
            payload,
            proof: Vec::new(),
        };
        let during = super::transport::sending(h);
        let abort = self.abort.clone();
        let sent = self.handle.block_on(async {
            tokio::select! {
                r = tokio::time::timeout(self.timeout, self.tx.send(frame)) => Some(r),
                _ = aborted(abort) => None,
            }
        });
        match sent {
            None => Err(RingError::Aborted),
            Some(Ok(Ok(()))) => Ok(()),
            Some(Err(_)) => Err(RingError::Timeout {
                peer: self.peer.clone(),
                timeout: self.timeout,
                during,
            }),
            Some(Ok(Err(_closed))) => {
                match self
                    .refusal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                {
                    Some(why) => Err(RingError::Setup(format!(
                        "{} refused our frames: {why}",
                        self.peer
                    ))),
                    None => Err(RingError::Disconnected {
                        peer: self.peer.clone(),
                        during,
                    }),
                }
            }
        }
    }
}

/// The sealed body of one frame (pieces each followed by its tag), and on to
/// the next frame.
fn seal(cipher: &mut LinkCipher, h: &FrameHeader, payload: &[u8]) -> Bytes {
    if !cipher.protects() {
        cipher.next_frame();
        return Bytes::copy_from_slice(payload);
    }
    let head = h.to_bytes();
    let tag_len = cipher.tag_len();
    let mut body = Vec::with_capacity(cipher.sealed_len(payload.len()));
    for i in 0..cipher.pieces(payload.len()) {
        let data = &payload
            [(i * PIECE_BYTES).min(payload.len())..((i + 1) * PIECE_BYTES).min(payload.len())];
        let at = body.len();
        body.extend_from_slice(data);
        body.resize(at + data.len() + tag_len, 0);
        let (piece, tag) = body[at..].split_at_mut(data.len());
        cipher.seal_in_place(&head, i as u32, piece, tag);
    }
    cipher.next_frame();
    Bytes::from(body)
}

struct GrpcReceiver {
    /// One sealed piece being checked.
    scratch: Vec<u8>,
    inbound: GrpcInbound,
    peer: Peer,
    timeout: Duration,
    handle: Handle,
    abort: watch::Receiver<bool>,
}

fn header_of(f: &RingFrame) -> Result<FrameHeader, WireError> {
    Ok(FrameHeader {
        job: JobId(f.job_id),
        generation: RingGeneration(f.ring_generation),
        step: f.step,
        phase: Phase::from_u32(f.phase)?,
        ring_step: f.ring_step,
        chunk: f.chunk,
        offset: f.offset,
        elements: f.elements,
        encoding: WireEncoding::from_u32(f.encoding)?,
        from_rank: Rank(f.from_rank),
    })
}

impl FrameReceiver for GrpcReceiver {
    fn recv(&mut self, expected: &FrameHeader, payload: &mut [u8]) -> Result<(), RingError> {
        let during = || super::transport::receiving(expected);
        let abort = self.abort.clone();
        let frames = &mut self.inbound.frames;
        let got = self.handle.block_on(async {
            tokio::select! {
                r = tokio::time::timeout(self.timeout, frames.message()) => Some(r),
                _ = aborted(abort) => None,
            }
        });
        let frame = match got {
            None => return Err(RingError::Aborted),
            Some(Err(_)) => {
                return Err(RingError::Timeout {
                    peer: self.peer.clone(),
                    timeout: self.timeout,
                    during: during(),
                })
            }
            Some(Ok(Ok(Some(f)))) => f,
            Some(Ok(Ok(None))) | Some(Ok(Err(_))) => {
                return Err(RingError::Disconnected {
                    peer: self.peer.clone(),
                    during: during(),
                })
            }
        };
        let checked = header_of(&frame).and_then(|h| h.check(expected));
        if let Err(source) = checked {
            // Tell the sender why before the stream closes.
            let _ = self.inbound.replies.try_send(Ok(RingReply {
                error: source.to_string(),
            }));
            return Err(RingError::Refused {
                peer: self.peer.clone(),
                source,
            });
        }
        let cipher = &mut self.inbound.cipher;
        let sealed_len = cipher.sealed_len(payload.len());
        if frame.payload.len() != sealed_len {
            cipher.next_frame();
            return Err(RingError::Setup(format!(
                "{} sent {} payload bytes, expected {}",
                self.peer,
                frame.payload.len(),
                sealed_len
            )));
        }
        if !cipher.protects() {
            cipher.next_frame();
            payload.copy_from_slice(&frame.payload);
            return Ok(());
        }
        let head = expected.to_bytes();
        let tag_len = cipher.tag_len();
        let mut opened = Ok(());
        for i in 0..cipher.pieces(payload.len()) {
            let start = (i * PIECE_BYTES).min(payload.len());
            let end = ((i + 1) * PIECE_BYTES).min(payload.len());
            let sealed_at = start + i * tag_len;
            let n = end - start + tag_len;
            let buf = &mut self.scratch[..n];
            buf.copy_from_slice(&frame.payload[sealed_at..sealed_at + n]);
            match cipher.open_in_place(&head, i as u32, buf) {
                Ok(plain) => payload[start..end].copy_from_slice(plain),
                Err(source) => {
                    let _ = self.inbound.replies.try_send(Ok(RingReply {
                        error: source.to_string(),
                    }));
                    opened = Err(RingError::Refused {
                        peer: self.peer.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        cipher.next_frame();
        opened
    }
}
