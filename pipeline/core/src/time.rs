//! Event time and calendar days.
//!
//! The collector decides each fact's event time once ([`event_time`]); the processor and the
//! reader API turn event times into calendar days of the client's time zone ([`client_day`],
//! [`day_bounds_ms`]). Minute buckets are absolute (UTC) minutes, so they need no time zone.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use chrono_tz::Tz;

/// How far in the future a client clock may be before its `ts` is ignored.
pub const MAX_CLOCK_AHEAD_MS: i64 = 5 * 60 * 1000;

/// Milliseconds in a minute.
pub const MINUTE_MS: i64 = 60_000;

/// Event time of a fact received at `received_at_ms` whose client sent `client_ts`.
///
/// The client time is used when it is valid RFC 3339 within
/// `[received - allowed_lateness, received + 5 min]`; otherwise the receive time is used and the
/// fact is flagged `clock_skew` (a bad client clock never drops a fact). Returns
/// `(event_time_ms, clock_skew)`.
pub fn event_time(received_at_ms: i64, client_ts: Option<&str>, allowed_lateness_ms: i64) -> (i64, bool) {
    let Some(raw) = client_ts else {
        return (received_at_ms, false);
    };
    match DateTime::parse_from_rfc3339(raw) {
        Ok(ts) => {
            let ms = ts.timestamp_millis();
            if ms >= received_at_ms - allowed_lateness_ms && ms <= received_at_ms + MAX_CLOCK_AHEAD_MS {
                (ms, false)
            } else {
                (received_at_ms, true)
            }
        }
        Err(_) => (received_at_ms, true),
    }
}

/// Start of the UTC minute containing `ms`.
pub fn minute_start_ms(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// Calendar day of `event_ms` in `tz`.
pub fn client_day(event_ms: i64, tz: Tz) -> NaiveDate {
    let utc = DateTime::from_timestamp_millis(event_ms).unwrap_or_default();
    utc.with_timezone(&tz).date_naive()
}

/// First instant (ms) of `day` in `tz`. Handles zones whose midnight is skipped by a DST jump
/// by taking the first local time that exists on that day.
pub fn day_start_ms(day: NaiveDate, tz: Tz) -> i64 {
    let mut local: NaiveDateTime = day.and_time(NaiveTime::MIN);
    // A DST gap is at most a few hours; walk forward in 15-minute steps until the local time exists.
    for _ in 0..(4 * 24) {
        if let Some(instant) = tz.from_local_datetime(&local).earliest() {
            return instant.timestamp_millis();
        }
        local += Duration::minutes(15);
    }
    // Unreachable for real zones; fall back to UTC midnight.
    day.and_time(NaiveTime::MIN).and_utc().timestamp_millis()
}

/// `[start, end)` of `day` in `tz`, in ms. Not always 24 h: DST days are 23 or 25 h long.
pub fn day_bounds_ms(day: NaiveDate, tz: Tz) -> (i64, i64) {
    let next = day.succ_opt().unwrap_or(day);
    (day_start_ms(day, tz), day_start_ms(next, tz))
}

/// Whether bucket day `day` is closed at `watermark_ms`: its end plus the allowed lateness has
/// passed. Facts of closed days are stored raw and folded in by backfill, not by the stream.
pub fn day_closed(day: NaiveDate, tz: Tz, watermark_ms: i64, allowed_lateness_ms: i64) -> bool {
    let (_, end) = day_bounds_ms(day, tz);
    end + allowed_lateness_ms <= watermark_ms
}

/// Days since 1970-01-01 (ClickHouse `Date`).
pub fn day_number(day: NaiveDate) -> u16 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    u16::try_from((day - epoch).num_days()).unwrap_or(0)
}

/// Inverse of [`day_number`].
pub fn day_from_number(n: u16) -> NaiveDate {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    epoch + Duration::days(i64::from(n))
}

/// `YYYY-MM-DD`.
pub fn format_day(day: NaiveDate) -> String {
    format!("{:04}-{:02}-{:02}", day.year(), day.month(), day.day())
}

