//! Pieces every ringtrain crate shares: id newtypes, the job spec, the data
//! plan (which samples each step uses), the ring wire codec, metrics and
//! tracing setup.

pub mod data_plan;
pub mod ids;
pub mod jobspec;
pub mod metrics;
pub mod telemetry;
pub mod wire;

pub use ids::{JobId, ParamVersion, Rank, RingGeneration, WorkerId};
