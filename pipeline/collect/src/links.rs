//! Campaign-link metadata: an in-memory copy of `campaign_links`, read through to ClickHouse on
//! a miss.
//!
//! Links live in ClickHouse (`campaign_links`, loaded with `eventflow links import`). The
//! collector keeps a copy refreshed in the background every `collector.links_refresh`; a refresh
//! failure keeps the last good copy. A `cid` missing from the copy (a link imported since the
//! last refresh) is looked up in ClickHouse before it is called unknown, so a link works as soon
//! as the import returns, for `GET /r/{cid}` and for the `cid` of a fact alike. The lookups are
//! bounded, because the `cid` comes from the request and may be random:
//!
//! - a `cid` ClickHouse did not know is remembered as unknown for `links_negative_ttl` (at most
//!   `links_negative_entries` of them; the oldest is forgotten first, in O(1));
//! - requests missing the same `cid` at the same time share one query;
//! - at most `links_lookup_concurrency` queries run at once and `links_lookup_rate` start per
//!   second; a miss beyond that is answered without a query ([`Resolved::Unavailable`]);
//! - a query taking longer than `links_lookup_timeout` is given up.
//!
//! Nothing here ever drops a fact: an unknown `cid`, one of another client, or one that could not
//! be looked up aggregates under `unresolved`. Every miss is counted in
//! `eventflow_collector_link_lookups_total{outcome}`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use eventflow_core::fact::Utm;
use eventflow_store::rows::CampaignLinkRow;
use eventflow_store::{Store, StoreError};

use crate::ratelimit::{Limit, RateLimiter};

/// A tracked campaign link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub client_id: String,
    pub destination: String,
    pub utm: Utm,
}

impl From<CampaignLinkRow> for Link {
    /// Link metadata reaches facts (through `ef_utm`), so its UTM values pass the same
    /// validation as a fact's: an invalid one is left out.
    fn from(r: CampaignLinkRow) -> Self {
        let o = |s: String| {
            (!s.is_empty() && crate::intake::check_text(&s, crate::intake::MAX_UTM_CHARS).is_ok()).then_some(s)
        };
        Link {
            client_id: r.client_id,
            destination: r.destination,
            utm: Utm {
                source: o(r.utm_source),
                medium: o(r.utm_medium),
                campaign: o(r.utm_campaign),
                term: o(r.utm_term),
                content: o(r.utm_content),
            },
        }
    }
}

/// What a `cid` resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Link(Link),
    /// No such link (ClickHouse said so, now or within `links_negative_ttl`).
    Unknown,
    /// Not in the copy, and not looked up: over the lookup limits, ClickHouse failed or was too
    /// slow. Treated as unknown for this request, but not remembered as such.
    Unavailable,
}

impl Resolved {
    /// Whether this is a link of `client_id`.
    pub fn belongs_to(&self, client_id: &str) -> bool {
        matches!(self, Resolved::Link(l) if l.client_id == client_id)
    }
}

/// Values of the `outcome` label of `eventflow_collector_link_lookups_total`.
pub const LOOKUP_OUTCOMES: [&str; 6] = ["found", "not_found", "error", "negative", "shared", "limited"];

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where links come from: ClickHouse, or a map in tests.
pub trait LinkSource: Send + Sync + 'static {
    /// Every link (latest version of each).
    fn all(&self) -> BoxFuture<'_, Result<Vec<CampaignLinkRow>, StoreError>>;
    /// One link, if it exists.
    fn one<'a>(&'a self, cid: &'a str) -> BoxFuture<'a, Result<Option<CampaignLinkRow>, StoreError>>;
}

impl LinkSource for Store {
    fn all(&self) -> BoxFuture<'_, Result<Vec<CampaignLinkRow>, StoreError>> {
        Box::pin(self.campaign_links())
    }

    fn one<'a>(&'a self, cid: &'a str) -> BoxFuture<'a, Result<Option<CampaignLinkRow>, StoreError>> {
        Box::pin(self.campaign_link(cid))
    }
}

/// Bounds of the read-through (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct LookupLimits {
    pub timeout: Duration,
    pub concurrency: usize,
    pub rate: Limit,
    pub negative_ttl: Duration,
    pub negative_entries: usize,
}

/// Link metrics the cache updates.
#[derive(Debug, Clone)]
pub struct LinkMetrics {
    /// `eventflow_collector_link_lookups_total{outcome}`.
    pub lookups: IntCounterVec,
    /// `eventflow_collector_links_cached`.
    pub cached: IntGauge,
}

