use std::time::Duration;

use ringtrain_common::wire::WireError;

use super::Peer;

/// Why an all-reduce or a ring setup failed. Each names the neighbour involved.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring neighbour {peer} sent nothing for {timeout:?} while {during}")]
    Timeout {
        peer: Peer,
        timeout: Duration,
        during: String,
    },
    #[error("ring neighbour {peer} closed the connection while {during}")]
    Disconnected { peer: Peer, during: String },
    #[error("ring neighbour {peer}: {source}")]
    Io {
        peer: Peer,
        #[source]
        source: std::io::Error,
    },
    #[error("ring neighbour {peer}: {source}")]
    Refused {
        peer: Peer,
        #[source]
        source: WireError,
    },
    #[error("ring setup failed: {0}")]
    Setup(String),
    #[error("ring is broken by an earlier failure ({0}); form a new ring generation")]
    Broken(String),
    /// The other half of this rank's all-reduce failed first; its error is the cause.
    #[error("all-reduce aborted")]
    Aborted,
}

impl RingError {
    /// The neighbour this error names, if any.
    pub fn peer(&self) -> Option<&Peer> {
        match self {
            RingError::Timeout { peer, .. }
            | RingError::Disconnected { peer, .. }
            | RingError::Io { peer, .. }
            | RingError::Refused { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// Maps an I/O error on a link to the neighbour and what we were doing.
    pub fn io(
        peer: &Peer,
        during: impl Into<String>,
        timeout: Duration,
        e: std::io::Error,
    ) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            WouldBlock | TimedOut => RingError::Timeout {
                peer: peer.clone(),
                timeout,
                during: during.into(),
            },
            UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted | NotConnected => {
                RingError::Disconnected {
                    peer: peer.clone(),
                    during: during.into(),
                }
            }
            _ => RingError::Io {
                peer: peer.clone(),
                source: e,
            },
        }
    }
}
