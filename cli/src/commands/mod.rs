pub mod client;
pub mod local;
pub mod serve;