/// The link cache shared by request handlers; cheap to clone.
#[derive(Clone)]
pub struct Links {
    inner: Arc<Inner>,
}

struct Inner {
    copy: RwLock<HashMap<String, Link>>,
    read_through: Option<ReadThrough>,
    metrics: Option<LinkMetrics>,
}

struct ReadThrough {
    source: Arc<dyn LinkSource>,
    limits: LookupLimits,
    /// Negative cache and lookups in flight, under one lock so that a request never misses both
    /// a finished lookup's result and the lookup itself (and so queries a `cid` twice).
    state: Mutex<LookupState>,
    permits: Arc<Semaphore>,
    rate: RateLimiter<()>,
}

#[derive(Default)]
struct LookupState {
    negative: NegativeCache,
    in_flight: HashMap<String, watch::Receiver<Option<Resolved>>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("links", &self.len())
            .field("read_through", &self.inner.read_through.as_ref().map(|r| r.limits))
            .finish()
    }
}

impl Default for Links {
    /// A cache without read-through (links only from [`Links::replace`]).
    fn default() -> Self {
        Links::new(None, None)
    }
}

/// A lookup started by [`Links::begin`], to be awaited with [`Links::finish`].
#[derive(Debug)]
pub enum Pending {
    Ready(Resolved),
    Waiting(watch::Receiver<Option<Resolved>>),
}

impl Links {
    /// A cache reading through to `source` within `limits` (no read-through without a source or
    /// with `limits.concurrency == 0`).
    pub fn new(source: Option<(Arc<dyn LinkSource>, LookupLimits)>, metrics: Option<LinkMetrics>) -> Self {
        let read_through = source.filter(|(_, l)| l.concurrency > 0).map(|(source, limits)| ReadThrough {
            source,
            limits,
            state: Mutex::new(LookupState {
                negative: NegativeCache::new(limits.negative_entries, limits.negative_ttl),
                in_flight: HashMap::new(),
            }),
            permits: Arc::new(Semaphore::new(limits.concurrency)),
            rate: RateLimiter::new(limits.rate, 1),
        });
        Links { inner: Arc::new(Inner { copy: RwLock::new(HashMap::new()), read_through, metrics }) }
    }

    /// The link `cid` names, from the copy only (no lookup).
    pub fn cached(&self, cid: &str) -> Option<Link> {
        self.inner.copy.read().ok()?.get(cid).cloned()
    }

    /// What `cid` names: the copy, else a (bounded) lookup in ClickHouse.
    pub async fn resolve(&self, cid: &str) -> Resolved {
        let pending = self.begin(cid);
        self.finish(pending).await
    }

