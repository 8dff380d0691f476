//! Reader queries (aggregate-first, raw fallback) used by the API.
