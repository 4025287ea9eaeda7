//! The ring's wire format: a fixed 64-byte frame header and the payload
//! encodings (f32, or f16/bf16 to halve the bytes on the wire).
//!
//! The header is the same for every transport; the gRPC transport carries the
//! fields in a protobuf message, the TCP transport writes [`FrameHeader::to_bytes`].
//! Sums are always taken in f32: the half encodings only travel.

use std::fmt;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::{JobId, Rank, RingGeneration};

const MAGIC: u32 = 0x5254_5231; // "RTR1"

/// Which half of a ring all-reduce a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    ReduceScatter = 0,
    AllGather = 1,
}

impl Phase {
    pub fn from_u32(v: u32) -> Result<Self, WireError> {
        match v {
            0 => Ok(Phase::ReduceScatter),
            1 => Ok(Phase::AllGather),
            other => Err(WireError::UnknownPhase(other)),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::ReduceScatter => "reduce-scatter",
            Phase::AllGather => "all-gather",
        })
    }
}

/// How gradient values travel between neighbours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireEncoding {
    #[default]
    F32,
    F16,
    Bf16,
}

impl WireEncoding {
    pub fn from_u32(v: u32) -> Result<Self, WireError> {
        match v {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::Bf16),
            other => Err(WireError::UnknownEncoding(other)),
        }
    }

    pub fn as_u32(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
        }
    }

    pub fn bytes_per_element(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Encodes `src` into `dst` (half encodings only; f32 is sent as is).
    pub fn encode_half(self, src: &[f32], dst: &mut [u16]) {
        match self {
            Self::F32 => unreachable!("f32 payloads are sent without encoding"),
            Self::F16 => bytemuck::cast_slice_mut::<u16, f16>(dst).convert_from_f32_slice(src),
            Self::Bf16 => bytemuck::cast_slice_mut::<u16, bf16>(dst).convert_from_f32_slice(src),
        }
    }

    /// Decodes half values from `src` into `dst`.
    pub fn decode_half(self, src: &[u16], dst: &mut [f32]) {
        match self {
            Self::F32 => unreachable!("f32 payloads are received without decoding"),
            Self::F16 => bytemuck::cast_slice::<u16, f16>(src).convert_to_f32_slice(dst),
            Self::Bf16 => bytemuck::cast_slice::<u16, bf16>(src).convert_to_f32_slice(dst),
        }
    }

    /// Rounds `values` in place to what this encoding can carry. The owner of a
    /// reduced chunk applies it before the all-gather, so the owner keeps exactly
    /// the values every other rank decodes: replicas stay bit-identical.
    pub fn quantize(self, values: &mut [f32]) {
        match self {
            Self::F32 => {}
            Self::F16 => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            Self::Bf16 => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        }
    }
}

impl std::str::FromStr for WireEncoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown wire encoding '{}' (expected f32, f16 or bf16)",
                crate::quote(other)
            )),
        }
    }
}

/// Which transport carries ring frames between neighbours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Length-prefixed frames on a plain TCP connection: fewest copies.
    #[default]
    Tcp,
    /// tonic bidirectional streaming.
    Grpc,
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!(
                "unknown ring transport '{}' (expected tcp or grpc)",
                crate::quote(other)
            )),
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Grpc => "grpc",
        })
    }
}

/// Everything that identifies one frame of one all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub job: JobId,
    pub generation: RingGeneration,
    /// The caller's step (the parameter version being computed).
    pub step: u64,
    pub phase: Phase,
    /// 0 .. 2(world-1): position in the ring schedule.
    pub ring_step: u32,
    pub chunk: u32,
    /// Element offset of this segment in the flat buffer.
    pub offset: u64,
    pub elements: u32,
    pub encoding: WireEncoding,
    pub from_rank: Rank,
}

impl FrameHeader {
    pub const LEN: usize = 64;

    pub fn payload_bytes(&self) -> usize {
        self.elements as usize * self.encoding.bytes_per_element()
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.phase as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.job.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.step.to_le_bytes());
        b[32..36].copy_from_slice(&self.ring_step.to_le_bytes());
        b[36..40].copy_from_slice(&self.chunk.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.elements.to_le_bytes());
        b[52..56].copy_from_slice(&self.encoding.as_u32().to_le_bytes());
        b[56..60].copy_from_slice(&self.from_rank.0.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if u32_at(0) != MAGIC {
            return Err(WireError::BadMagic);
        }
        Ok(Self {
            phase: Phase::from_u32(u32_at(4))?,
            job: JobId(u64_at(8)),
            generation: RingGeneration(u64_at(16)),
            step: u64_at(24),
            ring_step: u32_at(32),
            chunk: u32_at(36),
            offset: u64_at(40),
            elements: u32_at(48),
            encoding: WireEncoding::from_u32(u32_at(52))?,
            from_rank: Rank(u32_at(56)),
        })
    }

