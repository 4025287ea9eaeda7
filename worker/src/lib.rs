//! ringtrain worker: trainer loop, models, data, ring all-reduce and the
//! worker's gRPC services.
//!
//! - [`ring`]: the ring all-reduce (engine, TCP and gRPC transports).
//! - [`data`], [`model`], [`optim`], [`checkpoint`]: what a training step needs;
//!   [`gpt`]: the built-in byte-level transformer.
//! - [`trainer`]: the per-job training loop; [`sync`]: how the members of a
//!   new ring generation agree on the state to start from.
//! - [`service`]: the worker process (registration, heartbeats, ring endpoints).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod gpt;
pub mod model;
pub mod optim;
pub mod ring;
pub mod service;
pub mod sync;
pub mod trainer;
