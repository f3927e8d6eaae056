//! holdfast: a connection-preserving TCP proxy.
#![deny(unsafe_code)]

pub mod config;
pub mod framing;
pub mod stream;
pub mod transport;
pub mod session;
