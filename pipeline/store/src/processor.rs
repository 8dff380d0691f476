//! Queries the stream processor runs: checkpoints, replay of stored facts, session lookups.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::rows::{checkpoint_fact_id, Checkpoint, FactRow};
use crate::{bind_all, in_placeholders, Result, Store, StoreError};

#[derive(clickhouse::Row, serde::Deserialize)]
struct CheckpointRow {
    kafka_partition: u16,
    checkpoint: String,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct FirstVisit {
    client_id: String,
    session_id: String,
    first: i64,
}

impl Store {
    /// Latest checkpoint of each of `partitions` that has one.
    pub async fn load_checkpoints(&self, partitions: &[u16]) -> Result<HashMap<u16, Checkpoint>> {
        if partitions.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<String> = partitions.iter().map(|p| checkpoint_fact_id(*p)).collect();
        let sql = format!(
            "SELECT kafka_partition, argMax(checkpoint, seq) AS checkpoint FROM facts \
             WHERE client_id = '' AND kind = 'checkpoint' AND fact_id IN {} GROUP BY kafka_partition",
            in_placeholders(ids.len())
        );
        let rows =
            self.timed(async { Ok(bind_all(self.query(&sql)?, &ids).fetch_all::<CheckpointRow>().await?) }).await?;
        let mut out = HashMap::new();
        for row in rows {
            let cp: Checkpoint = serde_json::from_str(&row.checkpoint)
                .map_err(|e| StoreError::Invalid(format!("checkpoint of partition {}: {e}", row.kafka_partition)))?;
            out.insert(row.kafka_partition, cp);
        }
        Ok(out)
    }

    /// Latest checkpoint of every partition that has one.
    pub async fn all_checkpoints(&self) -> Result<HashMap<u16, Checkpoint>> {
        let rows = self
            .timed(async {
                Ok(self
                    .query(
                        "SELECT kafka_partition, argMax(checkpoint, seq) AS checkpoint FROM facts \
                         WHERE client_id = '' AND kind = 'checkpoint' GROUP BY kafka_partition",
                    )?
                    .fetch_all::<CheckpointRow>()
                    .await?)
            })
            .await?;
        let mut out = HashMap::new();
        for row in rows {
            let cp: Checkpoint = serde_json::from_str(&row.checkpoint)
                .map_err(|e| StoreError::Invalid(format!("checkpoint of partition {}: {e}", row.kafka_partition)))?;
            out.insert(row.kafka_partition, cp);
        }
        Ok(out)
    }

    /// Clients with any fact on a day of `[from, to]`.
    pub async fn clients_with_facts(&self, from: chrono::NaiveDate, to: chrono::NaiveDate) -> Result<Vec<String>> {
        self.timed(async {
            Ok(self
                .query("SELECT DISTINCT client_id FROM facts WHERE client_id != '' AND day >= ? AND day <= ? ORDER BY client_id")?
                .bind(eventflow_core::time::format_day(from))
                .bind(eventflow_core::time::format_day(to))
                .fetch_all::<String>()
                .await?)
        })
        .await
    }

    /// Stored facts of `partitions` received since `received_since_ms`, one row per fact
    /// (`FINAL`: a fact a fenced-off zombie also wrote comes once), in `(partition, seq)` order.
    pub async fn partition_facts_since(&self, partitions: &[u16], received_since_ms: i64) -> Result<Vec<FactRow>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT ?fields FROM facts FINAL WHERE kind != 'checkpoint' AND kafka_partition IN {} \
             AND received_at_ms >= ? ORDER BY kafka_partition, seq",
            in_placeholders(partitions.len())
        );
        self.timed(async {
            Ok(bind_all(self.query(&sql)?, partitions).bind(received_since_ms).fetch_all::<FactRow>().await?)
        })
        .await
    }

    /// Earliest stored visit of each `(client_id, session_id)` that has one.
    pub async fn session_first_visits(&self, sessions: &[(String, String)]) -> Result<HashMap<(String, String), i64>> {
        // A few queries per flush whatever the number of clients: each chunk asks for its clients x
        // its sessions (the primary key is (client_id, session_id)) and keeps the asked pairs.
        let mut out = HashMap::new();
        for chunk in sessions.chunks(1000) {
            let clients: BTreeSet<&str> = chunk.iter().map(|(c, _)| c.as_str()).collect();
            let ids: BTreeSet<&str> = chunk.iter().map(|(_, s)| s.as_str()).collect();
            let asked: HashSet<(&str, &str)> = chunk.iter().map(|(c, s)| (c.as_str(), s.as_str())).collect();
            let sql = format!(
                "SELECT client_id, session_id, min(first_visit_ms) AS first FROM session_first_visits \
                 WHERE client_id IN {} AND session_id IN {} GROUP BY client_id, session_id",
                in_placeholders(clients.len()),
                in_placeholders(ids.len())
            );
            let found = self
                .timed(async {
                    let q = bind_all(self.query(&sql)?, clients.iter().copied());
                    Ok(bind_all(q, ids.iter().copied()).fetch_all::<FirstVisit>().await?)
                })
                .await?;
            for f in found {
                if asked.contains(&(f.client_id.as_str(), f.session_id.as_str())) {
                    out.insert((f.client_id, f.session_id), f.first);
                }
            }
        }
        Ok(out)
    }
}
