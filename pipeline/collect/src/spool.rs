//! The collector's durable spool: an append-only, fsynced log of accepted facts.
//!
//! Every accepted fact is appended here before the request is answered `202`, so an
//! acknowledged fact survives a broker outage and a `kill -9` of the collector. A drainer
//! ([`crate::drain`]) sends the log to Kafka in order and advances a persisted cursor.
//!
//! Layout of the spool directory:
//! - `spool.id`: random 64-bit id of this spool, part of every fact's identity;
//! - `cursor`: sequence of the first fact not yet acknowledged by Kafka;
//! - `<first seq, 20 digits>.seg`: segments of records
//!   `[len u32][crc32 u32][kind u8][seq u64][received_ms i64][key_len u16][key][value]`.
//!
//! The spool holds at most `max_bytes` awaiting Kafka, and one client at most `client_share` of
//! that: an append that would take the spool or its client beyond is refused whole
//! ([`SpoolError::Full`], [`SpoolError::ClientShare`]; the collector answers 503), so a flood of
//! one tenant's facts leaves room for the others and the disk never fills past the cap.
//!
//! Appends from concurrent requests are group-committed: one writer thread writes everything
//! queued and calls `fdatasync` once, then answers all of them. A torn record at the end of the
//! last segment (a crash mid-write, never acknowledged) is truncated on open.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tracing::{error, info, warn};

use eventflow_core::avro::FactCodec;
use eventflow_core::{Fact, FactKind};

const HEADER_LEN: usize = 8;
/// Room for the largest request: 4 spool bytes per byte sent, a 64 KiB body and a 32 KiB head
/// ([`crate::collect::SPOOL_BYTES_PER_BYTE_SENT`]), rounded up.
const FULL_HEADROOM: u64 = 512 << 10;
/// Bytes of a record besides its key and value: length, CRC, kind, sequence, receive time and
/// key length.
pub const RECORD_OVERHEAD: usize = HEADER_LEN + 1 + 8 + 8 + 2;
/// Largest record accepted when reading (a fact is at most a few KiB; this catches garbage).
const MAX_RECORD: u32 = 1 << 20;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({pending} of {max} bytes awaiting delivery)")]
    Full { pending: u64, max: u64 },
    #[error("client {client} holds {pending} bytes of the spool, its share is {max}")]
    ClientShare { client: String, pending: u64, max: u64 },
    #[error("spool I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool writer stopped")]
    Stopped,
    #[error("encoding fact: {0}")]
    Encode(String),
}

/// One spooled fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: FactKind,
    pub received_ms: i64,
    pub key: String,
    pub value: Vec<u8>,
}

impl Record {
    fn encoded_len(&self) -> usize {
        RECORD_OVERHEAD + self.key.len() + self.value.len()
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::with_capacity(self.encoded_len() - HEADER_LEN);
        payload.push(kind_code(self.kind));
        payload.extend_from_slice(&self.seq.to_le_bytes());
        payload.extend_from_slice(&self.received_ms.to_le_bytes());
        let key = self.key.as_bytes();
        payload.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_le_bytes());
        payload.extend_from_slice(&key[..key.len().min(usize::from(u16::MAX))]);
        payload.extend_from_slice(&self.value);
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
    }

    fn parse(payload: &[u8]) -> Option<Record> {
        if payload.len() < 19 {
            return None;
        }
        let kind = kind_from_code(payload[0])?;
        let seq = u64::from_le_bytes(payload[1..9].try_into().ok()?);
        let received_ms = i64::from_le_bytes(payload[9..17].try_into().ok()?);
        let key_len = usize::from(u16::from_le_bytes(payload[17..19].try_into().ok()?));
        let key = std::str::from_utf8(payload.get(19..19 + key_len)?).ok()?.to_owned();
        let value = payload.get(19 + key_len..)?.to_vec();
        Some(Record { seq, kind, received_ms, key, value })
    }
}

/// The client of a record: its key is `<client_id>/<session_id>`.
pub fn client_of_key(key: &str) -> &str {
    key.split_once('/').map_or(key, |(client, _)| client)
}

fn kind_code(kind: FactKind) -> u8 {
    match kind {
        FactKind::Visit => 1,
        FactKind::Entry => 2,
        FactKind::Ping => 3,
    }
}

fn kind_from_code(code: u8) -> Option<FactKind> {
    match code {
        1 => Some(FactKind::Visit),
        2 => Some(FactKind::Entry),
        3 => Some(FactKind::Ping),
        _ => None,
    }
}

