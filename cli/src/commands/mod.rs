pub mod client;
pub mod health;
pub mod local;
pub mod serve;
