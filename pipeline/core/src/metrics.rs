//! Names of every Prometheus metric EventFlow exports (CONTRACT.md §5), spelled once.
//!
//! Convention: `eventflow_<component>_<noun>_<unit>[_total]`, base units (seconds, bytes),
//! bounded label values (fact type, outcome, route template, client id from configuration or, for
//! the quality gauges, clients with data up to `api.quality_max_clients`).

// Collector
pub const COLLECTOR_FACTS_TOTAL: &str = "eventflow_collector_facts_total";
pub const COLLECTOR_REJECTIONS_TOTAL: &str = "eventflow_collector_rejections_total";
pub const COLLECTOR_REQUESTS_TOTAL: &str = "eventflow_collector_requests_total";
pub const COLLECTOR_REQUEST_DURATION_SECONDS: &str = "eventflow_collector_request_duration_seconds";
pub const COLLECTOR_SPOOL_FACTS: &str = "eventflow_collector_spool_facts";
pub const COLLECTOR_SPOOL_BYTES: &str = "eventflow_collector_spool_bytes";
pub const COLLECTOR_SPOOL_FSYNC_SECONDS: &str = "eventflow_collector_spool_fsync_seconds";
pub const COLLECTOR_PRODUCE_ERRORS_TOTAL: &str = "eventflow_collector_produce_errors_total";
pub const COLLECTOR_DELIVERED_TOTAL: &str = "eventflow_collector_delivered_facts_total";
pub const COLLECTOR_OLDEST_SPOOLED_SECONDS: &str = "eventflow_collector_spool_oldest_age_seconds";
pub const COLLECTOR_SPOOL_MAX_BYTES: &str = "eventflow_collector_spool_max_bytes";
pub const COLLECTOR_SPOOL_REFUSALS_TOTAL: &str = "eventflow_collector_spool_refusals_total";
pub const COLLECTOR_RATE_LIMITER_KEYS: &str = "eventflow_collector_rate_limiter_keys";
pub const COLLECTOR_CLIENT_FACTS_TOTAL: &str = "eventflow_collector_client_facts_total";
pub const COLLECTOR_CLIENT_FACTS_FOLDED_TOTAL: &str = "eventflow_collector_client_facts_folded_total";
pub const COLLECTOR_LOG_LINES_SUPPRESSED_TOTAL: &str = "eventflow_collector_log_lines_suppressed_total";
pub const COLLECTOR_CONNECTIONS: &str = "eventflow_collector_connections";
pub const COLLECTOR_CONNECTIONS_CLOSED_TOTAL: &str = "eventflow_collector_connections_closed_total";
pub const COLLECTOR_LINK_CLICKS_DROPPED_TOTAL: &str = "eventflow_collector_link_clicks_dropped_total";
pub const COLLECTOR_LINK_CLICK_FLUSH_ERRORS_TOTAL: &str = "eventflow_collector_link_click_flush_errors_total";
pub const COLLECTOR_LINK_CLICK_KEYS: &str = "eventflow_collector_link_click_keys";
pub const COLLECTOR_LINK_CLICKS_UNWRITTEN: &str = "eventflow_collector_link_clicks_unwritten";
pub const COLLECTOR_LINK_CLICK_LAST_FLUSH_TIMESTAMP_SECONDS: &str =
    "eventflow_collector_link_click_last_flush_timestamp_seconds";

// Processor
pub const PROCESSOR_CONSUMER_LAG: &str = "eventflow_processor_consumer_lag";
pub const PROCESSOR_WATERMARK_SECONDS: &str = "eventflow_processor_watermark_seconds";
pub const PROCESSOR_STALENESS_SECONDS: &str = "eventflow_processor_staleness_seconds";
pub const PROCESSOR_LATE_FACTS_TOTAL: &str = "eventflow_processor_late_facts_total";
pub const PROCESSOR_LAST_FLUSH_TIMESTAMP_SECONDS: &str = "eventflow_processor_last_flush_timestamp_seconds";
pub const PROCESSOR_FACTS_TOTAL: &str = "eventflow_processor_facts_total";
pub const PROCESSOR_DEDUP_RETRACTIONS_TOTAL: &str = "eventflow_processor_dedup_retractions_total";
pub const PROCESSOR_DEDUP_NOTICES_TOTAL: &str = "eventflow_processor_dedup_notices_total";
pub const PROCESSOR_FLUSH_DURATION_SECONDS: &str = "eventflow_processor_flush_duration_seconds";
pub const PROCESSOR_FLUSH_ROWS_TOTAL: &str = "eventflow_processor_flush_rows_total";
pub const PROCESSOR_ASSIGNED_PARTITIONS: &str = "eventflow_processor_assigned_partitions";
pub const PROCESSOR_OPEN_STATE_ENTRIES: &str = "eventflow_processor_open_state_entries";
pub const PROCESSOR_DECODE_ERRORS_TOTAL: &str = "eventflow_processor_decode_errors_total";
pub const PROCESSOR_ORPHANED_PARTITIONS: &str = "eventflow_processor_orphaned_partitions";
pub const PROCESSOR_FORCED_REJOINS_TOTAL: &str = "eventflow_processor_forced_rejoins_total";
pub const CLICKHOUSE_INSERT_ERRORS_TOTAL: &str = "eventflow_clickhouse_insert_errors_total";
pub const VISITS_TODAY: &str = "eventflow_visits_today";
pub const RECONCILE_MISMATCH: &str = "eventflow_reconcile_mismatch";
pub const RECONCILE_LAST_RUN_TIMESTAMP_SECONDS: &str = "eventflow_reconcile_last_run_timestamp_seconds";

// Reader API
pub const API_REQUEST_DURATION_SECONDS: &str = "eventflow_api_request_duration_seconds";
pub const API_FALLBACK_TOTAL: &str = "eventflow_api_fallback_total";
pub const API_SECTION_ERRORS_TOTAL: &str = "eventflow_api_section_errors_total";
pub const SESSION_LINK_RATE: &str = "eventflow_session_link_rate";
pub const UTM_MISSING_RATIO: &str = "eventflow_utm_missing_ratio";
pub const API_QUALITY_CLIENTS_FOLDED: &str = "eventflow_api_quality_clients_folded";

/// Latency buckets (seconds) for request histograms: fine below 100 ms where the targets are.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Prometheus text exposition of `registry`.
pub fn render(registry: &prometheus::Registry) -> (String, &'static str) {
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        return (format!("# encoding metrics failed: {e}\n"), "text/plain; charset=utf-8");
    }
    (String::from_utf8_lossy(&buf).into_owned(), "text/plain; version=0.0.4; charset=utf-8")
}
