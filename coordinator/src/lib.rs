//! ringtrain coordinator: keeps the jobs, forms rings from registered
//! workers, tells each worker its rank, checks that replicas agree, and
//! streams progress to clients.
//!
//! - [`state`]: the one owner of jobs and workers (a struct behind one lock).
//! - [`scheduler`]: pure decisions (start a job, declare a worker lost).
//! - [`service`]: the gRPC edge (client API and worker API).
//! - [`store`]: the embedded job database (redb), so a restart loses no job.
//! - [`server`]: wiring: listeners, periodic ticks, shutdown.

pub mod config;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

pub use config::CoordinatorConfig;
pub use server::serve;
