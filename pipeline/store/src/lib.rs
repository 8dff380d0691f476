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
pub mod links;
pub mod migrate;
pub mod processor;
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
    Migration { name: String, source: clickhouse::error::Error },
    #[error("invalid stored data: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether retrying the same request may succeed (connection refused, timeout, overload).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::ClickHouse(e) => {
                matches!(e, clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut) || {
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

/// `(?, ?, ...)` with `n` placeholders (at least one), for `x IN (...)`: ClickHouse 18.16 has
/// no `IN [array]`, so each value is bound (and escaped) separately.
pub fn in_placeholders(n: usize) -> String {
    let mut s = String::with_capacity(2 + 3 * n);
    s.push('(');
    for i in 0..n.max(1) {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s.push(')');
    s
}

/// Binds every value of `values`, in order.
pub fn bind_all<T: clickhouse::sql::Bind>(
    query: clickhouse::query::Query,
    values: impl IntoIterator<Item = T>,
) -> clickhouse::query::Query {
    values.into_iter().fold(query, |q, v| q.bind(v))
}

/// Handle to the EventFlow database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    database: String,
    request_timeout: Duration,
    /// Test hook: requests whose SQL contains one of these fragments fail (fault injection for
    /// the reader API's error paths; empty in production).
    faults: std::sync::Arc<std::sync::RwLock<Vec<String>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("database", &self.database).finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(config: &ClickHouseConfig) -> Self {
        Self {
            client: config.client().with_database(&config.database),
            database: config.database.clone(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            faults: Default::default(),
        }
    }

    /// Makes every later query or insert whose SQL or table name contains `fragment` fail.
    pub fn inject_fault(&self, fragment: &str) {
        if let Ok(mut f) = self.faults.write() {
            f.push(fragment.to_owned());
        }
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        if let Ok(mut f) = self.faults.write() {
            f.clear();
        }
    }

    /// A query on this database, failing if a fault matches its SQL.
    pub fn query(&self, sql: &str) -> Result<clickhouse::query::Query> {
        self.check_faults(sql)?;
        Ok(self.client.query(sql))
    }

    pub(crate) fn check_faults(&self, what: &str) -> Result<()> {
        if let Ok(faults) = self.faults.read() {
            if let Some(f) = faults.iter().find(|f| what.contains(f.as_str())) {
                return Err(StoreError::Invalid(format!("injected fault: {f}")));
            }
        }
        Ok(())
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs `fut` with the configured request timeout.
    /// Rows of `sql`, whose three placeholders are a client and the first and last day of an
    /// inclusive range (`client_id = ? AND day >= ? AND day <= ?`).
    pub(crate) async fn fetch_client_days<T>(
        &self,
        sql: &str,
        client: &str,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<Vec<T>>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.timed(async {
            Ok(self
                .query(sql)?
                .bind(client)
                .bind(eventflow_core::time::format_day(from))
                .bind(eventflow_core::time::format_day(to))
                .fetch_all::<T>()
                .await?)
        })
        .await
    }

    pub async fn timed<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
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
        self.check_faults(table)?;
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
