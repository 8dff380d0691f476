//! ClickHouse storage of EventFlow.
//!
//! Facts arrive here from the processor ([`Store::write_flush`]) and leave towards the reader
//! API ([`read`]), reconcile and backfill ([`recount`]). The table design and why it makes
//! replays harmless is in `sql/` and `docs/adr/0002-exactly-once-aggregates.md`.
//!
//! Every query is portable between ClickHouse 18.16 and current releases: no query parameters
//! (values are bound client-side with escaping by the `clickhouse` crate), no JOINs, no
//! `DateTime64`, `RowBinary` without names and types.

pub mod config;
pub mod migrate;
pub mod read;
pub mod recount;
pub mod rows;

use std::time::Duration;

use clickhouse::Client;

pub use config::ClickHouseConfig;
pub use rows::*;

/// Errors at the storage boundary. Retryable ones (network, server overload) are kept apart
/// from permanent ones (schema, type) so callers never retry the latter.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse request timed out after {0:?}")]
    Timeout(Duration),
    #[error("migration {name}: {source}")]
    Migration {
        name: String,
        source: clickhouse::error::Error,
    },
    #[error("invalid stored data: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether retrying the same request may succeed (connection refused, timeout, overload).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::ClickHouse(e) => {
                matches!(
                    e,
                    clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut
                ) || {
                    // Server-side errors carry ClickHouse's code in the message; these are transient.
                    let msg = e.to_string();
                    [
                        "TOO_MANY_PARTS",
                        "TOO_MANY_SIMULTANEOUS_QUERIES",
                        "MEMORY_LIMIT_EXCEEDED",
                        "TIMEOUT_EXCEEDED",
                        "Connection refused",
                        "connection closed",
                    ]
                    .iter()
                    .any(|needle| msg.contains(needle))
                }
            }
            StoreError::Migration { .. } | StoreError::Invalid(_) => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle to the EventFlow database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    database: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(config: &ClickHouseConfig) -> Self {
        Self {
            client: config.client().with_database(&config.database),
            database: config.database.clone(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs `fut` with the configured request timeout.
    pub(crate) async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.request_timeout)),
        }
    }

    /// `SELECT 1`: is the server reachable and the database present?
    pub async fn ping(&self) -> Result<()> {
        self.timed(async {
            self.client
                .query("SELECT count() FROM system.tables WHERE database = ?")
                .bind(&self.database)
                .fetch_one::<u64>()
                .await?;
            Ok(())
        })
        .await
    }

    /// Inserts `rows` into `table` as one INSERT statement.
    ///
    /// One INSERT of fewer than `max_insert_block_size` rows is one block; in an unpartitioned
    /// MergeTree that is one part, which becomes visible atomically. The processor relies on this
    /// for the `facts` table (see `sql/001_facts.sql`).
    pub async fn insert<T>(&self, table: &str, rows: &[T]) -> Result<()>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        self.timed(async {
            let mut insert = self.client.insert::<T>(table).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await?;
            Ok(())
        })
        .await
    }
}