/// Reads the next record from `r`. `Ok(None)` at a clean end or a torn tail (the byte offset
/// of the record start is then the valid length).
fn read_record(r: &mut impl Read) -> std::io::Result<Option<(Record, usize)>> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(r, &mut header)? {
        0 => return Ok(None),
        n if n < HEADER_LEN => return Ok(None),
        _ => {}
    }
    let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
    if len == 0 || len > MAX_RECORD {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    if read_full(r, &mut payload)? < payload.len() || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(Record::parse(&payload).map(|rec| (rec, HEADER_LEN + len as usize)))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Settings of a spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    /// Bytes awaiting delivery above which appends are refused (the collector answers 503).
    pub max_bytes: u64,
    /// Share of `max_bytes` one client may hold (0 < share <= 1).
    pub client_share: f64,
    /// Size at which a new segment file is started.
    pub segment_bytes: u64,
    /// Observes each group commit (write and `fdatasync`), if set.
    pub fsync_seconds: Option<prometheus::Histogram>,
}

#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

/// State shared by the writer, the drainer and the HTTP handlers.
#[derive(Debug)]
pub struct Shared {
    pub spool_id: u64,
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes one client may hold.
    client_max_bytes: u64,
    /// Bytes of records at or after the cursor, per client (clients with none are absent).
    client_bytes: Mutex<HashMap<String, u64>>,
    /// Highest sequence durably written (0: none).
    durable_seq: AtomicU64,
    /// First sequence not yet acknowledged by Kafka.
    cursor: AtomicU64,
    /// Bytes of records at or after the cursor.
    pending_bytes: AtomicU64,
    segments: Mutex<Vec<Segment>>,
    /// Woken after every durable append.
    pub appended: Notify,
    writer_alive: AtomicBool,
}

impl Shared {
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    /// Facts accepted but not yet in Kafka.
    pub fn pending_facts(&self) -> u64 {
        (self.durable_seq() + 1).saturating_sub(self.cursor())
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Acquire)
    }

    /// Whether the largest request may no longer fit (readiness turns 503, so a load balancer
    /// sends traffic to other collectors): appends are refused before the cap is passed, so the
    /// spool reaches "full" this much before the cap (half the cap for a tiny spool).
    pub fn is_full(&self) -> bool {
        self.pending_bytes() + FULL_HEADROOM.min(self.max_bytes / 2) >= self.max_bytes
    }

    pub fn writer_alive(&self) -> bool {
        self.writer_alive.load(Ordering::Acquire)
    }

    /// Bytes `client` has awaiting delivery.
    pub fn client_pending_bytes(&self, client: &str) -> u64 {
        self.client_bytes.lock().map(|m| m.get(client).copied().unwrap_or(0)).unwrap_or(0)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Records that every fact before `cursor` is in Kafka: persists the cursor (atomic rename)
    /// and deletes fully delivered segments. `delivered` is the bytes delivered per client
    /// (their sum is `delivered_bytes`).
    pub fn commit_cursor(
        &self,
        cursor: u64,
        delivered_bytes: u64,
        delivered: &HashMap<String, u64>,
    ) -> std::io::Result<()> {
        let tmp = self.dir.join("cursor.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(cursor.to_string().as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join("cursor"))?;
        fsync_dir(&self.dir)?;
        self.cursor.store(cursor, Ordering::Release);
        self.pending_bytes.fetch_sub(delivered_bytes.min(self.pending_bytes()), Ordering::AcqRel);
        if let Ok(mut clients) = self.client_bytes.lock() {
            for (client, bytes) in delivered {
                if let Some(held) = clients.get_mut(client) {
                    *held = held.saturating_sub(*bytes);
                    if *held == 0 {
                        clients.remove(client);
                    }
                }
            }
        }
        let mut segments = self.segments.lock().map_err(|_| std::io::Error::other("segments lock poisoned"))?;
        // A segment is done when the next one starts at or before the cursor.
        while segments.len() > 1 && segments[1].first_seq <= cursor {
            let done = segments.remove(0);
            if let Err(e) = fs::remove_file(&done.path) {
                warn!(path = %done.path.display(), error = %e, "removing delivered spool segment");
            }
        }
        Ok(())
    }

    /// A reader positioned at the first record with sequence `>= from`.
    pub fn reader(self: &Arc<Self>, from: u64) -> SpoolReader {
        SpoolReader { shared: self.clone(), next_seq: from, file: None, segment_first: 0 }
    }
}

/// Sequential reader of durable records (used by the drainer).
#[derive(Debug)]
pub struct SpoolReader {
    shared: Arc<Shared>,
    next_seq: u64,
    file: Option<BufReader<File>>,
    segment_first: u64,
}

impl SpoolReader {
    /// The next durable record, or `None` when the reader has caught up with the writer.
    pub fn read_next(&mut self) -> std::io::Result<Option<Record>> {
        loop {
            if self.next_seq > self.shared.durable_seq() {
                return Ok(None);
            }
            if self.file.is_none() {
                let segment = {
                    let segments = self.shared.segments.lock().map_err(|_| std::io::Error::other("lock poisoned"))?;
                    segments.iter().rev().find(|s| s.first_seq <= self.next_seq).cloned()
                };
                let Some(segment) = segment else {
                    return Ok(None);
                };
                self.file = Some(BufReader::new(File::open(&segment.path)?));
                self.segment_first = segment.first_seq;
            }
            let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("no segment"))?;
            let pos = file.stream_position()?;
            match read_record(file)? {
                Some((rec, _)) if rec.seq < self.next_seq => continue,
                Some((rec, _)) => {
                    self.next_seq = rec.seq + 1;
                    return Ok(Some(rec));
                }
                None => {
                    // End of this segment's written data: move to the next segment if the
                    // wanted record lives there, else wait for the writer.
                    file.seek(SeekFrom::Start(pos))?;
                    let next_segment = {
                        let segments =
                            self.shared.segments.lock().map_err(|_| std::io::Error::other("lock poisoned"))?;
                        segments
                            .iter()
                            .find(|s| s.first_seq > self.segment_first && s.first_seq <= self.next_seq)
                            .is_some()
                    };
                    if next_segment {
                        self.file = None;
                        continue;
                    }
                    return Ok(None);
                }
            }
        }
    }
}

