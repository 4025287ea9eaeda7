pub mod client;
pub mod health;
pub mod local;
pub mod plot;
pub mod serve;
