//! holdfast: a connection-preserving TCP proxy.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod framing;
pub mod lifecycle;
pub mod metrics;
pub mod proto;
pub mod proxy;
pub mod server;
pub mod session;
pub mod stream;
pub mod systemd;
pub mod transport;