/// Where the writer thread answers an append: the sequence numbers given to its records.
type Reply = oneshot::Sender<Result<Vec<u64>, SpoolError>>;

struct Append {
    facts: Vec<Fact>,
    received_ms: i64,
    reply: Reply,
}

/// Handle used by request handlers to append facts.
#[derive(Debug, Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Append>,
}

impl Spool {
    /// Opens (or creates) the spool in `options.dir`, recovering from a crash, and starts the
    /// writer thread.
    pub fn open(options: SpoolOptions, codec: FactCodec) -> Result<Self, SpoolError> {
        fs::create_dir_all(&options.dir)?;
        let dir = options.dir.clone();
        let spool_id = read_or_create_id(&dir)?;
        let cursor =
            fs::read_to_string(dir.join("cursor")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(1).max(1);

        let mut first_seqs: Vec<u64> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse().ok()))
            .collect();
        first_seqs.sort_unstable();
        let mut segments = Vec::new();
        let mut last_seq = 0u64;
        let mut pending_bytes = 0u64;
        let mut client_bytes: HashMap<String, u64> = HashMap::new();
        let count = first_seqs.len();
        for (i, first) in first_seqs.into_iter().enumerate() {
            let path = segment_path(&dir, first);
            let mut reader = BufReader::new(File::open(&path)?);
            let mut valid = 0u64;
            while let Some((rec, len)) = read_record(&mut reader)? {
                valid += len as u64;
                last_seq = last_seq.max(rec.seq);
                if rec.seq >= cursor {
                    pending_bytes += len as u64;
                    *client_bytes.entry(client_of_key(&rec.key).to_owned()).or_default() += len as u64;
                }
            }
            let size = fs::metadata(&path)?.len();
            if valid < size {
                if i + 1 == count {
                    // Torn tail of the last write: it was never acknowledged.
                    warn!(path = %path.display(), valid, size, "truncating torn spool tail");
                    OpenOptions::new().write(true).open(&path)?.set_len(valid)?;
                } else {
                    error!(path = %path.display(), valid, size, "corrupt spool segment; records after the damage are unreadable");
                }
            }
            segments.push(Segment { first_seq: first, path });
        }
        let next_seq = (last_seq + 1).max(cursor);
        let durable = next_seq - 1;
        info!(dir = %dir.display(), spool_id = format!("{spool_id:016x}"), cursor, pending = durable + 1 - cursor.min(durable + 1), "spool opened");

