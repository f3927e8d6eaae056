//! Host failover: a standby holdfast takes over live client TCP connections
//! when the active host dies, with TCP_REPAIR and no checkpoint pause.
//!
//! The kernel's TCP state of a client connection is read once, right after
//! accept ([`repair::capture`]); after that, holdfast's own offsets are all
//! a standby needs. At takeover the standby rebuilds every connection in
//! repair mode ([`repair::restore`]), claims the service address
//! ([`announce::Announcer`]), and only then lets the connections run
//! ([`repair::leave_repair_and_send`]). docs/failover.md has the design and
//! the traps of this sequence on Linux 6.18.
//!
//! This module owns the kernel side: no sessions, no replication link. The
//! `unsafe` calls are all in [`sys`].

pub mod active;
pub mod announce;
pub mod codec;
pub mod gap;
pub mod link;
pub mod mirror;
pub mod repair;
pub mod serve;
pub mod standby;
mod sys;
pub mod takeover;
pub mod tap;

pub use sys::RepairWindow;
