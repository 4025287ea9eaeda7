//! Id newtypes, so a rank can never be passed where a step is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A training job. Random 64-bit, printed as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl JobId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s.trim(), 16)
            .map(JobId)
            .map_err(|_| format!("'{}' is not a job id (16 hex digits)", crate::quote(s)))
    }
}

/// A worker process, assigned by the coordinator at registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

impl std::str::FromStr for WorkerId {
    type Err = String;
    /// `w12` (as printed) or `12`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim().strip_prefix('w').unwrap_or(s.trim());
        digits
            .parse()
            .map(WorkerId)
            .map_err(|_| format!("'{}' is not a worker id (w<number>)", crate::quote(s)))
    }
}

/// Position of a worker in the current ring, 0..world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rank(pub u32);

impl Rank {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}", self.0)
    }
}

/// Membership epoch of a ring. Every re-formation bumps it, and frames of any
/// other generation are refused, which fences off a worker that was paused or
/// cut off and comes back speaking for a ring that no longer exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RingGeneration(pub u64);

impl fmt::Display for RingGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen {}", self.0)
    }
}

/// Parameter version: the number of optimizer steps the parameters have taken.
/// Serialized as the bare number (checkpoint.json, the job store).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ParamVersion(pub u64);

impl ParamVersion {
    /// The version after one more optimizer step.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for ParamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_through_its_text_form() {
        let id = JobId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<JobId>(), Ok(id));
        assert!("not-hex".parse::<JobId>().is_err());
    }

    #[test]
    fn worker_id_parses_as_printed_or_bare() {
        assert_eq!(WorkerId(12).to_string(), "w12");
        assert_eq!("w12".parse::<WorkerId>(), Ok(WorkerId(12)));
        assert_eq!("12".parse::<WorkerId>(), Ok(WorkerId(12)));
        let err = "wx".parse::<WorkerId>().unwrap_err();
        assert_eq!(err, "'wx' is not a worker id (w<number>)");
    }

    #[test]
    fn param_version_serializes_as_a_bare_number() {
        let v = ParamVersion(41);
        assert_eq!(serde_json::to_string(&v).unwrap(), "41");
        assert_eq!(v.next(), ParamVersion(42));
    }
}
