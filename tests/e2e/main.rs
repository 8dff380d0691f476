//! End-to-end and fault tests against real services: ClickHouse 18.16 (Debian package), the
//! tansu Kafka-protocol broker and the `eventflow` binary. Run with `--test-threads=1`: each
//! test starts its own servers.

// Helper functions of tests fail loudly, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod api_contract;
mod attacks;
mod collector;
mod dashboard;
mod dev;
mod doubt;
mod downstream;
mod drill;
mod exact;
mod faults;
mod harness;
mod ledger;
mod link_clicks;
mod pipeline;
mod portability;
mod quality;
mod tracker;
