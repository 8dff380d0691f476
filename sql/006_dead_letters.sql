-- Messages of the fact topics the processor could not decode: not Avro single-object encoded,
-- a writer schema that neither the processor nor the schema registry topic (re-read once when
-- an unknown fingerprint shows up) knows, or a schema of another fact kind. Such a message is
-- recorded here, counted in eventflow_processor_dead_letters_total{reason} and never counted
-- as a fact; its partition keeps moving.
--
-- Exactly once, like the facts: a dead letter is part of the flush that moves its partition's
-- checkpoint past the message, and is inserted before the facts INSERT (the commit point). A
-- crash before the commit leaves the row without the checkpoint; the next owner consumes the
-- message again and writes the same key again, which ReplacingMergeTree folds (read with FINAL).
-- A crash after the commit cannot lose it: it was written first.
--
-- payload: lowercase hex of the first 8 KiB of the message (payload_bytes is its full length;
-- the message itself stays in Kafka for the topic's retention). detail: the decoder's error,
-- at most 512 bytes. recorded_ms: when the processor recorded it (the version column).
CREATE TABLE IF NOT EXISTS dead_letters
(
    topic           String,
    kafka_partition UInt16,
    kafka_offset    Int64,
    reason          String,
    detail          String,
    payload         String,
    payload_bytes   UInt32,
    recorded_ms     UInt64
)
ENGINE = ReplacingMergeTree(recorded_ms)
ORDER BY (topic, kafka_partition, kafka_offset)
SETTINGS index_granularity = 1024;
