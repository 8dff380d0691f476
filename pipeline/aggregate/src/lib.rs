//! The EventFlow stream processor.
//!
//! Facts come from the three fact topics ([`processor`]); partition number `p` of the three
//! topics is one unit of work whose event-time windows live in [`state`]; flushes go to
//! ClickHouse through [`sink`]. Backfill and reconcile recompute from raw facts.

pub mod backfill;
pub mod config;
pub mod flush;
pub mod http;
pub mod maintenance;
pub mod memory;
pub mod metrics;
pub mod processor;
pub mod reconcile;
pub mod series;
pub mod sink;
pub mod state;
pub mod watchdog;

pub use config::ProcessorConfig;
pub use metrics::ProcessorMetrics;
pub use processor::{run, ProcessorDeps, ProcessorStatus};
pub use sink::ProcessorStore;
