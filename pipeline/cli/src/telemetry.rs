//! Logging: JSON lines in production (one object per event, fields at the top level, so
//! `"event": "VisitTrackFail"` is directly searchable), readable text for development.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::TelemetryConfig;

pub fn init(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if config.log_format == "text" {
        builder.with_target(false).try_init()
    } else {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
