//! Where incoming links wait until the local ring member claims them, and
//! what bounds an unauthenticated peer.
//!
//! A member that is about to claim the link from its left neighbour first
//! registers an [`Expectation`] (the ring's key, its own rank, the security
//! mode). A connection runs its handshake against that expectation, holding
//! one of a bounded number of handshake slots, under one deadline; only an
//! authenticated link is parked, and only while its expectation stands, so
//! nothing a peer sends is kept past the handshake deadline or the claim.
//! A neighbour may connect a little before this member has learned about the
//! new ring: the handshake waits for the expectation until its deadline, and
//! the dialer retries after that.
//!
//! Once a generation is claimed, links of older generations of that job are
//! refused: that fences off a member which was paused or cut off and comes
//! back late.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringtrain_common::{JobId, Rank, RingGeneration};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::secure::{RingKey, RingSecurity};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkKey {
    pub job: JobId,
    pub generation: RingGeneration,
    pub from_rank: Rank,
}

/// What the local member will accept from one left neighbour.
#[derive(Clone, Debug)]
pub struct Expectation {
    pub key: RingKey,
    /// The local member's rank: the hello must be addressed to it.
    pub rank: Rank,
    pub security: RingSecurity,
}

/// Bounds on what unauthenticated peers can make an endpoint hold.
#[derive(Clone, Copy, Debug)]
pub struct InboxLimits {
    /// Connections (TCP) or streams (gRPC) in their handshake at once; more
    /// are closed at once.
    pub max_pending: usize,
    /// A handshake not completed by then is dropped.
    pub handshake_timeout: Duration,
}

impl Default for InboxLimits {
    fn default() -> Self {
        Self {
            max_pending: 32,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a handshake found no expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unexpected {
    /// Nobody here expects this link (yet): the dialer may retry.
    NotYet(String),
    /// Fenced for good.
    Stale(String),
}

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unexpected::NotYet(s) | Unexpected::Stale(s) => f.write_str(s),
        }
    }
}

struct State<T> {
    parked: HashMap<LinkKey, T>,
    expected: HashMap<LinkKey, Expectation>,
    newest_claimed: HashMap<JobId, RingGeneration>,
}

pub struct Inbox<T> {
    state: Mutex<State<T>>,
    arrived: Notify,
    pending: Arc<Semaphore>,
    limits: InboxLimits,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self::new(InboxLimits::default())
    }
}

/// Withdraws an expectation (and any link parked for it) when the claim is
/// over, whichever way it ended.
pub struct ExpectGuard<'a, T> {
    inbox: &'a Inbox<T>,
    key: LinkKey,
}

impl<T> Drop for ExpectGuard<'_, T> {
    fn drop(&mut self) {
        let mut st = self.inbox.lock();
        st.expected.remove(&self.key);
        let unclaimed = st.parked.remove(&self.key);
        drop(st);
        drop(unclaimed);
    }
}

impl<T> Inbox<T> {
    pub fn new(limits: InboxLimits) -> Self {
        Self {
            state: Mutex::new(State {
                parked: HashMap::new(),
                expected: HashMap::new(),
                newest_claimed: HashMap::new(),
            }),
            arrived: Notify::new(),
            pending: Arc::new(Semaphore::new(limits.max_pending)),
            limits,
        }
    }

    pub fn limits(&self) -> InboxLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handshake slot, or None when all are taken (the caller drops the
    /// connection).
    pub fn handshake_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.pending.clone().try_acquire_owned().ok()
    }

    /// Links parked and expectations registered now (for tests and metrics).
    pub fn held(&self) -> (usize, usize) {
        let st = self.lock();
        (st.parked.len(), st.expected.len())
    }

