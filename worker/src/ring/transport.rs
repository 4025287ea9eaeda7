//! What the engine needs from a transport: an ordered, reliable stream of
//! frames to the right neighbour and one from the left.

use std::sync::Arc;

use ringtrain_common::wire::FrameHeader;

use super::{Peer, RingError};

/// What a link was doing, for its errors: the frame being sent.
pub fn sending(h: &FrameHeader) -> String {
    format!("sending step {} {} chunk {}", h.step, h.phase, h.chunk)
}

/// What a link was doing, for its errors: the frame being received.
pub fn receiving(h: &FrameHeader) -> String {
    format!("receiving step {} {} chunk {}", h.step, h.phase, h.chunk)
}

/// Sending half of a link, to the right neighbour.
pub trait FrameSender: Send {
    fn send(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), RingError>;

    /// What the frames travel through ("tcp", "grpc", "shared-memory"), for
    /// logs and benchmarks.
    fn plane(&self) -> &'static str;
}

/// Receiving half of a link, from the left neighbour.
pub trait FrameReceiver: Send {
    /// Receives the next frame, refuses it unless its header equals `expected`,
    /// and writes its payload (exactly `payload.len()` bytes) into `payload`.
    fn recv(&mut self, expected: &FrameHeader, payload: &mut [u8]) -> Result<(), RingError>;

    /// Like [`FrameReceiver::recv`], but hands the payload to `sink` in
    /// pieces (each a multiple of 4 bytes, 4-aligned, in order) as they
    /// arrive, so the caller can sum a piece while it is still in cache.
    fn recv_pieces(
        &mut self,
        expected: &FrameHeader,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RingError> {
        let mut buf = vec![0u32; expected.payload_bytes().div_ceil(4)];
        let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut buf)[..expected.payload_bytes()];
        self.recv(expected, bytes)?;
        sink(bytes);
        Ok(())
    }
}

/// Wakes both halves out of blocked I/O once either has failed, so a failure
/// on one side never leaves the other waiting for its own timeout.
pub trait LinkAbort: Send + Sync {
    fn abort(&self);
}

/// Both links of one ring member for one generation.
pub struct RingLinks {
    pub left: Peer,
    pub right: Peer,
    pub sender: Box<dyn FrameSender>,
    pub receiver: Box<dyn FrameReceiver>,
    pub abort: Arc<dyn LinkAbort>,
}

impl Drop for RingLinks {
    fn drop(&mut self) {
        self.abort.abort();
    }
}
