//! ringtrain worker: trainer loop, models, data, ring all-reduce and the
//! worker's gRPC services.
//!
//! - [`ring`]: the ring all-reduce (engine, TCP and gRPC transports).
//! - [`data`], [`model`], [`optim`], [`checkpoint`]: what a training step needs;
//!   `model::gpt`: the built-in byte-level transformer.
//! - [`trainer`]: the per-job training loop; [`sync`]: how the members of a
//!   new ring generation agree on the state to start from.
//! - [`service`]: the worker process (registration, heartbeats, ring endpoints).

pub mod agent;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod generate;
pub mod model;
pub mod model_files;
pub mod optim;
pub mod ring;
pub mod service;
pub mod sync;
pub mod tensors;
pub mod trainer;

/// The message of a panic that ended a blocking task: libtorch's errors
/// surface as panics in parts of tch, and they must reach the user as a
/// one-line error, not end the worker.
pub fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => panic_payload_message(payload.as_ref()),
        Err(e) => e.to_string(),
    }
}

/// The first line of a panic payload's message.
pub fn panic_payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    ringtrain_common::telemetry::panic_message(payload)
}
