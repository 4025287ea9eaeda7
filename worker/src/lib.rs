//! ringtrain worker: trainer loop, models, data, ring all-reduce and the
//! worker's gRPC services.
//!
//! - [`ring`]: the ring all-reduce (engine, TCP and gRPC transports).
//! - [`data`], [`model`], [`optim`], [`checkpoint`]: what a training step needs.
//! - [`trainer`]: the per-job training loop.
//! - [`service`]: the worker process (registration, heartbeats, ring endpoints).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod model;
pub mod optim;
pub mod ring;
pub mod service;
pub mod trainer;
