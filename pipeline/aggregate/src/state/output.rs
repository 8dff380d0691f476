//! What a flush writes, and releasing the state of closed days once it is written.

use chrono_tz::Tz;
use rustc_hash::{FxHashMap, FxHashSet};

use eventflow_core::time;
use eventflow_store::rows::{
    page_code, Checkpoint, DailyMarketingRow, DailyTotalsRow, DaySessionRow, FactDayRow, FactRow, LateFactRow,
    MinuteLiveRow, MinuteVisitsRow, SpoolMark,
};

use super::{FlushBatch, PartitionState, SPOOL_MARK_RETENTION_MS};

impl PartitionState {
    pub(super) fn mark_all_dirty(&mut self) {
        self.dirty_days.clear();
        for ((client, day), d) in self.days.iter_mut() {
            d.dirty = true;
            for m in d.marketing.values_mut() {
                m.dirty = true;
            }
            self.dirty_days.push((client.clone(), *day));
        }
        self.dirty_minutes.clear();
        for (key, m) in self.minutes.iter_mut() {
            m.dirty = true;
            self.dirty_minutes.push(key.clone());
        }
        self.dirty_live.clear();
        for (key, l) in self.live.iter_mut() {
            l.dirty = true;
            self.dirty_live.push(key.clone());
        }
    }

    /// The checkpoint describing the state after everything applied so far.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut spools: Vec<SpoolMark> = self.spools.values().copied().collect();
        spools.sort_by_key(|m| (m.spool_id, m.topic));
        Checkpoint {
            epoch: self.epoch,
            seq: self.seq(),
            offsets: self.offsets,
            watermark_ms: self.watermark_ms,
            aggregates_watermark_ms: self.aggregates_watermark_ms,
            event_watermark_ms: self.event_watermark_ms,
            rebuild_request_ms: self.rebuild_request_ms,
            spools,
            notice_cursor: self.dedup.notice_cursor().clone(),
            claim_cursor: self.dedup.claim_cursor().clone(),
        }
    }

    /// Records that the batch from the last [`Self::take_flush`] was written completely, then
    /// releases state of closed days.
    pub fn flush_written(&mut self) {
        self.aggregates_watermark_ms = self.pending_aggregates_watermark_ms;
        self.written_event_watermark_ms = self.pending_event_watermark_ms;
        self.release_closed();
    }

    /// Drains everything to write since the last flush. Call after the copies are decided
    /// ([`Self::fold_decided`]) and [`Self::resolve_lookups`]: rows must not be written while
    /// counts or linkage are still provisional.
    pub fn take_flush(&mut self) -> FlushBatch {
        debug_assert!(!self.has_deferred(), "flush with undecided copies");
        debug_assert!(self.pending_lookups.is_empty(), "flush with unresolved session lookups");
        let version = self.seq();
        let partition = self.partition;
        self.pending_aggregates_watermark_ms = self.watermark_ms;
        self.pending_event_watermark_ms = self.event_watermark_ms;
        let checkpoint = self.checkpoint();
        let mut facts = std::mem::take(&mut self.raw);
        facts.push(FactRow::checkpoint(partition, &checkpoint));

        let mut batch = FlushBatch {
            first_visits: self.first_visits.drain().map(|(_, row)| row).collect(),
            late: self
                .late
                .drain()
                .map(|((client, day), seq)| LateFactRow {
                    client_id: client.to_string(),
                    day,
                    kafka_partition: partition,
                    seq,
                })
                .collect(),
            fact_days: self
                .fact_days
                .drain()
                .map(|(client, day)| FactDayRow { client_id: client.to_string(), day, kafka_partition: partition })
                .collect(),
            facts,
            day_sessions: self
                .session_rows
                .drain()
                .map(|((client, day, _), (session_id, present))| DaySessionRow {
                    client_id: client.to_string(),
                    day,
                    session_id,
                    kafka_partition: partition,
                    version,
                    present: u8::from(present),
                })
                .collect(),
            checkpoint,
            ..FlushBatch::default()
        };
        for key in self.dirty_days.drain(..) {
            let Some(d) = self.days.get_mut(&key) else {
                continue;
            };
            d.dirty = false;
            batch.daily_totals.push(DailyTotalsRow::new(key.0.to_string(), key.1, partition, version, d.counters));
            for m in d.marketing.values_mut().filter(|m| m.dirty) {
                m.dirty = false;
                batch.daily_marketing.push(DailyMarketingRow::new(
                    key.0.to_string(),
                    key.1,
                    &m.dims,
                    partition,
                    version,
                    m.counters,
                ));
            }
        }
        for key in self.dirty_minutes.drain(..) {
            let Some(m) = self.minutes.get_mut(&key) else {
                continue;
            };
            m.dirty = false;
            batch.minute_visits.push(MinuteVisitsRow {
                client_id: key.0.to_string(),
                minute: u32::try_from(key.1 / 1000).unwrap_or(0),
                page: page_code(Some(key.2)),
                kafka_partition: partition,
                version,
                visits: m.visits,
            });
        }
        for key in self.dirty_live.drain(..) {
            let Some(l) = self.live.get_mut(&key) else {
                continue;
            };
            l.dirty = false;
            batch.minute_live.push(MinuteLiveRow {
                client_id: key.0.to_string(),
                webinar_id: l.webinar_id.clone(),
                minute: u32::try_from(key.2 / 1000).unwrap_or(0),
                kafka_partition: partition,
                version,
                viewers: l.sessions.len() as u64,
            });
        }
        batch
    }

    /// Releases state of closed days and long-gone spools. Only after a successful flush:
    /// closed days are never written again, so their last dirty values must be flushed first.
    fn release_closed(&mut self) {
        let wm = self.watermark_ms;
        let lateness = self.cfg.allowed_lateness_ms;
        let closed = |day: u16, tz: Tz| time::day_closed(time::day_from_number(day), tz, wm, lateness);
        self.days.retain(|(_, day), d| d.dirty || !closed(*day, d.tz));
        let clients = self.clients.clone();
        self.minutes.retain(|(client, _, _), m| m.dirty || !closed(m.day, clients.timezone(client)));
        self.live.retain(|(client, _, _), l| l.dirty || !closed(l.day, clients.timezone(client)));
        self.sessions.retain(|key, s| {
            s.entries.retain(|e| !closed(e.day, clients.timezone(&s.client)));
            let tz = clients.timezone(&s.client);
            let last_day = time::day_number(time::client_day(s.last_event_ms.max(0), tz));
            self.pending_lookups.contains(key) || !s.entries.is_empty() || !closed(last_day, tz)
        });
        self.dedup.release(wm);
        self.spools.retain(|_, m| m.seen_ms + SPOOL_MARK_RETENTION_MS > wm);
        let live_clients: FxHashSet<&str> = self.days.keys().map(|(c, _)| &**c).collect();
        let sessions_clients: FxHashSet<&str> = self.sessions.values().map(|s| &*s.client).collect();
        self.interned
            .retain(|name, _| live_clients.contains(name.as_str()) || sessions_clients.contains(name.as_str()));
        // `retain` keeps capacity: without this a busy day's tables would stay allocated forever.
        shrink_sparse(&mut self.days);
        shrink_sparse(&mut self.minutes);
        shrink_sparse(&mut self.live);
        shrink_sparse(&mut self.sessions);
        shrink_sparse(&mut self.first_visits);
    }
}

/// Gives memory back once a table is at most a quarter full, keeping room to grow (amortised:
/// a table shrinks only after losing three quarters of its entries).
fn shrink_sparse<K: Eq + std::hash::Hash, V>(map: &mut FxHashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}
