//! Failure logs that cannot flood: a per-reason budget, a counter of what was left out, and
//! values clipped to a bounded size.
//!
//! A failure that repeats (a broker outage makes librdkafka report every reconnect attempt, a
//! ClickHouse outage fails every retry, an attacker sends one bad message after another) would
//! otherwise write one line per occurrence. Every such line goes through [`LogLimiter::emit`]:
//! at most [`LogLimiter::burst`] lines per reason and window are written, the others are
//! counted in the limiter's Prometheus counter (`reason` label) and the next written line of
//! that reason says how many were left out (`suppressed`). Writing the line and counting happen
//! in one call, so they cannot drift apart.
//!
//! Reasons are `&'static str`: the label set is bounded by the code, never by input. Values that
//! come from outside (error texts that may quote a payload, keys of stored facts) go through
//! [`clip`] before they reach a log line.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};

/// Longest value (bytes) a log field carries after [`clip`] by default.
pub const MAX_LOG_VALUE: usize = 512;

/// Lines written per reason and window by default.
pub const DEFAULT_BURST: u32 = 5;

/// The default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// `value` cut to at most `max` bytes (on a character boundary), with the number of bytes left
/// out appended: `"abc… (+1234 bytes)"`.
pub fn clip(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max {
        return Cow::Borrowed(value);
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… (+{} bytes)", &value[..end], value.len() - end))
}

/// [`clip`] of a displayable value (an error) to [`MAX_LOG_VALUE`].
pub fn clip_display(value: &impl std::fmt::Display) -> String {
    clip(&value.to_string(), MAX_LOG_VALUE).into_owned()
}

#[derive(Debug)]
struct Budget {
    window_start: Instant,
    written: u32,
    /// Left out since the last written line.
    suppressed: u64,
}

/// Per-reason log budget plus the counter of suppressed lines.
#[derive(Debug)]
pub struct LogLimiter {
    budgets: Mutex<HashMap<&'static str, Budget>>,
    burst: u32,
    window: Duration,
    suppressed: IntCounterVec,
}

impl LogLimiter {
    /// A limiter counting suppressed lines in `suppressed` (one label: `reason`).
    pub fn new(suppressed: IntCounterVec, burst: u32, window: Duration) -> Self {
        Self { budgets: Mutex::new(HashMap::new()), burst: burst.max(1), window, suppressed }
    }

    /// A limiter with the default budget whose counter `name` is registered in `registry`.
    pub fn register(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        let counter = IntCounterVec::new(Opts::new(name, help), &["reason"])?;
        registry.register(Box::new(counter.clone()))?;
        Ok(Self::new(counter, DEFAULT_BURST, DEFAULT_WINDOW))
    }

    /// Lines written per reason and window.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Writes one line of `reason` by calling `write` (which gets how many lines of this reason
    /// were left out since the last one written), unless the reason used up its budget in the
    /// current window: then the line is only counted.
    pub fn emit(&self, reason: &'static str, write: impl FnOnce(u64)) {
        let now = Instant::now();
        let allowed = {
            let Ok(mut budgets) = self.budgets.lock() else {
                write(0);
                return;
            };
            let b = budgets.entry(reason).or_insert(Budget { window_start: now, written: 0, suppressed: 0 });
            if now.duration_since(b.window_start) >= self.window {
                b.window_start = now;
                b.written = 0;
            }
            if b.written < self.burst {
                b.written += 1;
                Some(std::mem::take(&mut b.suppressed))
            } else {
                b.suppressed += 1;
                None
            }
        };
        match allowed {
            Some(left_out) => write(left_out),
            None => self.suppressed.with_label_values(&[reason]).inc(),
        }
    }

    /// Lines of `reason` left out so far (counter value).
    pub fn suppressed(&self, reason: &str) -> u64 {
        self.suppressed.with_label_values(&[reason]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_values_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip(&"x".repeat(5000), 8), "xxxxxxxx… (+4992 bytes)");
        // 'é' is two bytes: the cut never splits it.
        assert_eq!(clip("aéééé", 4), "aé… (+6 bytes)");
        assert!(clip_display(&"y".repeat(100_000)).len() < MAX_LOG_VALUE + 32);
    }

    #[test]
    fn each_reason_has_its_own_budget_and_the_rest_is_counted() {
        let registry = Registry::new();
        let logs = LogLimiter::register(&registry, "test_log_lines_suppressed_total", "-").unwrap();
        let written = std::cell::RefCell::new(Vec::new());
        for _ in 0..100 {
            logs.emit("kafka", |left_out| written.borrow_mut().push(("kafka", left_out)));
        }
        for _ in 0..3 {
            logs.emit("clickhouse", |left_out| written.borrow_mut().push(("clickhouse", left_out)));
        }
        // 5 kafka lines (burst) and all 3 clickhouse lines; 95 kafka lines counted.
        assert_eq!(written.borrow().iter().filter(|(r, _)| *r == "kafka").count(), 5);
        assert_eq!(written.borrow().iter().filter(|(r, _)| *r == "clickhouse").count(), 3);
        assert_eq!(logs.suppressed("kafka"), 95);
        assert_eq!(logs.suppressed("clickhouse"), 0);
        let page = crate::metrics::render(&registry).0;
        assert!(page.contains("test_log_lines_suppressed_total{reason=\"kafka\"} 95"), "{page}");
    }

    #[test]
    fn a_new_window_writes_again_and_reports_what_was_left_out() {
        let logs = LogLimiter::new(
            IntCounterVec::new(Opts::new("t_total", "-"), &["reason"]).unwrap(),
            2,
            Duration::from_millis(50),
        );
        let mut written = Vec::new();
        for _ in 0..10 {
            logs.emit("r", |n| written.push(n));
        }
        std::thread::sleep(Duration::from_millis(60));
        logs.emit("r", |n| written.push(n));
        // Two lines, then eight left out, reported by the first line of the next window.
        assert_eq!(written, vec![0, 0, 8]);
        assert_eq!(logs.suppressed("r"), 8);
    }
}
