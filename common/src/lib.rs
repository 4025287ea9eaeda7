//! Pieces every ringtrain crate shares: id newtypes, the ring wire codec
//! (frame headers and fp16/bf16 payload encodings) and tracing setup.

pub mod ids;
pub mod telemetry;
pub mod wire;

pub use ids::{JobId, ParamVersion, Rank, RingGeneration, WorkerId};
