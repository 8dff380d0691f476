//! Folding facts into buckets and taking them out again.
//!
//! [`PartitionState::count`] adds a counted fact to every bucket it belongs to;
//! [`PartitionState::uncount`] is its exact inverse, used when a counted copy turns out to come
//! after another copy of its key within the dedup horizon. Session sets are reference-counted so that the inverse is
//! exact: a session leaves a day (and a marketing bucket) only with its last counted visit.

use std::collections::hash_map::Entry as MapEntry;

use chrono_tz::Tz;
use rustc_hash::FxHashMap;

use eventflow_core::fact::{PageKind, UNRESOLVED};
use eventflow_core::hash::id128;
use eventflow_core::time;
use eventflow_store::rows::{kind, page_from_code, DayCounters, FactRow, MarketingCounters, MarketingDims};

use super::{
    labels, ClientRef, DayState, EntryRef, LiveState, MarketingState, MinuteState, PartitionState, SessionState,
};
use eventflow_store::rows::SessionFirstVisitRow;

/// Identity of a marketing bucket's dimensions (no allocation on the hot path).
fn marketing_id(row: &FactRow) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in marketing_parts(row) {
        h.update(part.as_bytes());
        h.update(&[0xff]);
    }
    h.digest128()
}

/// The labelled dimensions of a fact's marketing bucket.
fn marketing_parts(row: &FactRow) -> [&str; 6] {
    [
        &row.event_id,
        &row.webinar_id,
        labels::cid(&row.cid, row.cid_resolved != 0),
        labels::utm(&row.utm_source),
        labels::utm(&row.utm_medium),
        labels::utm(&row.utm_campaign),
    ]
}

fn marketing_dims(row: &FactRow) -> MarketingDims {
    let [event_id, webinar_id, cid, utm_source, utm_medium, utm_campaign] = marketing_parts(row).map(str::to_owned);
    MarketingDims { event_id, webinar_id, cid, utm_source, utm_medium, utm_campaign }
}

/// Adds one reference to `session`; true when it is new.
fn add_ref(sessions: &mut FxHashMap<u128, u32>, session: u128) -> bool {
    let n = sessions.entry(session).or_insert(0);
    *n += 1;
    *n == 1
}

/// Removes one reference to `session`; true when it was the last.
fn remove_ref(sessions: &mut FxHashMap<u128, u32>, session: u128) -> bool {
    match sessions.entry(session) {
        MapEntry::Occupied(mut o) => {
            *o.get_mut() -= 1;
            if *o.get() == 0 {
                o.remove();
                true
            } else {
                false
            }
        }
        MapEntry::Vacant(_) => false,
    }
}

fn page_counter(c: &mut DayCounters, page: PageKind) -> &mut u64 {
    match page {
        PageKind::Landing => &mut c.visits_landing,
        PageKind::Webinar => &mut c.visits_webinar,
        PageKind::Live => &mut c.visits_live,
    }
}

impl PartitionState {
    pub(super) fn session_mut(&mut self, client: &ClientRef, session_id: &str) -> (u128, &mut SessionState) {
        let key = id128(client, session_id);
        let state = self.sessions.entry(key).or_insert_with(|| SessionState {
            client: client.clone(),
            session_id: session_id.to_owned(),
            first_visit_ms: None,
            store_checked: false,
            entries: Vec::new(),
            last_event_ms: i64::MIN,
        });
        (key, state)
    }

    pub(super) fn day_mut(&mut self, client: &ClientRef, day: u16, tz: Tz) -> &mut DayState {
        self.days.entry((client.clone(), day)).or_insert_with(|| DayState {
            tz,
            counters: DayCounters::default(),
            sessions: FxHashMap::default(),
            marketing: FxHashMap::default(),
            dirty: false,
        })
    }

    fn marketing_mut(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) -> (u128, &mut MarketingState) {
        let key = marketing_id(row);
        let m = self.day_mut(client, day, tz).marketing.entry(key).or_insert_with(|| MarketingState {
            dims: marketing_dims(row),
            counters: MarketingCounters::default(),
            sessions: FxHashMap::default(),
            dirty: false,
        });
        m.dirty = true;
        (key, m)
    }

    pub(super) fn touch_day(&mut self, client: &ClientRef, day: u16) {
        if let Some(d) = self.days.get_mut(&(client.clone(), day)) {
            if !d.dirty {
                d.dirty = true;
                self.dirty_days.push((client.clone(), day));
            }
        }
    }

