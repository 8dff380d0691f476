//! The collector's one error type: every way a request can be refused as a whole, with its
//! status code, its contract error body (`{"error": "...", "detail": "..."}`, CONTRACT.md §2)
//! and its `Retry-After`, decided here and nowhere else (after PostHog capture's
//! `CaptureError`). Client faults are 4xx, back-pressure is 429 or 503 with `Retry-After`;
//! refusals of single facts of a batch are [`crate::intake::Reason`]s in the `202`'s
//! `rejected[]` instead.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::intake::{BodyError, MAX_BODY_BYTES};
use crate::logs::{truncate, MAX_VALUE_CHARS};

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("too many requests from this address")]
    SourceRateLimited,
    /// Every fact of the request was over a rate limit (per address or per client). The answer
    /// also lists them in `rejected[]`.
    #[error("too many facts from this address or for this client; retry later")]
    FactsRateLimited { rejected: Vec<Value> },
    #[error("content type {0:?}; send application/json or text/plain")]
    UnsupportedMediaType(String),
    #[error("body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("body not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("unreadable body: {0}")]
    UnreadableBody(String),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("the collector's spool is full; retry later")]
    SpoolFull,
    #[error("this client's share of the collector's spool is full; retry later")]
    SpoolClientShare,
    #[error("the collector could not store the facts ({0}); retry later")]
    SpoolUnavailable(String),
    #[error("no campaign link with this id")]
    UnknownLink,
    #[error("the campaign link could not be looked up; retry later")]
    LinkLookupUnavailable,
}

impl CollectError {
    pub fn status(&self) -> StatusCode {
        match self {
            CollectError::SourceRateLimited | CollectError::FactsRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            CollectError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            CollectError::BodyTooLarge | CollectError::Body(BodyError::TooManyFacts(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            CollectError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            CollectError::UnreadableBody(_) | CollectError::Body(_) => StatusCode::BAD_REQUEST,
            CollectError::SpoolFull
            | CollectError::SpoolClientShare
            | CollectError::SpoolUnavailable(_)
            | CollectError::LinkLookupUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            CollectError::UnknownLink => StatusCode::NOT_FOUND,
        }
    }

    /// The `error` code of the body, and the `reason` of the log line.
    pub fn code(&self) -> &'static str {
        match self {
            CollectError::SourceRateLimited | CollectError::FactsRateLimited { .. } => "rate_limited",
            CollectError::UnsupportedMediaType(_) => "unsupported_media_type",
            CollectError::BodyTooLarge => "body_too_large",
            CollectError::BodyTimeout(_) => "body_timeout",
            CollectError::UnreadableBody(_) => "unreadable_body",
            CollectError::Body(e) => e.code(),
            CollectError::SpoolFull => "spool_full",
            CollectError::SpoolClientShare => "spool_client_share",
            CollectError::SpoolUnavailable(_) => "spool_unavailable",
            CollectError::UnknownLink => "unknown_link",
            CollectError::LinkLookupUnavailable => "link_lookup_unavailable",
        }
    }

    /// Seconds a client should wait before retrying, for back-pressure.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            CollectError::SourceRateLimited | CollectError::FactsRateLimited { .. } => Some(1),
            CollectError::SpoolFull | CollectError::SpoolClientShare | CollectError::SpoolUnavailable(_) => Some(5),
            CollectError::LinkLookupUnavailable => Some(1),
            _ => None,
        }
    }

    /// The `detail` of the body and the log line (never longer than a log value may be).
    pub fn detail(&self) -> String {
        truncate(&self.to_string(), 2 * MAX_VALUE_CHARS).into_owned()
    }
}

impl IntoResponse for CollectError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code(), "detail": self.detail()});
        if let CollectError::FactsRateLimited { rejected } = &self {
            body["accepted"] = json!(0);
            body["rejected"] = json!(rejected);
        }
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_error_has_the_contract_body() {
        let cases = [
            (CollectError::SourceRateLimited, 429, "rate_limited", true),
            (
                CollectError::FactsRateLimited { rejected: vec![json!({"index": 0, "reason": "rate_limited"})] },
                429,
                "rate_limited",
                true,
            ),
            (CollectError::UnsupportedMediaType("x".repeat(10_000)), 415, "unsupported_media_type", false),
            (CollectError::BodyTooLarge, 413, "body_too_large", false),
            (CollectError::Body(BodyError::TooManyFacts(101)), 413, "too_many_facts", false),
            (CollectError::Body(BodyError::EmptyBatch), 400, "empty_batch", false),
            (CollectError::BodyTimeout(Duration::from_secs(10)), 408, "body_timeout", false),
            (CollectError::SpoolFull, 503, "spool_full", true),
            (CollectError::SpoolClientShare, 503, "spool_client_share", true),
            (CollectError::UnknownLink, 404, "unknown_link", false),
        ];
        for (e, status, code, retry) in cases {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status, "{code}");
            assert_eq!(r.headers().contains_key(header::RETRY_AFTER), retry, "{code}");
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["error"], code);
            let detail = v["detail"].as_str().unwrap();
            assert!(!detail.is_empty() && detail.chars().count() <= 2 * MAX_VALUE_CHARS + 1, "{detail}");
        }
    }
}
