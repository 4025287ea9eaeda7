//! ringtrain worker: trainer loop, models, data, ring all-reduce and the
//! worker's gRPC services.

pub mod ring;