    /// Records a visit for linkage: any visit, counted or not, on time or late, establishes its
    /// session at its event time.
    pub(super) fn observe_visit(&mut self, client: &ClientRef, row: &FactRow) {
        let event_ms = row.event_time_ms;
        let replaying = self.replaying;
        let (session_key, session) = self.session_mut(client, &row.session_id);
        session.last_event_ms = session.last_event_ms.max(event_ms);
        let earlier = session.first_visit_ms.is_none_or(|first| event_ms < first);
        if earlier {
            session.first_visit_ms = Some(event_ms);
            if !replaying {
                self.first_visits.insert(
                    session_key,
                    SessionFirstVisitRow::new(client.to_string(), row.session_id.clone(), event_ms),
                );
            }
            self.relink(session_key);
        }
    }

    /// Folds a counted fact of an open `day` into its buckets.
    pub(super) fn count(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) {
        match row.kind {
            kind::VISIT => self.count_visit(client, day, tz, row),
            kind::ENTRY => self.count_entry(client, day, tz, row),
            kind::PING => self.count_ping(client, day, tz, row),
            _ => {}
        }
    }

    /// A fact of an open day that does not count (a duplicate copy) still has a stored fact on
    /// its day, so the day gets its `daily_totals` row (zeros if nothing else counts there):
    /// the reader takes a day with facts and no row for a lost aggregate. A visit's session
    /// gets an explicit `present = 0` row if no counted visit keeps it in the day, so a stale
    /// row from before a crash is overwritten.
    pub(super) fn not_counted(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) {
        if !self.days.contains_key(&(client.clone(), day)) {
            self.day_mut(client, day, tz);
            self.touch_day(client, day);
        }
        // The buckets the fact would count in are held (at zero if nothing else counts there):
        // a replay after a crash then rewrites a bucket whose only count was taken out.
        if matches!(row.kind, kind::VISIT | kind::ENTRY) {
            self.marketing_mut(client, day, tz, row);
        }
        if let (kind::VISIT, Some(page)) = (row.kind, page_from_code(row.page)) {
            let key = (client.clone(), time::minute_start_ms(row.event_time_ms), page);
            let ms = self.minutes.entry(key.clone()).or_insert(MinuteState { day, visits: 0, dirty: false });
            if !ms.dirty {
                ms.dirty = true;
                self.dirty_minutes.push(key);
            }
        }
        if row.kind == kind::VISIT {
            let session = id128(client, &row.session_id);
            let present = self.days.get(&(client.clone(), day)).is_some_and(|d| d.sessions.contains_key(&session));
            if !present {
                self.session_rows.insert((client.clone(), day, session), (row.session_id.clone(), false));
            }
        }
    }

    fn count_visit(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) {
        let Some(page) = page_from_code(row.page) else { return };
        let session = id128(client, &row.session_id);
        let missing = labels::utm_missing(&row.utm_source);
        let unresolved = labels::cid(&row.cid, row.cid_resolved != 0) == UNRESOLVED;
        let d = self.day_mut(client, day, tz);
        d.counters.visits += 1;
        *page_counter(&mut d.counters, page) += 1;
        d.counters.visits_utm_missing += u64::from(missing);
        d.counters.visits_cid_unresolved += u64::from(unresolved);
        if add_ref(&mut d.sessions, session) {
            d.counters.unique_sessions += 1;
            self.session_rows.insert((client.clone(), day, session), (row.session_id.clone(), true));
        }
        let (_, m) = self.marketing_mut(client, day, tz, row);
        m.counters.visits += 1;
        if add_ref(&mut m.sessions, session) {
            m.counters.unique_sessions += 1;
        }
        self.touch_day(client, day);

        let minute = time::minute_start_ms(row.event_time_ms);
        let key = (client.clone(), minute, page);
        let ms = self.minutes.entry(key.clone()).or_insert(MinuteState { day, visits: 0, dirty: false });
        ms.visits += 1;
        if !ms.dirty {
            ms.dirty = true;
            self.dirty_minutes.push(key);
        }
    }

    fn count_entry(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) {
        let event_ms = row.event_time_ms;
        let (m_key, _) = self.marketing_mut(client, day, tz, row);
        let (session_key, session) = self.session_mut(client, &row.session_id);
        session.last_event_ms = session.last_event_ms.max(event_ms);
        let linked = session.first_visit_ms.is_some_and(|first| first <= event_ms);
        let needs_lookup = !linked && !session.store_checked;
        session.entries.push(EntryRef { key: row.copy_key(), day, marketing: m_key, event_ms, linked });
        if needs_lookup {
            // An earlier visit may be older than the state remembers; ask the store at flush.
            self.pending_lookups.insert(session_key);
        }
        let d = self.day_mut(client, day, tz);
        d.counters.entries += 1;
        d.counters.linked_entries += u64::from(linked);
        if let Some(m) = d.marketing.get_mut(&m_key) {
            m.counters.entries += 1;
            m.counters.linked_entries += u64::from(linked);
        }
        self.touch_day(client, day);
    }

