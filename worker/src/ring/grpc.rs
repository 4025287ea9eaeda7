//! gRPC transport: the left neighbour opens one bidirectional `Ring.Stream`
//! per ring generation and sends [`RingFrame`]s on it; the receiver answers on
//! the reverse stream only to explain a refusal.
//!
//! Payloads are `bytes::Bytes` and HTTP/2 windows are sized for megabyte
//! segments. The engine's blocking threads drive the async halves through a
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

use super::inbox::{Inbox, LinkKey};
use super::transport::{FrameReceiver, FrameSender, LinkAbort, RingLinks};
use super::{Peer, RingError, RingSpec, DIAL_BACKOFF};

/// Large enough for any segment we send.
pub const MAX_MESSAGE: usize = 256 << 20;
/// HTTP/2 flow-control windows: several segments in flight per stream.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;

const META_JOB: &str = "x-ringtrain-job";
const META_GENERATION: &str = "x-ringtrain-generation";
const META_RANK: &str = "x-ringtrain-rank";

/// An incoming stream from a left neighbour, waiting to be claimed.
pub struct GrpcInbound {
    frames: Streaming<RingFrame>,
    replies: mpsc::Sender<Result<RingReply, Status>>,
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

fn parse_meta<T: std::str::FromStr>(
    req: &Request<Streaming<RingFrame>>,
    key: &str,
) -> Result<T, Status> {
    req.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing or bad metadata {key}")))
}

#[tonic::async_trait]
impl RingRpc for RingService {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<RingReply, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<RingFrame>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let job: String = parse_meta(&request, META_JOB)?;
        let key = LinkKey {
            job: job.parse::<JobId>().map_err(Status::invalid_argument)?,
            generation: RingGeneration(parse_meta(&request, META_GENERATION)?),
            from_rank: Rank(parse_meta(&request, META_RANK)?),
        };
        let (replies, reply_rx) = mpsc::channel(4);
        let inbound = GrpcInbound {
            frames: request.into_inner(),
            replies,
        };
        self.inbox
            .deliver(key, inbound)
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(reply_rx))))
    }
}

/// Serves the ring service alone on an already-bound listener (benchmarks and
/// tests; the worker mounts [`RingService`] on its own server instead).
pub fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Arc<GrpcInbox> {
    let inbox = Arc::new(GrpcInbox::default());
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
    let (left, right) = (spec.left(), spec.right());
    let (abort_tx, abort_rx) = watch::channel(false);
    let refusal = Arc::new(Mutex::new(None::<String>));

    let open_right = async {
        let channel = dial(&right, timeout).await?;
        let mut client = RingClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<RingFrame>(4);
        let mut req = Request::new(ReceiverStream::new(rx));
        let meta = req.metadata_mut();
        let bad = |e| RingError::Setup(format!("metadata: {e}"));
        meta.insert(META_JOB, spec.job.to_string().parse().map_err(bad)?);
        meta.insert(
            META_GENERATION,
            spec.generation.0.to_string().parse().map_err(bad)?,
        );
        meta.insert(META_RANK, spec.rank.0.to_string().parse().map_err(bad)?);
        let replies = match tokio::time::timeout(timeout, client.stream(req)).await {
            Err(_) => {
                return Err(RingError::Timeout {
                    peer: right.clone(),
                    timeout,
                    during: "opening the ring stream".into(),
                })
            }
            Ok(Err(status)) => {
                return Err(RingError::Setup(format!(
                    "{right} refused the link: {}",
                    status.message()
                )))
            }
            Ok(Ok(resp)) => resp.into_inner(),
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
        Ok::<_, RingError>(tx)
    };
    let claim_left = async {
        let key = LinkKey {
            job: spec.job,
            generation: spec.generation,
            from_rank: left.rank,
        };
        inbox
            .claim(key, timeout)
            .await
            .ok_or_else(|| RingError::Timeout {
                peer: left.clone(),
                timeout,
                during: "waiting for it to connect".into(),
            })
    };
    let (tx, inbound) = tokio::try_join!(open_right, claim_left)?;
    let handle = Handle::current();
    Ok(RingLinks {
        sender: Box::new(GrpcSender {
            tx,
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
        }),
        left,
        right,
        abort: Arc::new(GrpcAbort(abort_tx)),
    })
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
    peer: Peer,
    timeout: Duration,
    handle: Handle,
    abort: watch::Receiver<bool>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl FrameSender for GrpcSender {
    fn send(&mut self, h: &FrameHeader, payload: &[u8]) -> Result<(), RingError> {
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
            payload: Bytes::copy_from_slice(payload),
        };
        let during = format!("sending step {} {} chunk {}", h.step, h.phase, h.chunk);
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

struct GrpcReceiver {
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
        let during = || {
            format!(
                "receiving step {} {} chunk {}",
                expected.step, expected.phase, expected.chunk
            )
        };
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
        if frame.payload.len() != payload.len() {
            return Err(RingError::Setup(format!(
                "{} sent {} payload bytes, expected {}",
                self.peer,
                frame.payload.len(),
                payload.len()
            )));
        }
        payload.copy_from_slice(&frame.payload);
        Ok(())
    }
}
