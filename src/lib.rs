//! holdfast: a connection-preserving TCP proxy.
#![deny(unsafe_code)]

pub mod config;
pub mod framing;
