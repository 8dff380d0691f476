//! Queries the stream processor runs: checkpoints, replay of stored facts, session lookups.

use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::rows::{checkpoint_fact_id, Checkpoint, ClaimRow, CopyRow, FactRow, NoticeRow};
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

    /// Stored facts of `partitions` received since `received_since_ms` on client days from
    /// `from_day`, one row per fact (`FINAL`: a fact stored again comes once, as its latest
    /// version), handed to `each` as they stream in: the read covers primary-key ranges from
    /// `from_day`, has no ORDER BY (replay does not depend on order) and never holds the rows in
    /// memory. Returns the number of rows.
    pub async fn stream_partition_facts_since(
        &self,
        partitions: &[u16],
        received_since_ms: i64,
        from_day: u16,
        each: &mut (dyn FnMut(FactRow) + Send),
    ) -> Result<usize> {
        if partitions.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "SELECT ?fields FROM facts FINAL WHERE day >= ? AND kind != 'checkpoint' AND kafka_partition IN {} \
             AND received_at_ms >= ?",
            in_placeholders(partitions.len())
        );
        let from = eventflow_core::time::format_day(eventflow_core::time::day_from_number(from_day));
        // No request timeout around the whole read: a takeover of busy days streams for a while;
        // each chunk still arrives over a live connection.
        let mut cursor =
            bind_all(self.query(&sql)?.bind(from), partitions).bind(received_since_ms).fetch::<FactRow>()?;
        let mut n = 0;
        while let Some(row) = cursor.next().await? {
            each(row);
            n += 1;
        }
        Ok(n)
    }

    /// [`Self::stream_partition_facts_since`], collected (tests and tools; ordered by
    /// partition and sequence).
    pub async fn partition_facts_since(
        &self,
        partitions: &[u16],
        received_since_ms: i64,
        from_day: u16,
    ) -> Result<Vec<FactRow>> {
        let mut rows = Vec::new();
        self.stream_partition_facts_since(partitions, received_since_ms, from_day, &mut |r| rows.push(r)).await?;
        rows.sort_by_key(|r| (r.kafka_partition, r.seq));
        Ok(rows)
    }

    /// `copy_log` rows above `cursor[writer_partition]` (above 0 for writers not in `cursor`):
    /// one primary-key range per writer.
    pub async fn copy_log_since(&self, cursor: &BTreeMap<u16, u64>) -> Result<Vec<ClaimRow>> {
        let mut ranges: Vec<String> =
            cursor.keys().map(|_| "(writer_partition = ? AND writer_seq > ?)".to_owned()).collect();
        ranges.push(if cursor.is_empty() {
            "1".to_owned()
        } else {
            format!("writer_partition NOT IN {}", in_placeholders(cursor.len()))
        });
        let sql = format!("SELECT ?fields FROM copy_log WHERE {}", ranges.join(" OR "));
        self.timed(async {
            let mut q = self.query(&sql)?;
            for (w, seq) in cursor {
                q = q.bind(*w).bind(*seq);
            }
            q = bind_all(q, cursor.keys());
            Ok(q.fetch_all::<ClaimRow>().await?)
        })
        .await
    }

    /// The copies of `keys` (`(client_id, kind code, uid)`) in `fact_copies` (tests and tools).
    pub async fn copies_of(&self, keys: &[(&str, i8, &str)]) -> Result<Vec<CopyRow>> {
        let mut out = Vec::new();
        for chunk in keys.chunks(1000) {
            let sql = format!(
                "SELECT DISTINCT ?fields FROM fact_copies WHERE (client_id, kind, uid) IN ({})",
                vec!["(?, ?, ?)"; chunk.len()].join(", ")
            );
            let rows = self
                .timed(async {
                    let q = chunk.iter().fold(self.query(&sql)?, |q, (c, k, u)| {
                        q.bind(*c).bind(if *k == crate::rows::kind::VISIT { "visit" } else { "entry" }).bind(*u)
                    });
                    Ok(q.fetch_all::<CopyRow>().await?)
                })
                .await?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// Notices for `targets` with `writer_seq` above `cursor[writer_partition]` (above 0 for
    /// writers not in `cursor`).
    pub async fn dedup_notices_since(&self, targets: &[u16], cursor: &BTreeMap<u16, u64>) -> Result<Vec<NoticeRow>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let mut ranges: Vec<String> =
            cursor.keys().map(|_| "(writer_partition = ? AND writer_seq > ?)".to_owned()).collect();
        ranges.push(if cursor.is_empty() {
            "1".to_owned()
        } else {
            format!("writer_partition NOT IN {}", in_placeholders(cursor.len()))
        });
        let sql = format!(
            "SELECT ?fields FROM dedup_notices WHERE target_partition IN {} AND ({})",
            in_placeholders(targets.len()),
            ranges.join(" OR ")
        );
        self.timed(async {
            let mut q = bind_all(self.query(&sql)?, targets);
            for (w, seq) in cursor {
                q = q.bind(*w).bind(*seq);
            }
            q = bind_all(q, cursor.keys());
            Ok(q.fetch_all::<NoticeRow>().await?)
        })
        .await
    }

    /// Stored rows of the facts `(client_id, day, kind code, fact_id)` (one per fact, `FINAL`).
    pub async fn facts_by_id(&self, ids: &[(String, u16, i8, String)]) -> Result<Vec<FactRow>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(1000) {
            let clients: BTreeSet<&str> = chunk.iter().map(|(c, ..)| c.as_str()).collect();
            // The stored day of a fact can differ by one from the one a notice carries (a
            // time-zone change between its copy and its fact): look one day around it.
            let days: BTreeSet<String> = chunk
                .iter()
                .flat_map(|(_, d, ..)| [d.saturating_sub(1), *d, d.saturating_add(1)])
                .map(|d| eventflow_core::time::format_day(eventflow_core::time::day_from_number(d)))
                .collect();
            let fact_ids: BTreeSet<&str> = chunk.iter().map(|(.., f)| f.as_str()).collect();
            let wanted: HashSet<(&str, i8, &str)> =
                chunk.iter().map(|(c, _, k, f)| (c.as_str(), *k, f.as_str())).collect();
            let sql = format!(
                "SELECT ?fields FROM facts FINAL WHERE client_id IN {} AND day IN {} AND kind IN ('visit', 'entry') AND fact_id IN {}",
                in_placeholders(clients.len()),
                in_placeholders(days.len()),
                in_placeholders(fact_ids.len())
            );
            let rows = self
                .timed(async {
                    let q = bind_all(self.query(&sql)?, clients.iter().copied());
                    let q = bind_all(q, days.iter().map(String::as_str));
                    Ok(bind_all(q, fact_ids.iter().copied()).fetch_all::<FactRow>().await?)
                })
                .await?;
            out.extend(
                rows.into_iter().filter(|r| wanted.contains(&(r.client_id.as_str(), r.kind, r.fact_id.as_str()))),
            );
        }
        Ok(out)
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

    /// Asks the owners of `partitions` to rebuild their open windows from the stored facts.
    pub async fn request_rebuild(&self, partitions: &[u16], reason: &str) -> Result<()> {
        #[derive(clickhouse::Row, serde::Serialize)]
        struct Request<'a> {
            kafka_partition: u16,
            requested_ms: i64,
            reason: &'a str,
        }
        let now = chrono::Utc::now().timestamp_millis();
        let rows: Vec<Request<'_>> =
            partitions.iter().map(|p| Request { kafka_partition: *p, requested_ms: now, reason }).collect();
        if rows.is_empty() {
            return Ok(());
        }
        self.check_faults("rebuild_requests")?;
        self.timed(async {
            let mut insert = self.client().insert::<Request<'_>>("rebuild_requests").await?;
            for r in &rows {
                insert.write(r).await?;
            }
            insert.end().await?;
            Ok(())
        })
        .await
    }

    /// The latest rebuild request of each of `partitions` that has one.
    /// The highest sequence each of `partitions` wrote to `copy_log` or `dedup_notices` (a
    /// takeover starts its sequences above it: readers keep a cursor per writer, so a sequence
    /// must never be written twice, not even by an attempt that crashed before its checkpoint).
    pub async fn last_writer_seqs(&self, partitions: &[u16]) -> Result<HashMap<u16, u64>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Last {
            writer_partition: u16,
            writer_seq: u64,
        }
        let mut out: HashMap<u16, u64> = HashMap::new();
        if partitions.is_empty() {
            return Ok(out);
        }
        for table in ["copy_log", "dedup_notices"] {
            let sql = format!(
                "SELECT writer_partition, max(writer_seq) AS writer_seq FROM {table} \
                 WHERE writer_partition IN {} GROUP BY writer_partition",
                in_placeholders(partitions.len())
            );
            let rows =
                self.timed(async { Ok(bind_all(self.query(&sql)?, partitions).fetch_all::<Last>().await?) }).await?;
            for r in rows {
                let at = out.entry(r.writer_partition).or_insert(0);
                *at = (*at).max(r.writer_seq);
            }
        }
        Ok(out)
    }

    pub async fn rebuild_requests(&self, partitions: &[u16]) -> Result<HashMap<u16, i64>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Latest {
            kafka_partition: u16,
            requested_ms: i64,
        }
        if partitions.is_empty() {
            return Ok(HashMap::new());
        }
        let sql = format!(
            "SELECT kafka_partition, max(requested_ms) AS requested_ms FROM rebuild_requests \
             WHERE kafka_partition IN {} GROUP BY kafka_partition",
            in_placeholders(partitions.len())
        );
        let rows =
            self.timed(async { Ok(bind_all(self.query(&sql)?, partitions).fetch_all::<Latest>().await?) }).await?;
        Ok(rows.into_iter().map(|r| (r.kafka_partition, r.requested_ms)).collect())
    }
}
