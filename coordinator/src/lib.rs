//! Coordinator: job store, shard assignment, ring membership and services.
