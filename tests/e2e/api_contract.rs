//! The reader API against its OpenAPI document, on a running deployment.
