//! Failure log lines (`VisitTrackFail`, `EntryTrackFail`, `PingTrackFail`), kept quiet under
//! attack.
//!
//! Every refused or failed fact and every refused request writes one structured line
//! (CONTRACT.md §2) while its reason is under [`LINES_PER_SECOND`] (burst [`BURST`]); beyond
//! that, lines of the reason are counted in `eventflow_collector_log_lines_suppressed_total`
//! and the next line written for it says how many were left out (`suppressed`). Values that
//! come from the request are cut to [`MAX_VALUE_CHARS`] characters, so a line stays small
//! whatever was sent. The metrics (`eventflow_collector_rejections_total`) count every failure.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use prometheus::IntCounterVec;
use tracing::warn;

use eventflow_core::FactKind;

use crate::ratelimit::{Limit, RateLimiter};

/// Lines per second per (event, reason), sustained.
pub const LINES_PER_SECOND: f64 = 10.0;
/// Lines per (event, reason) at once.
pub const BURST: f64 = 20.0;
/// Longest value from a request written in a log line.
pub const MAX_VALUE_CHARS: usize = 128;

/// `value` cut to `max` characters (with `…` when cut).
pub fn truncate(value: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(max) {
        None => value.into(),
        Some((at, _)) => format!("{}…", &value[..at]).into(),
    }
}

/// One failure to log.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub kind: FactKind,
    pub reason: &'static str,
    pub client_id: Option<&'a str>,
    /// Position in the batch, for a fact's failure.
    pub index: Option<usize>,
    /// The field of an `invalid_field` rejection.
    pub field: Option<&'a str>,
    pub detail: Option<&'a str>,
}

/// The collector's failure log.
#[derive(Debug)]
pub struct FailLog {
    limiter: RateLimiter<(FactKind, &'static str)>,
    /// Lines suppressed per (event, reason) since its last written line.
    pending: Mutex<HashMap<(FactKind, &'static str), u64>>,
    suppressed: IntCounterVec,
}

impl FailLog {
    pub fn new(suppressed: IntCounterVec) -> Self {
        // Reasons and kinds are closed sets: a few dozen keys at most.
        Self {
            limiter: RateLimiter::new(Limit { per_second: LINES_PER_SECOND, burst: BURST }, 256),
            pending: Mutex::new(HashMap::new()),
            suppressed,
        }
    }

    /// Writes the line of `f`, unless its reason is over its rate (then counts it).
    pub fn fail(&self, f: Failure<'_>) {
        let key = (f.kind, f.reason);
        if !self.limiter.check(&key) {
            self.suppressed.with_label_values(&[f.reason]).inc();
            *self.pending.lock().unwrap_or_else(PoisonError::into_inner).entry(key).or_default() += 1;
            return;
        }
        let suppressed = self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&key).unwrap_or(0);
        let client_id = truncate(f.client_id.unwrap_or(""), MAX_VALUE_CHARS);
        let field = f.field.map(|v| truncate(v, MAX_VALUE_CHARS).into_owned());
        let detail = f.detail.map(|v| truncate(v, MAX_VALUE_CHARS).into_owned());
        let what = if f.index.is_some() { "fact rejected" } else { "beacon request rejected" };
        warn!(
            event = f.kind.fail_event(),
            reason = f.reason,
            client_id = %client_id,
            index = f.index,
            field = field,
            detail = detail,
            suppressed = (suppressed > 0).then_some(suppressed),
            "{what}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_cut() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate(&"é".repeat(10_000), 128).chars().count(), 129);
    }

    #[test]
    fn lines_over_the_rate_are_counted_not_written() {
        let counter = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["reason"]).unwrap();
        let log = FailLog::new(counter.clone());
        let f = |reason| Failure {
            kind: FactKind::Visit,
            reason,
            client_id: Some("acme"),
            index: None,
            field: None,
            detail: Some("x"),
        };
        for _ in 0..1000 {
            log.fail(f("malformed_json"));
        }
        log.fail(f("rate_limited"));
        // A burst of 20 written (the test runs in far less than the 100 ms a line refills in).
        let suppressed = counter.with_label_values(&["malformed_json"]).get();
        assert!((978..=980).contains(&suppressed), "{suppressed}");
        assert_eq!(counter.with_label_values(&["rate_limited"]).get(), 0, "reasons are limited apart");
    }
}
