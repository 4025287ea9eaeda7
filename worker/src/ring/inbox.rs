//! Where incoming links wait until the local ring member claims them.
//!
//! A neighbour may connect before this member has learned about the new ring,
//! so connections are parked by (job, generation, sender rank). Once a
//! generation is claimed, links of older generations of that job are refused:
//! that fences off a member which was paused or cut off and comes back late.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ringtrain_common::{JobId, Rank, RingGeneration};
use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkKey {
    pub job: JobId,
    pub generation: RingGeneration,
    pub from_rank: Rank,
}

struct State<T> {
    parked: HashMap<LinkKey, T>,
    newest_claimed: HashMap<JobId, RingGeneration>,
}

pub struct Inbox<T> {
    state: Mutex<State<T>>,
    arrived: Notify,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                parked: HashMap::new(),
                newest_claimed: HashMap::new(),
            }),
            arrived: Notify::new(),
        }
    }
}

impl<T> Inbox<T> {
    /// Parks an incoming link, or refuses it with the reason.
    pub fn deliver(&self, key: LinkKey, link: T) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&newest) = st.newest_claimed.get(&key.job) {
            if key.generation < newest {
                return Err(format!(
                    "ring generation {} of job {} is stale (current generation {})",
                    key.generation.0, key.job, newest.0
                ));
            }
        }
        // A reconnect for the same key replaces the older link.
        st.parked.insert(key, link);
        drop(st);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Waits up to `timeout` for the link `key`, and drops parked links of
    /// older generations of the same job.
    pub async fn claim(&self, key: LinkKey, timeout: Duration) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before looking, so a delivery in between is not missed.
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let newest = st.newest_claimed.entry(key.job).or_insert(key.generation);
                *newest = (*newest).max(key.generation);
                let newest = *newest;
                st.parked
                    .retain(|k, _| k.job != key.job || k.generation >= newest);
                if let Some(link) = st.parked.remove(&key) {
                    return Some(link);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(generation: u64, from: u32) -> LinkKey {
        LinkKey {
            job: JobId(1),
            generation: RingGeneration(generation),
            from_rank: Rank(from),
        }
    }

    #[tokio::test]
    async fn a_link_delivered_before_or_after_the_claim_is_found() {
        let inbox = std::sync::Arc::new(Inbox::<&'static str>::default());
        inbox.deliver(key(1, 0), "early").expect("fresh generation");
        assert_eq!(
            inbox.claim(key(1, 0), Duration::from_secs(1)).await,
            Some("early")
        );

        let late = inbox.clone();
        let claim =
            tokio::spawn(async move { late.claim(key(2, 0), Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        inbox.deliver(key(2, 0), "late").expect("fresh generation");
        assert_eq!(claim.await.expect("task"), Some("late"));
    }

    #[tokio::test]
    async fn older_generations_are_refused_once_a_newer_one_is_claimed() {
        let inbox = Inbox::<u32>::default();
        inbox.deliver(key(2, 0), 2).expect("fresh");
        assert_eq!(
            inbox.claim(key(2, 0), Duration::from_secs(1)).await,
            Some(2)
        );
        let err = inbox.deliver(key(1, 0), 1).unwrap_err();
        assert!(err.contains("stale"), "{err}");
        assert_eq!(
            inbox.claim(key(3, 1), Duration::from_millis(50)).await,
            None
        );
    }
}