    /// Decodes a header from any bytes a peer sent (the entry point for
    /// fuzzing): exactly [`FrameHeader::LEN`] bytes, else an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let b: &[u8; Self::LEN] = bytes
            .try_into()
            .map_err(|_| WireError::Truncated(bytes.len()))?;
        Self::from_bytes(b)
    }

    /// Refuses a frame that is not exactly the one expected next. Job and
    /// generation are checked first so the error names the fencing reason.
    pub fn check(&self, expected: &FrameHeader) -> Result<(), WireError> {
        let fields: [(&'static str, u64, u64); 10] = [
            ("job", self.job.0, expected.job.0),
            ("ring generation", self.generation.0, expected.generation.0),
            (
                "sender rank",
                self.from_rank.0.into(),
                expected.from_rank.0.into(),
            ),
            ("step", self.step, expected.step),
            ("phase", self.phase as u64, expected.phase as u64),
            (
                "ring step",
                self.ring_step.into(),
                expected.ring_step.into(),
            ),
            ("chunk", self.chunk.into(), expected.chunk.into()),
            ("offset", self.offset, expected.offset),
            ("elements", self.elements.into(), expected.elements.into()),
            (
                "encoding",
                self.encoding.as_u32().into(),
                expected.encoding.as_u32().into(),
            ),
        ];
        match fields.iter().find(|(_, got, want)| got != want) {
            None => Ok(()),
            Some(&(field, got, expected_value)) => Err(WireError::Refused {
                field,
                got,
                expected: expected_value,
                from_rank: self.from_rank,
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a ringtrain frame (bad magic)")]
    BadMagic,
    #[error("unknown ring phase {0}")]
    UnknownPhase(u32),
    #[error("unknown wire encoding {0}")]
    UnknownEncoding(u32),
    #[error("frame {frame} piece {piece} failed authentication (tampered, replayed or reordered, or another ring's key)")]
    Unauthentic { frame: u64, piece: u32 },
    #[error("frame header of {0} bytes, expected 64")]
    Truncated(usize),
    #[error("refused frame from {from_rank}: {field} {got}, expected {expected}")]
    Refused {
        field: &'static str,
        got: u64,
        expected: u64,
        from_rank: Rank,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> FrameHeader {
        FrameHeader {
            job: JobId(7),
            generation: RingGeneration(3),
            step: 11,
            phase: Phase::AllGather,
            ring_step: 2,
            chunk: 1,
            offset: 1234,
            elements: 99,
            encoding: WireEncoding::Bf16,
            from_rank: Rank(2),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(FrameHeader::from_bytes(&h.to_bytes()), Ok(h));
        assert_eq!(h.payload_bytes(), 198);
    }

    #[test]
    fn garbage_is_not_a_header() {
        assert_eq!(
            FrameHeader::from_bytes(&[0u8; 64]),
            Err(WireError::BadMagic)
        );
    }

    #[test]
    fn a_frame_of_another_generation_is_refused_and_named() {
        let expected = header();
        let stale = FrameHeader {
            generation: RingGeneration(2),
            ..expected
        };
        let err = stale.check(&expected).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refused frame from rank 2: ring generation 2, expected 3"
        );
        let other_step = FrameHeader {
            step: 10,
            ..expected
        };
        assert!(other_step
            .check(&expected)
            .unwrap_err()
            .to_string()
            .contains("step 10, expected 11"));
        assert_eq!(expected.check(&expected), Ok(()));
    }

    #[test]
    fn half_encodings_round_trip_within_their_precision() {
        let src: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        for (enc, rel) in [(WireEncoding::F16, 1e-3), (WireEncoding::Bf16, 8e-3)] {
            let mut wire = vec![0u16; src.len()];
            enc.encode_half(&src, &mut wire);
            let mut back = vec![0f32; src.len()];
            enc.decode_half(&wire, &mut back);
            for (a, b) in src.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= rel * a.abs().max(1.0),
                    "{enc:?}: {a} vs {b}"
                );
            }
            let mut q = src.clone();
            enc.quantize(&mut q);
            assert_eq!(q, back, "quantize must equal what the wire carries");
        }
    }
}
