//! ringtrain coordinator: keeps the jobs, forms rings from registered
//! workers, tells each worker its rank, checks that replicas agree, and
//! streams progress to clients.
//!
//! - [`state`]: the one owner of jobs and workers, and every change to them
//!   (methods that take `now` and return their effects).
//! - [`scheduler`]: pure decisions (start a job, declare a worker lost).
//! - [`service`]: the gRPC edge (client API and worker API): parse, change
//!   the state, publish the effects ([`outbox`]).
//! - [`convert`]: to and from gRPC messages and store records.
//! - [`store`]: the embedded job database (redb) and its one writer thread,
//!   so a restart loses no job.
//! - [`models`], [`blobs`]: models users upload (kept by content hash) and
//!   the dry run that checks a submission on a worker.
//! - [`metrics`], [`report`], [`tensorboard`]: what effects become outside:
//!   Prometheus metrics, each job's metrics.csv/png and its TensorBoard
//!   event files.
//! - [`server`]: wiring: listeners, periodic ticks, shutdown.

pub mod access;
pub mod blobs;
pub mod config;
pub mod confine;
pub mod convert;
pub mod metrics;
pub mod models;
pub mod outbox;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod tensorboard;
pub mod watch;

pub use config::CoordinatorConfig;
pub use server::serve;
