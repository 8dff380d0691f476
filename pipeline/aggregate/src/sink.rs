//! What the processor needs from ClickHouse, behind a trait so the flush protocol
//! ([`crate::flush`]) runs unchanged against the real server and against the in-memory model of
//! the property tests.

use std::collections::{BTreeMap, HashMap};

use eventflow_store::rows::{kind, Checkpoint, ClaimRow, CopyRow, FactRow, NoticeRow, ProgressRow};
use eventflow_store::{Store, StoreError};

use crate::state::{FactRef, FlushBatch, SessionRef};

/// A dedup key: `(client_id, kind code, uid)`.
pub type UidKey = (String, i8, String);

/// A dedup key by reference.
pub type UidRef<'a> = (&'a str, i8, &'a str);

/// 128-bit identity of a dedup key, for in-memory maps (no string kept or cloned).
pub fn uid_id(client_id: &str, kind: i8, uid: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(client_id.as_bytes());
    h.update(&[0xff, kind.to_le_bytes()[0], 0xff]);
    h.update(uid.as_bytes());
    h.digest128()
}

/// `key` as references.
pub fn uid_ref(key: &UidKey) -> UidRef<'_> {
    (&key.0, key.1, &key.2)
}

/// The processor's storage operations. Every write is idempotent: retrying a failed step with
/// the same rows is always safe.
pub trait ProcessorStore: Send + Sync + 'static {
    /// Latest checkpoint of each partition that has one.
    fn checkpoints(
        &self,
        partitions: &[u16],
    ) -> impl std::future::Future<Output = Result<HashMap<u16, Checkpoint>, StoreError>> + Send;

    /// Stored facts of `partitions` received since `received_since_ms` (on client days from
    /// `from_day`), one row per fact (its latest version), handed to `each` in any order;
    /// returns how many.
    fn facts_since(
        &self,
        partitions: &[u16],
        received_since_ms: i64,
        from_day: u16,
        each: &mut (dyn FnMut(FactRow) + Send),
    ) -> impl std::future::Future<Output = Result<usize, StoreError>> + Send;

    /// Earliest stored visit of each session (`None` when it has none).
    fn first_visits(
        &self,
        sessions: &[SessionRef],
    ) -> impl std::future::Future<Output = Result<Vec<(SessionRef, Option<i64>)>, StoreError>> + Send;

    /// Records copies of dedup keys: in `fact_copies` (by key, for the recount) and in
    /// `copy_log` (by writer partition and sequence, for the other partitions).
    fn write_claims(&self, rows: &[ClaimRow]) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// Copies in `copy_log` whose `writer_seq` is above `cursor[writer_partition]` (above 0 for
    /// writers not in `cursor`).
    fn claims_since(
        &self,
        cursor: &BTreeMap<u16, u64>,
    ) -> impl std::future::Future<Output = Result<Vec<ClaimRow>, StoreError>> + Send;

    /// Records dedup notices.
    fn write_notices(&self, rows: &[NoticeRow]) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// Notices for `targets` whose `writer_seq` is above `cursor[writer_partition]` (above 0
    /// for writers not in `cursor`).
    fn notices_since(
        &self,
        targets: &[u16],
        cursor: &BTreeMap<u16, u64>,
    ) -> impl std::future::Future<Output = Result<Vec<NoticeRow>, StoreError>> + Send;

    /// The highest sequence each of `partitions` wrote to `copy_log` or `dedup_notices`.
    fn last_writer_seqs(
        &self,
        partitions: &[u16],
    ) -> impl std::future::Future<Output = Result<HashMap<u16, u64>, StoreError>> + Send;

    /// The stored rows of the facts named (those not stored are left out).
    fn facts_by_ref(
        &self,
        refs: &[FactRef],
    ) -> impl std::future::Future<Output = Result<Vec<FactRow>, StoreError>> + Send;

    /// Step 1 of writing a flush ([`crate::flush`] calls the three in order): first-visit, late
    /// and fact-day markers and dead letters (idempotent: written again, they fold by key).
    fn write_markers(&self, batch: &FlushBatch) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// Step 2, the commit point: the facts with their checkpoints, in one INSERT (one block:
    /// all of its rows land or none).
    fn write_facts(&self, batch: &FlushBatch) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// Step 3: the bucket tables (versioned full values: written again, the newest wins).
    fn write_buckets(&self, batch: &FlushBatch) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// The latest rebuild request of each of `partitions` that has one (`requested_ms`).
    fn rebuild_requests(
        &self,
        partitions: &[u16],
    ) -> impl std::future::Future<Output = Result<HashMap<u16, i64>, StoreError>> + Send;

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

    async fn facts_since(
        &self,
        partitions: &[u16],
        received_since_ms: i64,
        from_day: u16,
        each: &mut (dyn FnMut(FactRow) + Send),
    ) -> Result<usize, StoreError> {
        self.stream_partition_facts_since(partitions, received_since_ms, from_day, each).await
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

    async fn write_claims(&self, rows: &[ClaimRow]) -> Result<(), StoreError> {
        let copies: Vec<CopyRow> = rows.iter().map(ClaimRow::copy_row).collect();
        tokio::try_join!(self.insert("fact_copies", &copies), self.insert("copy_log", rows))?;
        Ok(())
    }

    async fn claims_since(&self, cursor: &BTreeMap<u16, u64>) -> Result<Vec<ClaimRow>, StoreError> {
        self.copy_log_since(cursor).await
    }

    async fn write_notices(&self, rows: &[NoticeRow]) -> Result<(), StoreError> {
        self.insert("dedup_notices", rows).await
    }

    async fn notices_since(&self, targets: &[u16], cursor: &BTreeMap<u16, u64>) -> Result<Vec<NoticeRow>, StoreError> {
        self.dedup_notices_since(targets, cursor).await
    }

    async fn last_writer_seqs(&self, partitions: &[u16]) -> Result<HashMap<u16, u64>, StoreError> {
        Store::last_writer_seqs(self, partitions).await
    }

    async fn facts_by_ref(&self, refs: &[FactRef]) -> Result<Vec<FactRow>, StoreError> {
        let ids: Vec<(String, u16, i8, String)> =
            refs.iter().map(|r| (r.client_id.clone(), r.day, r.kind, r.key.fact_id())).collect();
        self.facts_by_id(&ids).await
    }

    async fn write_markers(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        self.insert("session_first_visits", &batch.first_visits).await?;
        self.insert("late_facts", &batch.late).await?;
        self.insert("fact_days", &batch.fact_days).await?;
        // Before the checkpoint that moves past them: a crash in between makes the next owner
        // consume the messages again and write the same keys again (folded by FINAL).
        self.insert("dead_letters", &batch.dead_letters).await
    }

    async fn write_facts(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        debug_assert!(batch.facts.len() <= MAX_FACT_ROWS_PER_INSERT);
        debug_assert!(batch.facts.iter().any(|r| r.kind == kind::CHECKPOINT));
        self.insert("facts", &batch.facts).await
    }

    async fn write_buckets(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        // After the commit point the aggregate tables are independent (each row is a versioned
        // full value, so any subset surviving a crash is overwritten by the rebuild): write them
        // concurrently.
        tokio::try_join!(
            self.insert("minute_visits", &batch.minute_visits),
            self.insert("minute_live", &batch.minute_live),
            self.insert("daily_totals", &batch.daily_totals),
            self.insert("daily_marketing", &batch.daily_marketing),
            self.insert("day_sessions", &batch.day_sessions),
        )?;
        Ok(())
    }

    async fn rebuild_requests(&self, partitions: &[u16]) -> Result<HashMap<u16, i64>, StoreError> {
        Store::rebuild_requests(self, partitions).await
    }

    async fn heartbeat(&self, rows: &[ProgressRow]) -> Result<(), StoreError> {
        self.insert("processor_progress", rows).await
    }
}