        let shared = Arc::new(Shared {
            spool_id,
            dir: dir.clone(),
            max_bytes: options.max_bytes,
            client_max_bytes: (options.max_bytes as f64 * options.client_share.clamp(0.0, 1.0)) as u64,
            client_bytes: Mutex::new(client_bytes),
            durable_seq: AtomicU64::new(durable),
            cursor: AtomicU64::new(cursor),
            pending_bytes: AtomicU64::new(pending_bytes),
            segments: Mutex::new(segments),
            appended: Notify::new(),
            writer_alive: AtomicBool::new(true),
        });
        let (tx, rx) = mpsc::channel::<Append>();
        let writer = Writer {
            shared: shared.clone(),
            codec,
            next_seq,
            segment_bytes: options.segment_bytes,
            fsync_seconds: options.fsync_seconds.clone(),
            file: None,
            file_len: 0,
        };
        std::thread::Builder::new().name("spool-writer".into()).spawn(move || writer.run(rx))?;
        Ok(Spool { shared, tx })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Appends `facts` (their spool id and sequence are assigned here) and returns once they
    /// are fsynced. Returns the assigned sequences, in order.
    pub async fn append(&self, facts: Vec<Fact>, received_ms: i64) -> Result<Vec<u64>, SpoolError> {
        if facts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Append { facts, received_ms, reply }).map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }
}

