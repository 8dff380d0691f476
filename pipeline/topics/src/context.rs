//! librdkafka callbacks that cannot flood the logs.
//!
//! librdkafka reports a failure on every reconnect attempt (twice a second per broker with
//! `reconnect.backoff.max.ms = 500`) and, when `statistics.interval.ms` is set, hands over its
//! full statistics (about 10 KB of JSON) which rust-rdkafka's default context logs at INFO.
//! EventFlow's clients use these callbacks instead: errors and librdkafka log lines go through a
//! [`LogLimiter`] (a budget per reason, the rest counted), texts are clipped, and statistics are
//! never logged (the processor's consumer turns them into gauges).

use std::sync::Arc;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use tracing::{debug, error, warn};

use eventflow_core::logs::{clip, LogLimiter, MAX_LOG_VALUE};

/// Writes a librdkafka log line through `logs` (warnings and errors rate-limited per level;
/// notices and below at debug).
pub fn log_line(logs: &LogLimiter, level: RDKafkaLogLevel, facility: &str, message: &str) {
    let message = clip(message, MAX_LOG_VALUE);
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            logs.emit(
                "librdkafka_error",
                |suppressed| error!(target: "librdkafka", facility, suppressed, "librdkafka: {message}"),
            );
        }
        RDKafkaLogLevel::Warning => logs.emit(
            "librdkafka_warning",
            |suppressed| warn!(target: "librdkafka", facility, suppressed, "librdkafka: {message}"),
        ),
        _ => debug!(target: "librdkafka", facility, "librdkafka: {message}"),
    }
}

/// Writes a client-level librdkafka error (broker down, authentication) through `logs`.
pub fn client_error(logs: &LogLimiter, error: &KafkaError, reason: &str) {
    let reason = clip(reason, MAX_LOG_VALUE);
    logs.emit(
        "kafka_client_error",
        |suppressed| warn!(error = %error, reason = %reason, suppressed, "kafka client error"),
    );
}

/// Context of the short-lived and auxiliary clients (registry reader, partition watchdog):
/// rate-limited errors and log lines, no statistics.
#[derive(Debug, Clone)]
pub struct QuietContext {
    logs: Arc<LogLimiter>,
}

impl QuietContext {
    pub fn new(logs: Arc<LogLimiter>) -> Self {
        Self { logs }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(&self.logs, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&self.logs, &error, reason);
    }

    fn stats(&self, _statistics: rdkafka::Statistics) {}
}

impl ConsumerContext for QuietContext {}
