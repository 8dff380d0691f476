//! EventFlow core: the vocabulary every stage shares.
//!
//! A beacon enters the collector as JSON, is validated and enriched into one of the facts in
//! [`fact`] (a [`fact::Visit`], [`fact::Entry`] or [`fact::Ping`]), travels through Kafka
//! encoded by [`avro`], and is bucketed by the processor using the event-time and client-day
//! rules in [`time`]. Metric names of every service live in [`metrics`] so that the contract's
//! names are spelled once; [`logs`] keeps repeated failure logs within a budget.

pub mod avro;
pub mod client;
pub mod fact;
pub mod hash;
pub mod logs;
pub mod metrics;
pub mod time;

pub use client::{ClientDirectory, ClientId, ClientIdError, ClientSettings, TenancyConfig};
pub use fact::{Entry, Fact, FactHeader, FactKind, PageKind, Ping, SessionOrigin, Utm, Visit};
