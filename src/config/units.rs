//! Sizes, durations and endpoints as an operator writes them.
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where to listen or connect: `host:port`, `[v6]:port` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `host:port` exactly as resolvable by the system (`[v6]:port` keeps its brackets).
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub fn parse_size(_s: &str) -> Result<u64, String> {
    todo!()
}
pub fn parse_duration(_s: &str) -> Result<Duration, String> {
    todo!()
}
