//! Sessions: the pure state machine ([`core`]) and the task that drives it
//! over real sockets ([`driver`]).

pub mod core;
pub mod driver;
pub mod status;

pub use self::core::{
    Action, CloseReason, Event, Generation, LegFailure, SessionCore, SessionId, SnapshotError,
    SNAPSHOT_VERSION,
};