    fn count_ping(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) {
        let session_key = id128(client, &row.session_id);
        let minute = time::minute_start_ms(row.event_time_ms);
        let key = (client.clone(), id128(client, &row.webinar_id), minute);
        let live = self.live.entry(key.clone()).or_insert_with(|| LiveState {
            webinar_id: row.webinar_id.clone(),
            day,
            sessions: Default::default(),
            dirty: false,
        });
        if !live.sessions.insert(session_key) {
            // Second ping of the session in this minute: already a viewer.
            return;
        }
        if !live.dirty {
            live.dirty = true;
            self.dirty_live.push(key);
        }
        let d = self.day_mut(client, day, tz);
        d.counters.viewer_minutes += 1;
        self.touch_day(client, day);
    }

    /// Takes a counted visit or entry of an open `day` out of its buckets: the exact inverse of
    /// [`Self::count`]. Returns false when the fact was not found counted in this state.
    pub(super) fn uncount(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) -> bool {
        match row.kind {
            kind::VISIT => self.uncount_visit(client, day, tz, row),
            kind::ENTRY => self.uncount_entry(client, day, row),
            _ => false,
        }
    }

    fn uncount_visit(&mut self, client: &ClientRef, day: u16, tz: Tz, row: &FactRow) -> bool {
        let Some(page) = page_from_code(row.page) else { return false };
        let session = id128(client, &row.session_id);
        let Some(d) = self.days.get_mut(&(client.clone(), day)) else { return false };
        if !d.sessions.contains_key(&session) {
            return false;
        }
        d.counters.visits -= 1;
        *page_counter(&mut d.counters, page) -= 1;
        d.counters.visits_utm_missing -= u64::from(labels::utm_missing(&row.utm_source));
        d.counters.visits_cid_unresolved -= u64::from(labels::cid(&row.cid, row.cid_resolved != 0) == UNRESOLVED);
        if remove_ref(&mut d.sessions, session) {
            d.counters.unique_sessions -= 1;
            self.session_rows.insert((client.clone(), day, session), (row.session_id.clone(), false));
        }
        let (_, m) = self.marketing_mut(client, day, tz, row);
        m.counters.visits = m.counters.visits.saturating_sub(1);
        if remove_ref(&mut m.sessions, session) {
            m.counters.unique_sessions -= 1;
        }
        self.touch_day(client, day);
        let minute = time::minute_start_ms(row.event_time_ms);
        let key = (client.clone(), minute, page);
        if let Some(ms) = self.minutes.get_mut(&key) {
            ms.visits = ms.visits.saturating_sub(1);
            if !ms.dirty {
                ms.dirty = true;
                self.dirty_minutes.push(key);
            }
        }
        true
    }

    fn uncount_entry(&mut self, client: &ClientRef, day: u16, row: &FactRow) -> bool {
        let copy = row.copy_key();
        let session_key = id128(client, &row.session_id);
        let Some(session) = self.sessions.get_mut(&session_key) else { return false };
        let Some(at) = session.entries.iter().position(|e| e.key == copy) else { return false };
        let e = session.entries.swap_remove(at);
        let Some(d) = self.days.get_mut(&(client.clone(), day)) else { return false };
        d.counters.entries -= 1;
        d.counters.linked_entries -= u64::from(e.linked);
        if let Some(m) = d.marketing.get_mut(&e.marketing) {
            m.counters.entries -= 1;
            m.counters.linked_entries -= u64::from(e.linked);
            m.dirty = true;
        }
        self.touch_day(client, day);
        true
    }

    /// Links entries of `session_key` that its (new) first visit now precedes.
    pub(super) fn relink(&mut self, session_key: u128) {
        let Some(session) = self.sessions.get_mut(&session_key) else {
            return;
        };
        let Some(first) = session.first_visit_ms else {
            return;
        };
        let client = session.client.clone();
        let mut newly: Vec<(u16, u128)> = Vec::new();
        for entry in session.entries.iter_mut().filter(|e| !e.linked && first <= e.event_ms) {
            entry.linked = true;
            newly.push((entry.day, entry.marketing));
        }
        for (day, m_key) in newly {
            if let Some(d) = self.days.get_mut(&(client.clone(), day)) {
                d.counters.linked_entries += 1;
                if let Some(m) = d.marketing.get_mut(&m_key) {
                    m.counters.linked_entries += 1;
                    m.dirty = true;
                }
            }
            self.touch_day(&client, day);
        }
    }
}
