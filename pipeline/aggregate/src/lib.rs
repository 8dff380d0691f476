//! The EventFlow stream processor.
//!
//! Facts come from the three fact topics (one partition number = one unit of work, see
//! [`state`]), are folded into event-time windows, and leave as raw rows, checkpoints and bucket
//! rows for ClickHouse.

pub mod state;
