//! Kafka topics (placeholder until written).
