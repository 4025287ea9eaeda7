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

/// The encoded descriptors of every message and service, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ringtrain_descriptor");

/// gRPC server reflection (v1 and the v1alpha older clients ask for) over
/// ringtrain's services and grpc.health.v1, so `grpcurl ... list` and
/// `describe` work against any ringtrain server.
pub mod reflection {
    use tonic_reflection::server::{v1, v1alpha, Builder, Error};

    fn builder() -> Builder<'static> {
        Builder::configure()
            .register_encoded_file_descriptor_set(super::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    }

    pub fn v1() -> Result<v1::ServerReflectionServer<impl v1::ServerReflection>, Error> {
        builder().build_v1()
    }

    pub fn v1alpha(
    ) -> Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, Error> {
        builder().build_v1alpha()
    }
}
