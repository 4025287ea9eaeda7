//! The per-ring secret that lets ring neighbours prove to each other that the
//! coordinator put them in the same ring generation (see the worker's
//! `ring::secure`). Handed to members in their Assignment, over the control
//! channel.

use std::fmt;

use crate::{JobId, RingGeneration};

/// A 256-bit key shared by the members of one (job, ring generation).
#[derive(Clone, PartialEq, Eq)]
pub struct RingKey(pub [u8; 32]);

impl RingKey {
    pub const LEN: usize = 32;

    pub fn random() -> Self {
        Self(rand::random())
    }

    /// From the wire; anything but exactly 32 bytes is refused.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, String> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| format!("ring key must be 32 bytes, got {}", bytes.len()))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Never printed: a log line must not hand out a ring's key.
impl fmt::Debug for RingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RingKey(..)")
    }
}

/// Derives each ring's key from one secret, so the coordinator's pure state
/// needs no randomness per generation and stores no keys: a fresh key per
/// (job, generation) from a keyed hash. The secret is random per process; a
/// coordinator that restarts hands out new keys, and a ring half-formed
/// across the restart fails its handshake and is re-formed.
#[derive(Clone)]
pub struct RingKeys {
    secret: [u8; 32],
}

impl RingKeys {
    pub fn random() -> Self {
        Self {
            secret: rand::random(),
        }
    }

    pub fn for_ring(&self, job: JobId, generation: RingGeneration) -> RingKey {
        let mut h = blake3::Hasher::new_keyed(&self.secret);
        h.update(b"ringtrain ring key v1");
        h.update(&job.0.to_le_bytes());
        h.update(&generation.0.to_le_bytes());
        RingKey(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for RingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RingKeys(..)")
    }
}

impl Default for RingKeys {
    fn default() -> Self {
        Self::random()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ring_gets_its_own_key_and_keys_never_print() {
        let keys = RingKeys::random();
        let a = keys.for_ring(JobId(1), RingGeneration(1));
        assert_eq!(a, keys.for_ring(JobId(1), RingGeneration(1)));
        assert_ne!(a, keys.for_ring(JobId(1), RingGeneration(2)));
        assert_ne!(a, keys.for_ring(JobId(2), RingGeneration(1)));
        assert_ne!(a, RingKeys::random().for_ring(JobId(1), RingGeneration(1)));
        assert_eq!(format!("{a:?}"), "RingKey(..)");
        assert!(RingKey::from_slice(&[0u8; 31]).is_err());
        assert_eq!(RingKey::from_slice(a.as_bytes()), Ok(a));
    }
}