    /// Resolves several `cid`s, their lookups running concurrently.
    pub async fn resolve_all<'a>(&self, cids: impl IntoIterator<Item = &'a str>) -> HashMap<String, Resolved> {
        let started: Vec<(String, Pending)> = cids.into_iter().map(|c| (c.to_owned(), self.begin(c))).collect();
        let mut out = HashMap::with_capacity(started.len());
        for (cid, pending) in started {
            let resolved = self.finish(pending).await;
            out.insert(cid, resolved);
        }
        out
    }

    /// Starts resolving `cid`: answers at once from the copy or the negative cache, joins a
    /// lookup of the same `cid` in flight, or starts one (within the limits).
    pub fn begin(&self, cid: &str) -> Pending {
        if let Some(link) = self.cached(cid) {
            return Pending::Ready(Resolved::Link(link));
        }
        let Some(rt) = &self.inner.read_through else {
            return Pending::Ready(Resolved::Unknown);
        };
        let Ok(mut state) = rt.state.lock() else {
            return Pending::Ready(Resolved::Unavailable);
        };
        // A lookup that finished since the first check has updated the copy or the negative
        // cache before leaving `in_flight`; both are read under the state lock.
        if let Some(link) = self.cached(cid) {
            return Pending::Ready(Resolved::Link(link));
        }
        let now = Instant::now();
        if state.negative.contains(cid, now) {
            self.count("negative");
            return Pending::Ready(Resolved::Unknown);
        }
        if let Some(rx) = state.in_flight.get(cid) {
            self.count("shared");
            return Pending::Waiting(rx.clone());
        }
        let permit = match rt.permits.clone().try_acquire_owned() {
            Ok(p) if rt.rate.check(&()) => p,
            _ => {
                self.count("limited");
                return Pending::Ready(Resolved::Unavailable);
            }
        };
        let (tx, rx) = watch::channel(None);
        state.in_flight.insert(cid.to_owned(), rx.clone());
        drop(state);
        // A task of its own: a client that goes away does not cancel the lookup others share.
        let links = self.clone();
        let cid = cid.to_owned();
        tokio::spawn(async move {
            let _permit = permit;
            links.look_up(cid, tx).await;
        });
        Pending::Waiting(rx)
    }

    /// Waits for a started lookup (at most the lookup timeout, plus a margin).
    pub async fn finish(&self, pending: Pending) -> Resolved {
        let mut rx = match pending {
            Pending::Ready(r) => return r,
            Pending::Waiting(rx) => rx,
        };
        let limit = self.inner.read_through.as_ref().map_or(Duration::ZERO, |rt| rt.limits.timeout);
        let waited = tokio::time::timeout(limit + Duration::from_millis(100), rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(r)) => r.clone().unwrap_or(Resolved::Unavailable),
            _ => Resolved::Unavailable,
        }
    }

    async fn look_up(&self, cid: String, tx: watch::Sender<Option<Resolved>>) {
        let Some(rt) = &self.inner.read_through else {
            return;
        };
        let result = tokio::time::timeout(rt.limits.timeout, rt.source.one(&cid)).await;
        let resolved = match result {
            Ok(Ok(Some(row))) => {
                self.count("found");
                Resolved::Link(Link::from(row))
            }
            Ok(Ok(None)) => {
                self.count("not_found");
                Resolved::Unknown
            }
            Ok(Err(e)) => {
                self.count("error");
                warn!(error = %e, cid = %cid, "looking up a campaign link failed");
                Resolved::Unavailable
            }
            Err(_) => {
                self.count("error");
                warn!(cid = %cid, timeout = ?rt.limits.timeout, "looking up a campaign link timed out");
                Resolved::Unavailable
            }
        };
        if let Ok(mut state) = rt.state.lock() {
            match &resolved {
                Resolved::Link(link) => {
                    if let Ok(mut copy) = self.inner.copy.write() {
                        copy.insert(cid.clone(), link.clone());
                        self.set_cached(copy.len());
                    }
                }
                Resolved::Unknown => state.negative.insert(cid.clone(), Instant::now()),
                Resolved::Unavailable => {}
            }
            state.in_flight.remove(&cid);
        }
        let _ = tx.send(Some(resolved));
    }

    fn count(&self, outcome: &str) {
        if let Some(m) = &self.inner.metrics {
            m.lookups.with_label_values(&[outcome]).inc();
        }
    }

    fn set_cached(&self, n: usize) {
        if let Some(m) = &self.inner.metrics {
            m.cached.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Replaces the copy (a refresh).
    pub fn replace(&self, links: HashMap<String, Link>) {
        if let Ok(mut m) = self.inner.copy.write() {
            *m = links;
            self.set_cached(m.len());
        }
    }

    pub fn len(&self) -> usize {
        self.inner.copy.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refreshes the copy from `source` every `every` until `shutdown`.
    pub async fn refresh_loop(self, source: Arc<dyn LinkSource>, every: Duration, shutdown: CancellationToken) {
        loop {
            match source.all().await {
                Ok(rows) => {
                    let map: HashMap<String, Link> = rows.into_iter().map(|r| (r.cid.clone(), Link::from(r))).collect();
                    debug!(links = map.len(), "campaign links refreshed");
                    self.replace(map);
                }
                Err(e) => {
                    warn!(error = %e, "refreshing campaign links failed; keeping the cached copy")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// Negative cache

/// `cid`s known not to exist, each for `ttl`, at most `capacity` of them.
///
/// Every entry expires `ttl` after its insertion, so insertion order is expiry order: a queue
/// gives O(1) eviction of the oldest entry (when full) and of expired ones (from the front). A
/// re-inserted `cid` leaves a stale queue element behind, recognised by its expiry time.
#[derive(Debug, Default)]
struct NegativeCache {
    capacity: usize,
    ttl: Duration,
    expiry: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl NegativeCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Self { capacity, ttl, expiry: HashMap::new(), order: VecDeque::new() }
    }

    fn contains(&self, cid: &str, now: Instant) -> bool {
        self.expiry.get(cid).is_some_and(|until| *until > now)
    }

    fn insert(&mut self, cid: String, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        while self.order.front().is_some_and(|(_, until)| *until <= now) || self.order.len() >= self.capacity {
            self.pop_front();
        }
        let until = now + self.ttl;
        self.expiry.insert(cid.clone(), until);
        self.order.push_back((cid, until));
    }

    fn pop_front(&mut self) {
        if let Some((cid, until)) = self.order.pop_front() {
            if self.expiry.get(&cid) == Some(&until) {
                self.expiry.remove(&cid);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.expiry.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use prometheus::Opts;
    use tokio::sync::Notify;

    use super::*;

    /// Links in a map; queries are counted and, when `gate` is set, wait for it.
    struct MapSource {
        rows: HashMap<String, CampaignLinkRow>,
        queries: AtomicUsize,
        gate: Option<Arc<Notify>>,
        fail: bool,
    }

    impl MapSource {
        fn new(cids: &[(&str, &str)]) -> Self {
            let rows = cids
                .iter()
                .map(|(cid, client)| {
                    let row = CampaignLinkRow {
                        cid: (*cid).into(),
                        client_id: (*client).into(),
                        destination: format!("https://site.test/{cid}"),
                        utm_source: "news".into(),
                        utm_medium: String::new(),
                        utm_campaign: String::new(),
                        utm_term: String::new(),
                        utm_content: String::new(),
                        updated_at: 1,
                    };
                    ((*cid).to_owned(), row)
                })
                .collect();
            Self { rows, queries: AtomicUsize::new(0), gate: None, fail: false }
        }
    }

    impl LinkSource for MapSource {
        fn all(&self) -> BoxFuture<'_, Result<Vec<CampaignLinkRow>, StoreError>> {
            Box::pin(async { Ok(self.rows.values().cloned().collect()) })
        }

        fn one<'a>(&'a self, cid: &'a str) -> BoxFuture<'a, Result<Option<CampaignLinkRow>, StoreError>> {
            Box::pin(async move {
                self.queries.fetch_add(1, Ordering::SeqCst);
                if let Some(g) = &self.gate {
                    g.notified().await;
                }
                if self.fail {
                    return Err(StoreError::Invalid("down".into()));
                }
                Ok(self.rows.get(cid).cloned())
            })
        }
    }

    fn limits() -> LookupLimits {
        LookupLimits {
            timeout: Duration::from_secs(1),
            concurrency: 4,
            rate: Limit { per_second: 0.0, burst: 0.0 },
            negative_ttl: Duration::from_secs(5),
            negative_entries: 100,
        }
    }

    fn metrics() -> LinkMetrics {
        LinkMetrics {
            lookups: IntCounterVec::new(Opts::new("lookups", "test"), &["outcome"]).unwrap(),
            cached: IntGauge::new("cached", "test").unwrap(),
        }
    }

    fn links(source: &Arc<MapSource>, limits: LookupLimits) -> (Links, LinkMetrics) {
        let m = metrics();
        let dyn_source: Arc<dyn LinkSource> = source.clone();
        (Links::new(Some((dyn_source, limits)), Some(m.clone())), m)
    }

    fn outcome(m: &LinkMetrics, o: &str) -> u64 {
        m.lookups.with_label_values(&[o]).get()
    }

    #[tokio::test(start_paused = true)]
    async fn misses_read_through_and_are_remembered() {
        let source = Arc::new(MapSource::new(&[("spring", "acme")]));
        let (links, m) = links(&source, limits());
        assert!(links.resolve("spring").await.belongs_to("acme"));
        assert!(!links.resolve("spring").await.belongs_to("globex"));
        assert_eq!(links.cached("spring").map(|l| l.destination), Some("https://site.test/spring".into()));
        assert_eq!(source.queries.load(Ordering::SeqCst), 1, "found once, then from the copy");
        assert_eq!(m.cached.get(), 1);

        for _ in 0..10 {
            assert_eq!(links.resolve("nope").await, Resolved::Unknown);
        }
        assert_eq!(source.queries.load(Ordering::SeqCst), 2, "one query for ten misses");
        assert_eq!((outcome(&m, "found"), outcome(&m, "not_found"), outcome(&m, "negative")), (1, 1, 9));
        // After the negative TTL it is asked again (it may have been imported since).
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(links.resolve("nope").await, Resolved::Unknown);
        assert_eq!(source.queries.load(Ordering::SeqCst), 3);
        // A refresh replaces the copy; read-through results come back on the next miss.
        links.replace(HashMap::new());
        assert!(links.resolve("spring").await.belongs_to("acme"));
        assert_eq!(source.queries.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_lookup_and_limits_hold() {
        let gate = Arc::new(Notify::new());
        let mut s = MapSource::new(&[("spring", "acme")]);
        s.gate = Some(gate.clone());
        let source = Arc::new(s);
        let (links, m) = links(&source, LookupLimits { concurrency: 2, ..limits() });
        // Ten requests for one cid: one lookup, nine wait for it.
        let first: Vec<Pending> = (0..10).map(|_| links.begin("spring")).collect();
        // Two more cids fill the concurrency; the next is refused without a query.
        let a = links.begin("a");
        assert!(matches!(links.begin("b"), Pending::Ready(Resolved::Unavailable)));
        while source.queries.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gate.notify_waiters();
        for p in first {
            assert!(links.finish(p).await.belongs_to("acme"));
        }
        assert_eq!(links.finish(a).await, Resolved::Unknown);
        assert_eq!(source.queries.load(Ordering::SeqCst), 2);
        assert_eq!((outcome(&m, "shared"), outcome(&m, "limited")), (9, 1));
        // The permits are back.
        let source2 = Arc::new(MapSource::new(&[]));
        let (links2, _) = links_with_rate(&source2);
        let started: Vec<Pending> = (0..5).map(|i| links2.begin(&format!("r{i}"))).collect();
        let refused = started.iter().filter(|p| matches!(p, Pending::Ready(Resolved::Unavailable))).count();
        assert_eq!(refused, 2, "burst of 3 lookups");
        for p in started {
            links2.finish(p).await;
        }
        assert_eq!(source2.queries.load(Ordering::SeqCst), 3);
    }

    fn links_with_rate(source: &Arc<MapSource>) -> (Links, LinkMetrics) {
        links(source, LookupLimits { rate: Limit { per_second: 0.001, burst: 3.0 }, ..limits() })
    }

    #[tokio::test]
    async fn failures_are_unavailable_and_not_remembered() {
        let mut s = MapSource::new(&[]);
        s.fail = true;
        let source = Arc::new(s);
        let (links, m) = links(&source, limits());
        assert_eq!(links.resolve("x").await, Resolved::Unavailable);
        assert_eq!(links.resolve("x").await, Resolved::Unavailable);
        assert_eq!((source.queries.load(Ordering::SeqCst), outcome(&m, "error")), (2, 2));
        // Without a source (or with lookups off) a miss is simply unknown.
        assert_eq!(Links::default().resolve("x").await, Resolved::Unknown);
        let dyn_source: Arc<dyn LinkSource> = source.clone();
        let off = Links::new(Some((dyn_source, LookupLimits { concurrency: 0, ..limits() })), None);
        assert_eq!(off.resolve("x").await, Resolved::Unknown);
        assert_eq!(source.queries.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_lookups_are_given_up() {
        let mut s = MapSource::new(&[("spring", "acme")]);
        s.gate = Some(Arc::new(Notify::new())); // never opened
        let source = Arc::new(s);
        let (links, m) = links(&source, limits());
        assert_eq!(links.resolve("spring").await, Resolved::Unavailable);
        assert_eq!(outcome(&m, "error"), 1);
    }

    #[test]
    fn link_metadata_passes_the_fact_validation() {
        let row = CampaignLinkRow {
            cid: "c".into(),
            client_id: "acme".into(),
            destination: "https://site.test/".into(),
            utm_source: "news".into(),
            utm_medium: "m".repeat(300),
            utm_campaign: "sale\u{202E}".into(),
            utm_term: "a\u{7}b".into(),
            utm_content: String::new(),
            updated_at: 1,
        };
        assert_eq!(Link::from(row).utm, Utm { source: Some("news".into()), ..Utm::default() });
    }

    #[test]
    fn negative_cache_is_bounded_and_expires() {
        let t0 = Instant::now();
        let mut n = NegativeCache::new(3, Duration::from_secs(5));
        for (i, cid) in ["a", "b", "c", "d"].iter().enumerate() {
            n.insert((*cid).into(), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(n.len(), 3);
        assert!(!n.contains("a", t0), "the oldest was evicted");
        assert!(n.contains("d", t0 + Duration::from_secs(1)));
        assert!(!n.contains("d", t0 + Duration::from_secs(6)), "expired");
        // Re-inserting keeps one entry per cid; stale queue elements do not evict newer ones.
        n.insert("b".into(), t0 + Duration::from_secs(2));
        n.insert("e".into(), t0 + Duration::from_secs(2));
        assert!(n.contains("b", t0 + Duration::from_secs(6)), "b was renewed at 2 s");
        assert!(n.len() <= 3 && n.order.len() <= 3);
        // Expired entries leave from the front as new ones arrive.
        n.insert("f".into(), t0 + Duration::from_secs(60));
        assert_eq!((n.len(), n.order.len()), (1, 1));
        let mut off = NegativeCache::new(0, Duration::from_secs(5));
        off.insert("a".into(), t0);
        assert!(!off.contains("a", t0));
    }
}