fn read_or_create_id(dir: &Path) -> Result<u64, SpoolError> {
    let path = dir.join("spool.id");
    if let Ok(text) = fs::read_to_string(&path) {
        if let Ok(id) = u64::from_str_radix(text.trim(), 16) {
            return Ok(id);
        }
    }
    let id: u64 = rand::random();
    let tmp = dir.join("spool.id.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(format!("{id:016x}\n").as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fsync_dir(dir)?;
    Ok(id)
}

struct Writer {
    shared: Arc<Shared>,
    codec: FactCodec,
    next_seq: u64,
    segment_bytes: u64,
    fsync_seconds: Option<prometheus::Histogram>,
    file: Option<File>,
    file_len: u64,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Append>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            // Group commit: everything queued right now shares one fsync.
            let deadline = Instant::now() + Duration::from_millis(2);
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) if Instant::now() < deadline && batch.len() < 4 => std::thread::yield_now(),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        self.shared.writer_alive.store(false, Ordering::Release);
    }

    fn commit(&mut self, batch: Vec<Append>) {
        let mut buf = Vec::new();
        let mut accepted: Vec<(Reply, Vec<u64>)> = Vec::new();
        let mut added_bytes = 0u64;
        // Bytes this batch adds per client (applied once the batch is durable).
        let mut added: HashMap<String, u64> = HashMap::new();
        let first_seq = self.next_seq;
        for req in batch {
            let mut seqs = Vec::with_capacity(req.facts.len());
            let start = buf.len();
            let mut failed = None;
            let mut by_client: HashMap<String, u64> = HashMap::new();
            for mut fact in req.facts {
                let seq = self.next_seq + seqs.len() as u64;
                {
                    let h = fact.header_mut();
                    h.spool_id = self.shared.spool_id;
                    h.spool_seq = seq;
                }
                match self.codec.encode(&fact) {
                    Ok(value) => {
                        let before = buf.len();
                        Record {
                            seq,
                            kind: fact.kind(),
                            received_ms: req.received_ms,
                            key: fact.partition_key(),
                            value,
                        }
                        .write_to(&mut buf);
                        *by_client.entry(fact.header().client_id.clone()).or_default() += (buf.len() - before) as u64;
                        seqs.push(seq);
                    }
                    Err(e) => {
                        failed = Some(SpoolError::Encode(e.to_string()));
                        break;
                    }
                }
            }
            // The whole request fits, in the spool and in each of its clients' shares, or none
            // of it is written.
            let size = (buf.len() - start) as u64;
            let pending = self.shared.pending_bytes() + added_bytes;
            if failed.is_none() && pending + size > self.shared.max_bytes {
                failed = Some(SpoolError::Full { pending, max: self.shared.max_bytes });
            }
            if failed.is_none() {
                for (client, bytes) in &by_client {
                    let held = self.shared.client_pending_bytes(client) + added.get(client).copied().unwrap_or(0);
                    if held + bytes > self.shared.client_max_bytes {
                        failed = Some(SpoolError::ClientShare {
                            client: client.clone(),
                            pending: held,
                            max: self.shared.client_max_bytes,
                        });
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                buf.truncate(start);
                let _ = req.reply.send(Err(e));
                continue;
            }
            for (client, bytes) in by_client {
                *added.entry(client).or_default() += bytes;
            }
            added_bytes += size;
            self.next_seq += seqs.len() as u64;
            accepted.push((req.reply, seqs));
        }
        if accepted.is_empty() {
            return;
        }
        let started = Instant::now();
        let written = self.write_durably(first_seq, &buf);
        if let Some(h) = &self.fsync_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        match written {
            Ok(()) => {
                self.shared.pending_bytes.fetch_add(added_bytes, Ordering::AcqRel);
                if let Ok(mut clients) = self.shared.client_bytes.lock() {
                    for (client, bytes) in added {
                        *clients.entry(client).or_default() += bytes;
                    }
                }
                self.shared.durable_seq.store(self.next_seq - 1, Ordering::Release);
                self.shared.appended.notify_waiters();
                self.shared.appended.notify_one();
                for (reply, seqs) in accepted {
                    let _ = reply.send(Ok(seqs));
                }
            }
            Err(e) => {
                error!(error = %e, "spool write failed; the facts were not acknowledged");
                // The sequences were not made durable: cut any partial write off the segment
                // (so later records stay readable) and reuse them.
                if let Some(f) = &self.file {
                    if let Err(e) = f.set_len(self.file_len) {
                        error!(error = %e, "truncating a failed spool write");
                    }
                }
                self.next_seq = first_seq;
                self.file = None;
                for (reply, _) in accepted {
                    let _ = reply.send(Err(SpoolError::Io(std::io::Error::other(e.to_string()))));
                }
            }
        }
    }

    fn write_durably(&mut self, first_seq: u64, buf: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() || self.file_len >= self.segment_bytes {
            if let Some(f) = self.file.take() {
                f.sync_data()?;
            }
            let path = segment_path(&self.shared.dir, first_seq);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            self.file_len = file.metadata()?.len();
            fsync_dir(&self.shared.dir)?;
            let mut segments = self.shared.segments.lock().map_err(|_| std::io::Error::other("lock poisoned"))?;
            if !segments.iter().any(|s| s.first_seq == first_seq) {
                segments.push(Segment { first_seq, path });
            }
            self.file = Some(file);
        }
        let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("no segment"))?;
        file.write_all(buf)?;
        file.sync_data()?;
        self.file_len += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventflow_core::fact::{FactHeader, Ping, SessionOrigin};

    fn ping(n: u64) -> Fact {
        Fact::Ping(Ping {
            header: FactHeader {
                spool_id: 0,
                spool_seq: 0,
                client_id: "acme".into(),
                received_at_ms: 1_000 + n as i64,
                event_time_ms: 1_000 + n as i64,
                client_ts: None,
                clock_skew: false,
            },
            webinar_id: "w".into(),
            session_id: format!("s{n}"),
            session_origin: SessionOrigin::Body,
        })
    }

    fn open(dir: &Path, max_bytes: u64) -> Spool {
        Spool::open(
            SpoolOptions {
                dir: dir.to_owned(),
                max_bytes,
                client_share: 1.0,
                segment_bytes: 4096,
                fsync_seconds: None,
            },
            FactCodec::new().unwrap(),
        )
        .unwrap()
    }

    fn drain_all(shared: &Arc<Shared>) -> Vec<Record> {
        let mut r = shared.reader(shared.cursor());
        let mut out = Vec::new();
        while let Some(rec) = r.read_next().unwrap() {
            out.push(rec);
        }
        out
    }

    #[tokio::test]
    async fn appends_survive_reopen_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 30);
        let id = spool.shared().spool_id;
        let mut all = Vec::new();
        for i in 0..50 {
            all.extend(spool.append(vec![ping(i), ping(i + 1000)], 7).await.unwrap());
        }
        assert_eq!(all, (1..=100).collect::<Vec<u64>>());
        drop(spool);
        let reopened = open(dir.path(), 1 << 30);
        assert_eq!(reopened.shared().spool_id, id, "the spool keeps its identity");
        let records = drain_all(reopened.shared());
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), all);
        let codec = FactCodec::new().unwrap();
        let decoded = codec.decode(FactKind::Ping, &records[3].value).unwrap();
        assert_eq!((decoded.header().spool_id, decoded.header().spool_seq), (id, 4));
        assert!(
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
                .count()
                > 1
        );
    }

    #[tokio::test]
    async fn cursor_commit_removes_delivered_segments_and_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 30);
        for i in 0..100 {
            spool.append(vec![ping(i)], 7).await.unwrap();
        }
        let segments_before = spool.shared().segments.lock().unwrap().len();
        let bytes = spool.shared().pending_bytes();
        spool.shared().commit_cursor(91, bytes / 2, &HashMap::from([("acme".to_owned(), bytes / 2)])).unwrap();
        assert_eq!(spool.shared().client_pending_bytes("acme"), bytes - bytes / 2);
        assert!(spool.shared().segments.lock().unwrap().len() < segments_before);
        assert_eq!(spool.shared().pending_facts(), 10);
        drop(spool);
        let reopened = open(dir.path(), 1 << 30);
        assert_eq!(
            drain_all(reopened.shared()).iter().map(|r| r.seq).collect::<Vec<_>>(),
            (91..=100).collect::<Vec<_>>()
        );
        // New appends continue the sequence.
        assert_eq!(reopened.append(vec![ping(1)], 7).await.unwrap(), vec![101]);
    }

    #[tokio::test]
    async fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 30);
        spool.append(vec![ping(1), ping(2)], 7).await.unwrap();
        drop(spool);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[42, 0, 0, 0, 1, 2]).unwrap(); // half a header: a crash mid-write
        drop(f);
        let reopened = open(dir.path(), 1 << 30);
        assert_eq!(drain_all(reopened.shared()).len(), 2);
        assert_eq!(reopened.append(vec![ping(3)], 7).await.unwrap(), vec![3]);
        assert_eq!(drain_all(reopened.shared()).len(), 3);
    }

    fn ping_of(client: &str, n: u64) -> Fact {
        let mut f = ping(n);
        f.header_mut().client_id = client.to_owned();
        f
    }

    #[tokio::test]
    async fn full_spool_refuses_appends_before_passing_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let max = 250;
        let spool = open(dir.path(), max);
        spool.append(vec![ping(1)], 7).await.unwrap();
        let one = spool.shared().pending_bytes();
        let mut n = 1;
        while spool.append(vec![ping(n + 1)], 7).await.is_ok() {
            n += 1;
        }
        // Refused exactly when one more record would not fit: the spool never passes its cap.
        assert_eq!(spool.shared().pending_bytes(), n * one);
        assert!(n * one <= max && (n + 1) * one > max, "{n} records of {one} bytes in {max}");
        assert!(matches!(spool.append(vec![ping(99)], 7).await, Err(SpoolError::Full { .. })));
        assert_eq!(drain_all(spool.shared()).len() as u64, n, "refused appends wrote nothing");
        assert!(spool.shared().is_full(), "readiness turns 503 once the cap is near");
        let empty_dir = tempfile::tempdir().unwrap();
        assert!(!open(empty_dir.path(), max).shared().is_full());
    }

    #[tokio::test]
    async fn one_client_holds_at_most_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions {
            dir: dir.path().to_owned(),
            max_bytes: 1000,
            client_share: 0.5,
            segment_bytes: 4096,
            fsync_seconds: None,
        };
        let spool = Spool::open(options.clone(), FactCodec::new().unwrap()).unwrap();
        spool.append(vec![ping_of("flood", 1)], 7).await.unwrap();
        let one = spool.shared().client_pending_bytes("flood");
        let mut n = 1;
        let refused = loop {
            match spool.append(vec![ping_of("flood", n + 1)], 7).await {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(refused, SpoolError::ClientShare { ref client, .. } if client == "flood"), "{refused:?}");
        let flood = spool.shared().client_pending_bytes("flood");
        assert!(flood == n * one && flood <= 500 && flood + one > 500, "{n} x {one} bytes");
        // Another client still has room; a request mixing both is refused whole.
        spool.append(vec![ping_of("acme", 1)], 7).await.unwrap();
        assert!(spool.append(vec![ping_of("acme", 2), ping_of("flood", 99)], 7).await.is_err());
        let acme = spool.shared().client_pending_bytes("acme");
        assert_eq!(spool.shared().pending_bytes(), flood + acme);
        // The shares survive a reopen; delivering the flood's facts frees its share.
        drop(spool);
        let spool = Spool::open(options, FactCodec::new().unwrap()).unwrap();
        assert_eq!(spool.shared().client_pending_bytes("flood"), flood);
        spool.shared().commit_cursor(n + 1, flood, &HashMap::from([("flood".to_owned(), flood)])).unwrap();
        assert_eq!(spool.shared().client_pending_bytes("flood"), 0);
        spool.append(vec![ping_of("flood", 100)], 7).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_contiguous_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 30);
        let mut tasks = Vec::new();
        for t in 0..16 {
            let s = spool.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..20 {
                    seqs.extend(s.append(vec![ping(t * 100 + i)], 7).await.unwrap());
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=320).collect::<Vec<u64>>());
    }
}
