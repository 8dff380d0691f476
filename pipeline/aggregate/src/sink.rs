//! What the processor needs from ClickHouse, behind a trait so the consumer loop can be driven
//! against an in-memory store in tests and against the real server in production.

use std::collections::HashMap;

use eventflow_store::rows::{kind, Checkpoint, FactRow, ProgressRow};
use eventflow_store::{Store, StoreError};

use crate::state::{FlushBatch, SessionRef};

/// The processor's storage operations. Every write is idempotent: retrying a failed flush with
/// the same batch is always safe.
pub trait ProcessorStore: Send + Sync + 'static {
    /// Latest checkpoint of each partition that has one.
    fn checkpoints(
        &self,
        partitions: &[u16],
    ) -> impl std::future::Future<Output = Result<HashMap<u16, Checkpoint>, StoreError>> + Send;

    /// Stored facts of `partitions` received since `received_since_ms`, one row per fact, in
    /// `(kafka_partition, seq)` order.
    fn facts_since(
        &self,
        partitions: &[u16],
        received_since_ms: i64,
    ) -> impl std::future::Future<Output = Result<Vec<FactRow>, StoreError>> + Send;

    /// Earliest stored visit of each session (`None` when it has none).
    fn first_visits(
        &self,
        sessions: &[SessionRef],
    ) -> impl std::future::Future<Output = Result<Vec<(SessionRef, Option<i64>)>, StoreError>> + Send;

    /// Writes a flush in the order of [`FlushBatch`]: first-visit and late markers, then the
    /// facts with their checkpoints (one INSERT: the commit point), then the buckets.
    fn write(&self, batch: &FlushBatch) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// Records partition ownership and watermarks for the reader API and operators.
    fn heartbeat(&self, rows: &[ProgressRow]) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

/// Limit of rows in one `facts` INSERT, far below `max_insert_block_size` (1 048 449), so an
/// INSERT is one block and one part: atomic.
pub const MAX_FACT_ROWS_PER_INSERT: usize = 200_000;

impl ProcessorStore for Store {
    async fn checkpoints(&self, partitions: &[u16]) -> Result<HashMap<u16, Checkpoint>, StoreError> {
        self.load_checkpoints(partitions).await
    }

    async fn facts_since(&self, partitions: &[u16], received_since_ms: i64) -> Result<Vec<FactRow>, StoreError> {
        self.partition_facts_since(partitions, received_since_ms).await
    }

    async fn first_visits(&self, sessions: &[SessionRef]) -> Result<Vec<(SessionRef, Option<i64>)>, StoreError> {
        let pairs: Vec<(String, String)> =
            sessions.iter().map(|s| (s.client_id.clone(), s.session_id.clone())).collect();
        let found = self.session_first_visits(&pairs).await?;
        Ok(sessions
            .iter()
            .map(|s| (s.clone(), found.get(&(s.client_id.clone(), s.session_id.clone())).copied()))
            .collect())
    }

    async fn write(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        debug_assert!(batch.facts.len() <= MAX_FACT_ROWS_PER_INSERT);
        debug_assert!(batch.facts.iter().any(|r| r.kind == kind::CHECKPOINT));
        self.insert("session_first_visits", &batch.first_visits).await?;
        self.insert("late_facts", &batch.late).await?;
        self.insert("facts", &batch.facts).await?;
        // After the commit point the aggregate tables are independent (each row is a versioned
        // full value, so any subset surviving a crash is overwritten by the rebuild): write them
        // concurrently.
        tokio::try_join!(
            self.insert("minute_visits", &batch.minute_visits),
            self.insert("minute_live", &batch.minute_live),
            self.insert("daily_totals", &batch.daily_totals),
            self.insert("daily_marketing", &batch.daily_marketing),
            self.insert("daily_sessions", &batch.daily_sessions),
        )?;
        Ok(())
    }

    async fn heartbeat(&self, rows: &[ProgressRow]) -> Result<(), StoreError> {
        self.insert("processor_progress", rows).await
    }
}
