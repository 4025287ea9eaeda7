pub mod certs;
pub mod client;
pub mod generate;
pub mod health;
pub mod local;
pub mod plot;
pub mod serve;