/// RFC 3339 rendering of `ms` in `tz` with second precision, e.g. `2026-11-26T10:05:00+09:00`.
pub fn format_in_tz(ms: i64, tz: Tz) -> String {
    let utc = DateTime::from_timestamp_millis(ms).unwrap_or_default();
    utc.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// Parses a duration such as `48h`, `90m`, `30s`, `2d` or `1500ms` into milliseconds.
pub fn parse_duration_ms(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = raw.split_at(split);
    let n: i64 = num.parse().ok()?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{America, Asia, Europe};

    const H: i64 = 3_600_000;

    fn ms(rfc: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc).unwrap().timestamp_millis()
    }

    #[test]
    fn event_time_window() {
        let recv = ms("2026-11-26T01:00:00Z");
        let lateness = 48 * H;
        assert_eq!(event_time(recv, None, lateness), (recv, false));
        assert_eq!(event_time(recv, Some("2026-11-26T09:59:00+09:00"), lateness), (recv - 60_000, false));
        // exactly at both edges is accepted
        assert_eq!(event_time(recv, Some("2026-11-24T01:00:00Z"), lateness), (recv - lateness, false));
        assert_eq!(event_time(recv, Some("2026-11-26T01:05:00Z"), lateness), (recv + MAX_CLOCK_AHEAD_MS, false));
        // beyond the edges, in 1970, in 2100 and garbage fall back to receive time
        for skewed in [
            "2026-11-24T00:59:59Z",
            "2026-11-26T01:05:01Z",
            "1970-01-01T00:00:00Z",
            "2100-01-01T00:00:00Z",
            "yesterday",
        ] {
            assert_eq!(event_time(recv, Some(skewed), lateness), (recv, true), "{skewed}");
        }
    }

    #[test]
    fn seoul_day_boundary() {
        // 14:59:59.999 UTC is 23:59:59.999 in Seoul; one ms later is the next day.
        let before = ms("2026-11-25T14:59:59.999Z");
        assert_eq!(client_day(before, Asia::Seoul), NaiveDate::from_ymd_opt(2026, 11, 25).unwrap());
        assert_eq!(client_day(before + 1, Asia::Seoul), NaiveDate::from_ymd_opt(2026, 11, 26).unwrap());
        let (start, end) = day_bounds_ms(NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(), Asia::Seoul);
        assert_eq!(start, before + 1);
        assert_eq!(end - start, 24 * H);
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let spring = NaiveDate::from_ymd_opt(2026, 3, 8).unwrap(); // US spring forward
        let (s, e) = day_bounds_ms(spring, America::New_York);
        assert_eq!(e - s, 23 * H);
        let fall = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let (s, e) = day_bounds_ms(fall, America::New_York);
        assert_eq!(e - s, 25 * H);
        let eu = NaiveDate::from_ymd_opt(2026, 3, 29).unwrap();
        let (s, e) = day_bounds_ms(eu, Europe::Berlin);
        assert_eq!(e - s, 23 * H);
        // 01:30 local on the fall-back day happens twice; both instants are the same day.
        assert_eq!(client_day(ms("2026-11-01T05:30:00Z"), America::New_York), fall);
        assert_eq!(client_day(ms("2026-11-01T06:30:00Z"), America::New_York), fall);
    }

    #[test]
    fn skipped_midnight_starts_at_first_valid_time() {
        // America/Havana springs forward at midnight: 2026-03-08 00:00 does not exist.
        let day = NaiveDate::from_ymd_opt(2026, 3, 8).unwrap();
        let start = day_start_ms(day, chrono_tz::America::Havana);
        assert_eq!(client_day(start, chrono_tz::America::Havana), day);
        assert_eq!(client_day(start - 1, chrono_tz::America::Havana), day.pred_opt().unwrap());
    }

    #[test]
    fn closure_and_day_numbers() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 25).unwrap();
        let (_, end) = day_bounds_ms(day, Asia::Seoul);
        assert!(!day_closed(day, Asia::Seoul, end + 48 * H - 1, 48 * H));
        assert!(day_closed(day, Asia::Seoul, end + 48 * H, 48 * H));
        assert_eq!(day_from_number(day_number(day)), day);
        assert_eq!(format_day(day), "2026-11-25");
        assert_eq!(format_in_tz(end, Asia::Seoul), "2026-11-26T00:00:00+09:00");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("48h"), Some(48 * H));
        assert_eq!(parse_duration_ms("2d"), Some(48 * H));
        assert_eq!(parse_duration_ms("1500ms"), Some(1500));
        assert_eq!(parse_duration_ms("h"), None);
        assert_eq!(parse_duration_ms("5 parsecs"), None);
    }
}
