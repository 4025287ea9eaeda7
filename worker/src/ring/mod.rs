//! Ring all-reduce: every rank ends up holding the elementwise sum (or mean)
//! of all ranks' flat f32 buffers.
//!
//! Bandwidth-optimal schedule: reduce-scatter (world-1 ring steps) then
//! all-gather (world-1 ring steps); at each step a rank sends one chunk to its
//! right neighbour and receives one from its left, so each rank sends
//! 2(world-1)/world of the buffer. Chunks are cut into segments and a sender
//! thread and a receiver thread run the schedule concurrently, so sending,
//! receiving and summing overlap (see [`engine`]).
//!
//! Transports sit behind [`transport::FrameSender`] / [`transport::FrameReceiver`]:
//! raw TCP ([`tcp`]) and gRPC bidirectional streams ([`grpc`]).
//! A link lives for one ring generation and carries every all-reduce of it.

pub mod engine;
pub mod error;
pub mod grpc;
pub mod inbox;
pub mod latency;
pub mod layout;
pub mod secure;
pub mod shm;
pub mod tcp;
pub mod transport;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ringtrain_common::wire::WireEncoding;
use ringtrain_common::{JobId, Rank, RingGeneration};

pub use engine::ReduceOp;
pub use error::RingError;
pub use ringtrain_common::wire::TransportKind;
pub use secure::{RingKey, RingSecurity};
pub use transport::RingLinks;

/// A ring neighbour as errors name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub rank: Rank,
    /// Address of the neighbour's ring endpoint (TCP listener or gRPC server).
    pub addr: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.rank, self.addr)
    }
}

/// Pauses between attempts to reach a ring neighbour that is not listening
/// yet (it may still be joining the generation).
pub(crate) const DIAL_BACKOFF: ringtrain_common::retry::Backoff =
    ringtrain_common::retry::Backoff {
        first: Duration::from_millis(10),
        max: Duration::from_millis(500),
    };

/// Tunables of the data plane.
#[derive(Clone, Debug)]
pub struct RingOptions {
    pub transport: TransportKind,
    pub encoding: WireEncoding,
    /// Elements per pipelined segment.
    pub segment_elems: usize,
    /// A neighbour silent for this long fails the call.
    pub timeout: Duration,
    /// How frames are protected (both ends must agree).
    pub security: RingSecurity,
    /// Whether a TCP link to a neighbour on this host (same network
    /// namespace) may move its frames through shared memory.
    pub shared_memory: bool,
    /// Whether frames through shared memory are sealed like TCP frames.
    /// Off by default: the mapping never touches a network; the neighbour
    /// proved who it is in the handshake; the file is 0600, of this user,
    /// in this network namespace, and unlinked as soon as both ends map it,
    /// so only this user's processes (or root) could ever reach it, and they
    /// can read the workers' memory, keys included, anyway. Sealing would
    /// cost the crypto pass (the ring's CNN gradient at W=4: 14.5 ms sealed
    /// against 8.2 ms plain per all-reduce) and protect nothing more.
    pub seal_shared_memory: bool,
}

/// Largest segment a ring sends: bounds the frame (and gRPC message) a peer
/// can make a member receive.
pub const MAX_SEGMENT_BYTES: usize = 16 << 20;

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            transport: TransportKind::Tcp,
            encoding: WireEncoding::F32,
            segment_elems: 128 * 1024,
            timeout: Duration::from_secs(10),
            security: RingSecurity::default(),
            shared_memory: true,
            seal_shared_memory: false,
        }
    }
}

/// One member's view of one ring generation.
#[derive(Clone, Debug)]
pub struct RingSpec {
    pub job: JobId,
    pub generation: RingGeneration,
    pub rank: Rank,
    /// Ring endpoints of every member, indexed by rank.
    pub members: Vec<String>,
    /// The ring's shared secret, from the Assignment: neighbours prove they
    /// hold it before a link carries anything.
    pub key: RingKey,
    pub options: RingOptions,
}

impl RingSpec {
    pub fn world(&self) -> usize {
        self.members.len()
    }

    fn peer(&self, rank: usize) -> Peer {
        Peer {
            rank: Rank(rank as u32),
            addr: self.members[rank].clone(),
        }
    }

    pub fn left(&self) -> Peer {
        let w = self.world();
        self.peer((self.rank.index() + w - 1) % w)
    }

