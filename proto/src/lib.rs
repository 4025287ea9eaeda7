//! Wire types of ringtrain, generated from `proto/ringtrain.proto`.
//!
//! Everything else in the workspace converts these to its own types at the
//! service edge ([`convert`]); nothing outside the edges should pass proto
//! structs around.

pub mod convert;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ringtrain.v1");
}
pub use v1::*;
