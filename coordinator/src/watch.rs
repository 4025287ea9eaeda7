//! What `WatchJob` streams: a snapshot of the job, then its events until the
//! one that puts it in a terminal state; a watcher that falls behind skips
//! to the latest status; at shutdown the stream ends with UNAVAILABLE
//! instead of holding the server open.

use std::pin::Pin;

use futures::Stream;
use ringtrain_proto as pb;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::convert;
use crate::state::{EventKind, JobEvent, JobSnapshot};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

/// `first`, then what `rx` receives (none when `first` is terminal), until
/// a terminal event or `closing` turns true. `snapshot` gives the job's
/// current status after a lag.
pub fn events(
    first: JobEvent,
    rx: Option<broadcast::Receiver<JobEvent>>,
    closing: watch::Receiver<bool>,
    snapshot: impl Fn() -> Option<JobSnapshot> + Clone + Send + Sync + 'static,
) -> EventStream {
    let stream = futures::stream::unfold(
        (Some(first), rx, closing),
        move |(pending, rx, mut closing)| {
            let snapshot = snapshot.clone();
            async move {
                if let Some(event) = pending {
                    let rx = rx.filter(|_| !event.job.state.is_terminal());
                    return Some((Ok(convert::job_event(&event)), (None, rx, closing)));
                }
                let mut rx = rx?;
                let received = tokio::select! {
                    received = rx.recv() => Some(received),
                    _ = closing.wait_for(|c| *c) => None,
                };
                let event = match received {
                    Some(Ok(e)) => e,
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => JobEvent {
                        kind: EventKind::Snapshot,
                        message: String::new(),
                        job: snapshot()?,
                    },
                    Some(Err(broadcast::error::RecvError::Closed)) => return None,
                    None => {
                        let shutting = Status::unavailable("the coordinator is shutting down");
                        return Some((Err(shutting), (None, None, closing)));
                    }
                };
                let rx = (!event.job.state.is_terminal()).then_some(rx);
                Some((Ok(convert::job_event(&event)), (None, rx, closing)))
            }
        },
    );
    Box::pin(stream)
}