    pub fn right(&self) -> Peer {
        self.peer((self.rank.index() + 1) % self.world())
    }
}

/// The local ends that neighbours connect to: a TCP listener and/or the gRPC
/// ring service, both delivering incoming links into an inbox.
#[derive(Clone, Default)]
pub struct RingEndpoints {
    pub tcp: Option<Arc<tcp::TcpInbox>>,
    pub grpc: Option<Arc<grpc::GrpcInbox>>,
}

/// A connected ring: call [`Ring::all_reduce`] once per step. After an error the
/// ring is broken for good; the caller re-forms a new generation.
pub struct Ring {
    spec: RingSpec,
    links: Option<RingLinks>,
    broken: Option<String>,
}

impl Ring {
    /// Connects to the right neighbour and accepts the left one. A world of 1
    /// needs no links.
    pub async fn connect(spec: RingSpec, endpoints: &RingEndpoints) -> Result<Self, RingError> {
        if spec.rank.index() >= spec.world() {
            return Err(RingError::Setup(format!(
                "{} is outside a ring of {} members",
                spec.rank,
                spec.world()
            )));
        }
        if spec.options.segment_elems == 0 || spec.options.segment_elems > MAX_SEGMENT_BYTES / 4 {
            return Err(RingError::Setup(format!(
                "segment of {} elements is outside 1..={}",
                spec.options.segment_elems,
                MAX_SEGMENT_BYTES / 4
            )));
        }
        let links = if spec.world() == 1 {
            None
        } else {
            Some(match spec.options.transport {
                TransportKind::Tcp => {
                    let inbox = endpoints.tcp.as_ref().ok_or_else(|| {
                        RingError::Setup("no TCP ring listener is running".into())
                    })?;
                    tcp::connect(&spec, inbox).await?
                }
                TransportKind::Grpc => {
                    let inbox = endpoints.grpc.as_ref().ok_or_else(|| {
                        RingError::Setup("no gRPC ring service is running".into())
                    })?;
                    grpc::connect(&spec, inbox).await?
                }
            })
        };
        Ok(Self {
            spec,
            links,
            broken: None,
        })
    }

    pub fn spec(&self) -> &RingSpec {
        &self.spec
    }

    /// What frames to the right neighbour travel through (None in a world of 1).
    pub fn plane(&self) -> Option<&'static str> {
        self.links.as_ref().map(|l| l.sender.plane())
    }

    /// A handle that breaks this ring's links from another thread (a member
    /// leaving a generation must not wait out a dead neighbour's timeout).
    pub fn abort_handle(&self) -> Option<std::sync::Arc<dyn transport::LinkAbort>> {
        self.links.as_ref().map(|l| l.abort.clone())
    }

    /// Blocking: call it from a dedicated thread or `spawn_blocking`, never
    /// from an async task.
    pub fn all_reduce(
        &mut self,
        step: u64,
        data: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), RingError> {
        self.all_reduce_finite(step, data, op).map(drop)
    }

    /// [`Ring::all_reduce`], also telling whether every reduced value is
    /// finite (each final segment checked while it is in cache, which is
    /// cheaper than another pass over the buffer). Every member holds the
    /// same values, so every member gets the same answer.
    pub fn all_reduce_finite(
        &mut self,
        step: u64,
        data: &mut [f32],
        op: ReduceOp,
    ) -> Result<bool, RingError> {
        let encoding = self.spec.options.encoding;
        self.all_reduce_encoded(step, data, op, encoding)
    }

    /// Always f32 on the wire: for values that must arrive exact (versions,
    /// counts, parameter broadcasts), whatever the gradient encoding.
    pub fn all_reduce_exact(
        &mut self,
        step: u64,
        data: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), RingError> {
        self.all_reduce_encoded(step, data, op, WireEncoding::F32)
            .map(drop)
    }

    fn all_reduce_encoded(
        &mut self,
        step: u64,
        data: &mut [f32],
        op: ReduceOp,
        encoding: WireEncoding,
    ) -> Result<bool, RingError> {
        if let Some(why) = &self.broken {
            return Err(RingError::Broken(why.clone()));
        }
        let result = match &mut self.links {
            None => Ok(crate::optim::all_finite(data)),
            Some(links) => engine::all_reduce(&self.spec, links, step, data, op, encoding),
        };
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
        }
        result
    }
}

#[cfg(test)]
pub(crate) mod tests;
