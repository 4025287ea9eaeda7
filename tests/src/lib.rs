//! Test-cluster harness.