    /// Registers what the local member will accept from `key`'s sender,
    /// until the guard drops.
    pub fn expect(&self, key: LinkKey, e: Expectation) -> ExpectGuard<'_, T> {
        self.lock().expected.insert(key, e);
        self.arrived.notify_waiters();
        ExpectGuard { inbox: self, key }
    }

    /// Waits until `deadline` for an expectation of `key`.
    pub async fn expectation(
        &self,
        key: &LinkKey,
        deadline: tokio::time::Instant,
    ) -> Result<Expectation, Unexpected> {
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if let Some(&newest) = st.newest_claimed.get(&key.job) {
                    if key.generation < newest {
                        return Err(Unexpected::Stale(format!(
                            "ring generation {} of job {} is stale (current generation {})",
                            key.generation.0, key.job, newest.0
                        )));
                    }
                }
                if let Some(e) = st.expected.get(key) {
                    return Ok(e.clone());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Unexpected::NotYet(format!(
                    "no ring member here expects a link from {} in generation {} of job {}",
                    key.from_rank, key.generation.0, key.job
                )));
            }
        }
    }

    /// Parks an authenticated link, or refuses it with the reason (its
    /// expectation was withdrawn meanwhile). A newer link for the same key
    /// replaces the older one.
    pub fn deliver(&self, key: LinkKey, link: T) -> Result<(), String> {
        let mut st = self.lock();
        if !st.expected.contains_key(&key) {
            return Err(format!(
                "the link from {} in generation {} of job {} is no longer expected",
                key.from_rank, key.generation.0, key.job
            ));
        }
        let replaced = st.parked.insert(key, link);
        drop(st);
        drop(replaced);
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
                let mut st = self.lock();
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

    fn expectation() -> Expectation {
        Expectation {
            key: RingKey::random(),
            rank: Rank(1),
            security: RingSecurity::default(),
        }
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn only_expected_links_are_parked_and_the_claim_finds_them() {
        let inbox = Inbox::<&'static str>::default();
        assert!(inbox.deliver(key(1, 0), "anonymous").is_err());
        assert!(matches!(
            inbox.expectation(&key(1, 0), soon()).await,
            Err(Unexpected::NotYet(_))
        ));
        let guard = inbox.expect(key(1, 0), expectation());
        assert!(inbox.expectation(&key(1, 0), soon()).await.is_ok());
        inbox.deliver(key(1, 0), "early").expect("expected");
        assert_eq!(
            inbox.claim(key(1, 0), Duration::from_secs(1)).await,
            Some("early")
        );
        drop(guard);
        assert_eq!(inbox.held(), (0, 0));
    }

    #[tokio::test]
    async fn a_withdrawn_expectation_drops_its_unclaimed_link() {
        let inbox = Inbox::<std::sync::Arc<()>>::default();
        let link = std::sync::Arc::new(());
        {
            let _guard = inbox.expect(key(1, 0), expectation());
            inbox.deliver(key(1, 0), link.clone()).expect("expected");
            assert_eq!(inbox.held(), (1, 1));
        }
        assert_eq!(inbox.held(), (0, 0));
        assert_eq!(std::sync::Arc::strong_count(&link), 1, "parked link freed");
    }

    #[tokio::test]
    async fn older_generations_are_refused_once_a_newer_one_is_claimed() {
        let inbox = Inbox::<u32>::default();
        let _guard = inbox.expect(key(2, 0), expectation());
        inbox.deliver(key(2, 0), 2).expect("expected");
        assert_eq!(
            inbox.claim(key(2, 0), Duration::from_secs(1)).await,
            Some(2)
        );
        let err = inbox.expectation(&key(1, 0), soon()).await.unwrap_err();
        assert!(matches!(err, Unexpected::Stale(_)), "{err}");
        assert!(err.to_string().contains("stale"), "{err}");
        assert_eq!(
            inbox.claim(key(3, 1), Duration::from_millis(50)).await,
            None
        );
    }

    #[test]
    fn handshake_slots_are_bounded() {
        let inbox = Inbox::<u32>::new(InboxLimits {
            max_pending: 2,
            handshake_timeout: Duration::from_secs(1),
        });
        let a = inbox.handshake_slot().expect("slot");
        let _b = inbox.handshake_slot().expect("slot");
        assert!(inbox.handshake_slot().is_none());
        drop(a);
        assert!(inbox.handshake_slot().is_some());
    }
}
