//! Avro wire format of the facts.
//!
//! Every Kafka message value is an Avro *single-object encoding*: the two marker bytes
//! `C3 01`, the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of the writer schema's
//! canonical form, then the binary datum. The schemas are the files in `schemas/`, compiled in.
//!
//! A reader decodes any writer schema it knows: the current ones, plus any registered at run
//! time (the collector publishes its writer schemas to the `<prefix>.schemas` topic, see the
//! topics crate). Standard Avro schema resolution then maps the writer's record onto the
//! current reader schema, so a newer writer with an added optional field, or an older writer
//! without one, is read correctly (tested in `tests::evolution_*`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::rabin::Rabin;
use apache_avro::types::Value;
use apache_avro::Schema;

use crate::fact::{Entry, Fact, FactHeader, FactKind, PageKind, Ping, SessionOrigin, Utm, Visit};

/// Schema source texts, as shipped in `schemas/`.
pub const VISIT_SCHEMA: &str = include_str!("../../../schemas/visit.avsc");
pub const ENTRY_SCHEMA: &str = include_str!("../../../schemas/entry.avsc");
pub const PING_SCHEMA: &str = include_str!("../../../schemas/ping.avsc");

const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Why a message could not be encoded or decoded. Never retryable: the same bytes fail again.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message is not Avro single-object encoded (missing C3 01 marker)")]
    NotSingleObject,
    #[error("unknown writer schema fingerprint {0:016x}")]
    UnknownSchema(u64),
    #[error("writer schema {fingerprint:016x} is a {found} schema, expected {expected}")]
    WrongKind { fingerprint: u64, found: FactKind, expected: FactKind },
    #[error("avro: {0}")]
    Avro(String),
    #[error("field {0}: unexpected value")]
    Field(&'static str),
    #[error("invalid schema: {0}")]
    Schema(String),
}

impl From<apache_avro::Error> for CodecError {
    fn from(e: apache_avro::Error) -> Self {
        CodecError::Avro(e.to_string())
    }
}

/// Fingerprint used in the single-object header.
pub fn fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(le)
}

/// Writer fingerprint of a single-object encoded message.
pub fn message_fingerprint(bytes: &[u8]) -> Result<u64, CodecError> {
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(CodecError::NotSingleObject);
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..HEADER_LEN]);
    Ok(u64::from_le_bytes(fp))
}

/// The kind a schema describes, from its record name.
pub fn schema_kind(schema: &Schema) -> Option<FactKind> {
    match schema {
        Schema::Record(record) => match record.name.name.as_str() {
            "Visit" => Some(FactKind::Visit),
            "Entry" => Some(FactKind::Entry),
            "Ping" => Some(FactKind::Ping),
            _ => None,
        },
        _ => None,
    }
}

#[derive(Debug)]
struct KnownSchemas {
    by_fingerprint: HashMap<u64, (FactKind, Arc<Schema>)>,
}

/// Encoder/decoder of facts; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct FactCodec {
    current: Arc<[(Arc<Schema>, u64); 3]>,
    known: Arc<RwLock<KnownSchemas>>,
}

impl FactCodec {
    /// Codec writing the current schemas and reading them plus any later registered.
    pub fn new() -> Result<Self, CodecError> {
        let parse = |text: &str| -> Result<(Arc<Schema>, u64), CodecError> {
            let schema = Schema::parse_str(text).map_err(|e| CodecError::Schema(e.to_string()))?;
            let fp = fingerprint(&schema);
            Ok((Arc::new(schema), fp))
        };
        let current = [parse(VISIT_SCHEMA)?, parse(ENTRY_SCHEMA)?, parse(PING_SCHEMA)?];
        let mut by_fingerprint = HashMap::new();
        for (kind, (schema, fp)) in FactKind::ALL.iter().zip(current.iter()) {
            by_fingerprint.insert(*fp, (*kind, schema.clone()));
        }
        Ok(Self { current: Arc::new(current), known: Arc::new(RwLock::new(KnownSchemas { by_fingerprint })) })
    }

    fn slot(kind: FactKind) -> usize {
        match kind {
            FactKind::Visit => 0,
            FactKind::Entry => 1,
            FactKind::Ping => 2,
        }
    }

    /// The current (reader and writer) schema of `kind`.
    pub fn schema(&self, kind: FactKind) -> &Schema {
        &self.current[Self::slot(kind)].0
    }

    /// Fingerprint of the current schema of `kind`.
    pub fn current_fingerprint(&self, kind: FactKind) -> u64 {
        self.current[Self::slot(kind)].1
    }

    /// Canonical JSON of the current schema of `kind` (what gets published to the registry).
    pub fn canonical_schema(&self, kind: FactKind) -> String {
        self.schema(kind).canonical_form()
    }

    /// Whether a writer schema with this fingerprint can be decoded.
    pub fn knows(&self, fingerprint: u64) -> bool {
        self.known.read().map(|k| k.by_fingerprint.contains_key(&fingerprint)).unwrap_or(false)
    }

    /// Registers a writer schema (from the schema registry topic). Returns its fingerprint.
    pub fn register(&self, schema_json: &str) -> Result<u64, CodecError> {
        let schema = Schema::parse_str(schema_json).map_err(|e| CodecError::Schema(e.to_string()))?;
        let kind =
            schema_kind(&schema).ok_or_else(|| CodecError::Schema("not a Visit, Entry or Ping record".into()))?;
        let fp = fingerprint(&schema);
        if let Ok(mut known) = self.known.write() {
            known.by_fingerprint.entry(fp).or_insert((kind, Arc::new(schema)));
        }
        Ok(fp)
    }

    /// Single-object encoding of `fact` with the current schema.
    pub fn encode(&self, fact: &Fact) -> Result<Vec<u8>, CodecError> {
        let fp = self.current_fingerprint(fact.kind());
        let mut out = Vec::with_capacity(HEADER_LEN + 160);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&fp.to_le_bytes());
        fast::Writer { out: &mut out }.fact(fact);
        Ok(out)
    }

    /// The same encoding through apache-avro's generic writer (reference for tests).
    pub fn encode_generic(&self, fact: &Fact) -> Result<Vec<u8>, CodecError> {
        let kind = fact.kind();
        let (schema, fp) = &self.current[Self::slot(kind)];
        let datum = apache_avro::to_avro_datum(schema, to_value(fact))?;
        let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&fp.to_le_bytes());
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// Decodes a message of the `expected` kind, resolving its writer schema to the current one.
    pub fn decode(&self, expected: FactKind, bytes: &[u8]) -> Result<Fact, CodecError> {
        let fp = message_fingerprint(bytes)?;
        let (kind, writer) = {
            let known = self.known.read().map_err(|_| CodecError::Schema("schema registry lock poisoned".into()))?;
            known.by_fingerprint.get(&fp).cloned().ok_or(CodecError::UnknownSchema(fp))?
        };
        if kind != expected {
            return Err(CodecError::WrongKind { fingerprint: fp, found: kind, expected });
        }
        if fp == self.current_fingerprint(kind) {
            // Written with the current schema: decode straight into the typed fact.
            return fast::decode(kind, &bytes[HEADER_LEN..]);
        }
        let reader = self.schema(kind);
        let mut body = &bytes[HEADER_LEN..];
        let value = apache_avro::from_avro_datum(&writer, &mut body, Some(reader))?;
        from_value(kind, value)
    }
}

/// Decoder of the current schemas' binary encoding straight into typed facts: no `Value` tree,
/// no schema resolution, one allocation per string. `tests::fast_path_equals_generic_decoding`
/// checks it against apache-avro's generic decoding for random facts.
mod fast {
    use super::{read_fact, CodecError, FieldSource};
    use crate::fact::{Fact, FactHeader, FactKind, SessionOrigin, Utm};

    struct Reader<'a> {
        buf: &'a [u8],
    }

    impl Reader<'_> {
        /// Avro `long`/`int`: zig-zag varint.
        fn long(&mut self, field: &'static str) -> Result<i64, CodecError> {
            let mut value: u64 = 0;
            for shift in (0..64).step_by(7) {
                let (&b, rest) = self.buf.split_first().ok_or(CodecError::Field(field))?;
                self.buf = rest;
                value |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
                }
            }
            Err(CodecError::Field(field))
        }

        fn boolean(&mut self, field: &'static str) -> Result<bool, CodecError> {
            let (&b, rest) = self.buf.split_first().ok_or(CodecError::Field(field))?;
            self.buf = rest;
            match b {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(CodecError::Field(field)),
            }
        }

        fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
            let len = usize::try_from(self.long(field)?).map_err(|_| CodecError::Field(field))?;
            if len > self.buf.len() {
                return Err(CodecError::Field(field));
            }
            let (s, rest) = self.buf.split_at(len);
            self.buf = rest;
            String::from_utf8(s.to_vec()).map_err(|_| CodecError::Field(field))
        }

        /// `["null", "string"]`.
        fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, CodecError> {
            match self.long(field)? {
                0 => Ok(None),
                1 => self.string(field).map(Some),
                _ => Err(CodecError::Field(field)),
            }
        }

        /// The record, its fields in schema order.
        fn utm_record(&mut self) -> Result<Utm, CodecError> {
            Ok(Utm {
                source: self.opt_string("utm.source")?,
                medium: self.opt_string("utm.medium")?,
                campaign: self.opt_string("utm.campaign")?,
                term: self.opt_string("utm.term")?,
                content: self.opt_string("utm.content")?,
            })
        }

        /// The branch of a `["null", T]` union: false for null.
        fn present(&mut self, field: &'static str) -> Result<bool, CodecError> {
            match self.long(field)? {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(CodecError::Field(field)),
            }
        }
    }

    impl FieldSource for Reader<'_> {
        fn long(&mut self, field: &'static str) -> Result<i64, CodecError> {
            Reader::long(self, field)
        }

        fn opt_long(&mut self, field: &'static str) -> Result<Option<i64>, CodecError> {
            if self.present(field)? {
                Reader::long(self, field).map(Some)
            } else {
                Ok(None)
            }
        }

        fn boolean(&mut self, field: &'static str) -> Result<bool, CodecError> {
            Reader::boolean(self, field)
        }

        fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
            Reader::string(self, field)
        }

        fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, CodecError> {
            Reader::opt_string(self, field)
        }

        fn symbol(&mut self, field: &'static str, symbols: &[&str]) -> Result<usize, CodecError> {
            usize::try_from(Reader::long(self, field)?)
                .ok()
                .filter(|i| *i < symbols.len())
                .ok_or(CodecError::Field(field))
        }

        fn utm(&mut self, _field: &'static str) -> Result<Utm, CodecError> {
            self.utm_record()
        }

        fn opt_utm(&mut self, field: &'static str) -> Result<Option<Utm>, CodecError> {
            if self.present(field)? {
                self.utm_record().map(Some)
            } else {
                Ok(None)
            }
        }
    }

    /// Writer of the current schemas' binary encoding (the mirror of [`Reader`]).
    pub(super) struct Writer<'a> {
        pub(super) out: &'a mut Vec<u8>,
    }

    impl Writer<'_> {
        fn long(&mut self, n: i64) {
            let mut z = ((n << 1) ^ (n >> 63)) as u64;
            while z >= 0x80 {
                self.out.push((z as u8) | 0x80);
                z >>= 7;
            }
            self.out.push(z as u8);
        }

        fn boolean(&mut self, b: bool) {
            self.out.push(u8::from(b));
        }

        fn string(&mut self, s: &str) {
            self.long(s.len() as i64);
            self.out.extend_from_slice(s.as_bytes());
        }

        fn opt_string(&mut self, s: &Option<String>) {
            match s {
                None => self.long(0),
                Some(s) => {
                    self.long(1);
                    self.string(s);
                }
            }
        }

        fn utm(&mut self, u: &Utm) {
            for f in [&u.source, &u.medium, &u.campaign, &u.term, &u.content] {
                self.opt_string(f);
            }
        }

        fn origin(&mut self, o: SessionOrigin) {
            self.long(match o {
                SessionOrigin::Body => 0,
                SessionOrigin::Cookie => 1,
                SessionOrigin::Created => 2,
            });
        }

        fn header(&mut self, h: &FactHeader) {
            self.long(h.spool_id as i64);
            self.long(h.spool_seq as i64);
            self.string(&h.client_id);
            self.long(h.received_at_ms);
            self.long(h.event_time_ms);
            self.opt_string(&h.client_ts);
            self.boolean(h.clock_skew);
        }

        pub(super) fn fact(&mut self, fact: &Fact) {
            match fact {
                Fact::Visit(v) => {
                    self.header(&v.header);
                    self.string(&v.session_id);
                    self.origin(v.session_origin);
                    self.long(v.page.index() as i64);
                    for f in [&v.event_id, &v.webinar_id, &v.event_uid, &v.path, &v.cid] {
                        self.opt_string(f);
                    }
                    self.boolean(v.cid_resolved);
                    self.utm(&v.utm);
                    self.boolean(v.utm_inherited);
                    self.opt_string(&v.referrer);
                }
                Fact::Entry(e) => {
                    self.header(&e.header);
                    self.string(&e.entry_id);
                    self.string(&e.session_id);
                    self.origin(e.session_origin);
                    for f in [&e.event_id, &e.webinar_id, &e.cid] {
                        self.opt_string(f);
                    }
                    self.boolean(e.cid_resolved);
                    self.utm(&e.utm);
                    self.boolean(e.utm_inherited);
                    match &e.first_touch_utm {
                        None => self.long(0),
                        Some(u) => {
                            self.long(1);
                            self.utm(u);
                        }
                    }
                    match e.first_touch_at_ms {
                        None => self.long(0),
                        Some(ms) => {
                            self.long(1);
                            self.long(ms);
                        }
                    }
                }
                Fact::Ping(p) => {
                    self.header(&p.header);
                    self.string(&p.webinar_id);
                    self.string(&p.session_id);
                    self.origin(p.session_origin);
                }
            }
        }
    }

    /// Decodes a datum written with the current schema of `kind` (fields in schema order).
    pub(super) fn decode(kind: FactKind, body: &[u8]) -> Result<Fact, CodecError> {
        let mut r = Reader { buf: body };
        let fact = read_fact(kind, &mut r)?;
        if !r.buf.is_empty() {
            return Err(CodecError::Avro(format!("{} trailing bytes", r.buf.len())));
        }
        Ok(fact)
    }
}

// ---------------------------------------------------------------------------------------------
// Fact <-> Avro value

fn opt(v: &Option<String>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    }
}

fn utm_value(u: &Utm) -> Value {
    Value::Record(vec![
        ("source".into(), opt(&u.source)),
        ("medium".into(), opt(&u.medium)),
        ("campaign".into(), opt(&u.campaign)),
        ("term".into(), opt(&u.term)),
        ("content".into(), opt(&u.content)),
    ])
}

fn origin_value(o: SessionOrigin) -> Value {
    match o {
        SessionOrigin::Body => Value::Enum(0, "BODY".into()),
        SessionOrigin::Cookie => Value::Enum(1, "COOKIE".into()),
        SessionOrigin::Created => Value::Enum(2, "CREATED".into()),
    }
}

fn header_fields(h: &FactHeader) -> Vec<(String, Value)> {
    vec![
        // Avro has no unsigned long: the spool id travels as the same 64 bits, signed.
        ("spool_id".into(), Value::Long(h.spool_id as i64)),
        ("spool_seq".into(), Value::Long(h.spool_seq as i64)),
        ("client_id".into(), Value::String(h.client_id.clone())),
        ("received_at_ms".into(), Value::TimestampMillis(h.received_at_ms)),
        ("event_time_ms".into(), Value::TimestampMillis(h.event_time_ms)),
        ("client_ts".into(), opt(&h.client_ts)),
        ("clock_skew".into(), Value::Boolean(h.clock_skew)),
    ]
}

fn to_value(fact: &Fact) -> Value {
    match fact {
        Fact::Visit(v) => {
            let mut f = header_fields(&v.header);
            let page = match v.page {
                PageKind::Landing => Value::Enum(0, "LANDING".into()),
                PageKind::Webinar => Value::Enum(1, "WEBINAR".into()),
                PageKind::Live => Value::Enum(2, "LIVE".into()),
            };
            f.extend([
                ("session_id".into(), Value::String(v.session_id.clone())),
                ("session_origin".into(), origin_value(v.session_origin)),
                ("page".into(), page),
                ("event_id".into(), opt(&v.event_id)),
                ("webinar_id".into(), opt(&v.webinar_id)),
                ("event_uid".into(), opt(&v.event_uid)),
                ("path".into(), opt(&v.path)),
                ("cid".into(), opt(&v.cid)),
                ("cid_resolved".into(), Value::Boolean(v.cid_resolved)),
                ("utm".into(), utm_value(&v.utm)),
                ("utm_inherited".into(), Value::Boolean(v.utm_inherited)),
                ("referrer".into(), opt(&v.referrer)),
            ]);
            Value::Record(f)
        }
        Fact::Entry(e) => {
            let mut f = header_fields(&e.header);
            f.extend([
                ("entry_id".into(), Value::String(e.entry_id.clone())),
                ("session_id".into(), Value::String(e.session_id.clone())),
                ("session_origin".into(), origin_value(e.session_origin)),
                ("event_id".into(), opt(&e.event_id)),
                ("webinar_id".into(), opt(&e.webinar_id)),
                ("cid".into(), opt(&e.cid)),
                ("cid_resolved".into(), Value::Boolean(e.cid_resolved)),
                ("utm".into(), utm_value(&e.utm)),
                ("utm_inherited".into(), Value::Boolean(e.utm_inherited)),
                (
                    "first_touch_utm".into(),
                    match &e.first_touch_utm {
                        None => Value::Union(0, Box::new(Value::Null)),
                        Some(u) => Value::Union(1, Box::new(utm_value(u))),
                    },
                ),
                (
                    "first_touch_at_ms".into(),
                    match e.first_touch_at_ms {
                        None => Value::Union(0, Box::new(Value::Null)),
                        Some(ms) => Value::Union(1, Box::new(Value::TimestampMillis(ms))),
                    },
                ),
            ]);
            Value::Record(f)
        }
        Fact::Ping(p) => {
            let mut f = header_fields(&p.header);
            f.extend([
                ("webinar_id".into(), Value::String(p.webinar_id.clone())),
                ("session_id".into(), Value::String(p.session_id.clone())),
                ("session_origin".into(), origin_value(p.session_origin)),
            ]);
            Value::Record(f)
        }
    }
}

/// Named fields of a decoded record.
struct Fields(HashMap<String, Value>);

impl Fields {
    fn take(&mut self, name: &'static str) -> Result<Value, CodecError> {
        let v = self.0.remove(name).ok_or(CodecError::Field(name))?;
        Ok(match v {
            Value::Union(_, inner) => *inner,
            other => other,
        })
    }

    fn utm_value(&mut self, name: &'static str) -> Result<Option<Utm>, CodecError> {
        match self.take(name)? {
            Value::Null => Ok(None),
            Value::Record(fields) => {
                let mut f = Fields(fields.into_iter().collect());
                Ok(Some(Utm {
                    source: f.opt_string("source")?,
                    medium: f.opt_string("medium")?,
                    campaign: f.opt_string("campaign")?,
                    term: f.opt_string("term")?,
                    content: f.opt_string("content")?,
                }))
            }
            _ => Err(CodecError::Field(name)),
        }
    }
}

impl FieldSource for Fields {
    fn long(&mut self, name: &'static str) -> Result<i64, CodecError> {
        match self.take(name)? {
            Value::Long(n) | Value::TimestampMillis(n) => Ok(n),
            Value::Int(n) => Ok(i64::from(n)),
            _ => Err(CodecError::Field(name)),
        }
    }

    fn opt_long(&mut self, name: &'static str) -> Result<Option<i64>, CodecError> {
        match self.take(name)? {
            Value::Null => Ok(None),
            Value::Long(n) | Value::TimestampMillis(n) => Ok(Some(n)),
            _ => Err(CodecError::Field(name)),
        }
    }

    fn boolean(&mut self, name: &'static str) -> Result<bool, CodecError> {
        match self.take(name)? {
            Value::Boolean(b) => Ok(b),
            _ => Err(CodecError::Field(name)),
        }
    }

    fn string(&mut self, name: &'static str) -> Result<String, CodecError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            _ => Err(CodecError::Field(name)),
        }
    }

    fn opt_string(&mut self, name: &'static str) -> Result<Option<String>, CodecError> {
        match self.take(name)? {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            _ => Err(CodecError::Field(name)),
        }
    }

    fn symbol(&mut self, name: &'static str, symbols: &[&str]) -> Result<usize, CodecError> {
        match self.take(name)? {
            Value::Enum(_, s) => symbols.iter().position(|x| *x == s).ok_or(CodecError::Field(name)),
            _ => Err(CodecError::Field(name)),
        }
    }

    fn utm(&mut self, name: &'static str) -> Result<Utm, CodecError> {
        Ok(self.utm_value(name)?.unwrap_or_default())
    }

    fn opt_utm(&mut self, name: &'static str) -> Result<Option<Utm>, CodecError> {
        self.utm_value(name)
    }
}

fn from_value(kind: FactKind, value: Value) -> Result<Fact, CodecError> {
    let Value::Record(fields) = value else {
        return Err(CodecError::Avro("datum is not a record".into()));
    };
    read_fact(kind, &mut Fields(fields.into_iter().collect()))
}

// ---------------------------------------------------------------------------------------------
// Fact assembly, shared by both decoders

/// Where a decoder takes a fact's fields from, asked for in the current schema's field order:
/// the binary encoding of a current schema (`fast::Reader`) or a datum apache-avro resolved onto
/// the current schema (`Fields`, any other writer schema). [`read_fact`] builds facts from either.
trait FieldSource {
    fn long(&mut self, field: &'static str) -> Result<i64, CodecError>;
    fn opt_long(&mut self, field: &'static str) -> Result<Option<i64>, CodecError>;
    fn boolean(&mut self, field: &'static str) -> Result<bool, CodecError>;
    fn string(&mut self, field: &'static str) -> Result<String, CodecError>;
    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, CodecError>;
    /// Position of an enum field's symbol in `symbols` (the current schema's order).
    fn symbol(&mut self, field: &'static str, symbols: &[&str]) -> Result<usize, CodecError>;
    fn utm(&mut self, field: &'static str) -> Result<Utm, CodecError>;
    fn opt_utm(&mut self, field: &'static str) -> Result<Option<Utm>, CodecError>;
}

/// Enum symbols in schema order (`schemas/*.avsc`).
const ORIGINS: [&str; 3] = ["BODY", "COOKIE", "CREATED"];
const PAGES: [&str; 3] = ["LANDING", "WEBINAR", "LIVE"];

fn origin(s: &mut impl FieldSource) -> Result<SessionOrigin, CodecError> {
    Ok([SessionOrigin::Body, SessionOrigin::Cookie, SessionOrigin::Created][s.symbol("session_origin", &ORIGINS)?])
}

fn read_fact(kind: FactKind, s: &mut impl FieldSource) -> Result<Fact, CodecError> {
    let header = FactHeader {
        spool_id: s.long("spool_id")? as u64,
        spool_seq: s.long("spool_seq")? as u64,
        client_id: s.string("client_id")?,
        received_at_ms: s.long("received_at_ms")?,
        event_time_ms: s.long("event_time_ms")?,
        client_ts: s.opt_string("client_ts")?,
        clock_skew: s.boolean("clock_skew")?,
    };
    Ok(match kind {
        FactKind::Visit => Fact::Visit(Visit {
            header,
            session_id: s.string("session_id")?,
            session_origin: origin(s)?,
            page: [PageKind::Landing, PageKind::Webinar, PageKind::Live][s.symbol("page", &PAGES)?],
            event_id: s.opt_string("event_id")?,
            webinar_id: s.opt_string("webinar_id")?,
            event_uid: s.opt_string("event_uid")?,
            path: s.opt_string("path")?,
            cid: s.opt_string("cid")?,
            cid_resolved: s.boolean("cid_resolved")?,
            utm: s.utm("utm")?,
            utm_inherited: s.boolean("utm_inherited")?,
            referrer: s.opt_string("referrer")?,
        }),
        FactKind::Entry => Fact::Entry(Entry {
            header,
            entry_id: s.string("entry_id")?,
            session_id: s.string("session_id")?,
            session_origin: origin(s)?,
            event_id: s.opt_string("event_id")?,
            webinar_id: s.opt_string("webinar_id")?,
            cid: s.opt_string("cid")?,
            cid_resolved: s.boolean("cid_resolved")?,
            utm: s.utm("utm")?,
            utm_inherited: s.boolean("utm_inherited")?,
            first_touch_utm: s.opt_utm("first_touch_utm")?,
            first_touch_at_ms: s.opt_long("first_touch_at_ms")?,
        }),
        FactKind::Ping => Fact::Ping(Ping {
            header,
            webinar_id: s.string("webinar_id")?,
            session_id: s.string("session_id")?,
            session_origin: origin(s)?,
        }),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn header(seq: u64) -> FactHeader {
        FactHeader {
            spool_id: 0xfeed_beef_dead_0001,
            spool_seq: seq,
            client_id: "acme".into(),
            received_at_ms: 1_795_600_000_000,
            event_time_ms: 1_795_599_999_000,
            client_ts: Some("2026-11-26T10:00:00+09:00".into()),
            clock_skew: false,
        }
    }

    pub fn sample_facts() -> Vec<Fact> {
        let utm = Utm {
            source: Some("news".into()),
            medium: None,
            campaign: Some("fall'; DROP TABLE x".into()),
            term: None,
            content: Some("<script>".into()),
        };
        vec![
            Fact::Visit(Visit {
                header: header(1),
                session_id: "s-1".into(),
                session_origin: SessionOrigin::Created,
                page: PageKind::Live,
                event_id: None,
                webinar_id: Some("w1".into()),
                event_uid: Some("u-1".into()),
                path: Some("/webinar/w1/live".into()),
                cid: Some("c9".into()),
                cid_resolved: true,
                utm: utm.clone(),
                utm_inherited: false,
                referrer: None,
            }),
            Fact::Entry(Entry {
                header: header(2),
                entry_id: "e-1".into(),
                session_id: "s-1".into(),
                session_origin: SessionOrigin::Cookie,
                event_id: Some("ev".into()),
                webinar_id: None,
                cid: None,
                cid_resolved: false,
                utm: Utm::default(),
                utm_inherited: true,
                first_touch_utm: Some(utm),
                first_touch_at_ms: Some(1_795_500_000_000),
            }),
            Fact::Ping(Ping {
                header: header(3),
                webinar_id: "w1".into(),
                session_id: "s-1".into(),
                session_origin: SessionOrigin::Body,
            }),
        ]
    }

    mod generated {
        use super::super::*;
        use proptest::prelude::*;

        fn arb_opt() -> impl Strategy<Value = Option<String>> {
            proptest::option::of("[a-zA-Z0-9 '\"<>;\\\\\u{00e9}\u{1F600}]{0,40}")
        }

        fn arb_utm() -> impl Strategy<Value = Utm> {
            (arb_opt(), arb_opt(), arb_opt(), arb_opt(), arb_opt())
                .prop_map(|(source, medium, campaign, term, content)| Utm { source, medium, campaign, term, content })
        }

        fn arb_header() -> impl Strategy<Value = FactHeader> {
            (any::<u64>(), any::<u64>(), "[a-z0-9]{1,20}", any::<i64>(), any::<i64>(), arb_opt(), any::<bool>())
                .prop_map(|(spool_id, spool_seq, client_id, received_at_ms, event_time_ms, client_ts, clock_skew)| {
                    FactHeader { spool_id, spool_seq, client_id, received_at_ms, event_time_ms, client_ts, clock_skew }
                })
        }

        fn arb_origin() -> impl Strategy<Value = SessionOrigin> {
            prop_oneof![Just(SessionOrigin::Body), Just(SessionOrigin::Cookie), Just(SessionOrigin::Created)]
        }

        fn arb_fact() -> impl Strategy<Value = Fact> {
            let visit = (
                arb_header(),
                "[ -~]{1,30}",
                arb_origin(),
                0usize..3,
                (arb_opt(), arb_opt(), arb_opt(), arb_opt(), arb_opt()),
                any::<bool>(),
                arb_utm(),
                any::<bool>(),
                arb_opt(),
            )
                .prop_map(
                    |(header, session_id, session_origin, page, ids, cid_resolved, utm, utm_inherited, referrer)| {
                        let (event_id, webinar_id, event_uid, path, cid) = ids;
                        Fact::Visit(Visit {
                            header,
                            session_id,
                            session_origin,
                            page: PageKind::ALL[page],
                            event_id,
                            webinar_id,
                            event_uid,
                            path,
                            cid,
                            cid_resolved,
                            utm,
                            utm_inherited,
                            referrer,
                        })
                    },
                );
            let entry = (
                arb_header(),
                ("[ -~]{1,30}", "[ -~]{1,30}"),
                arb_origin(),
                (arb_opt(), arb_opt(), arb_opt()),
                any::<bool>(),
                arb_utm(),
                any::<bool>(),
                proptest::option::of(arb_utm()),
                proptest::option::of(any::<i64>()),
            )
                .prop_map(
                    |(
                        header,
                        (entry_id, session_id),
                        session_origin,
                        ids,
                        cid_resolved,
                        utm,
                        utm_inherited,
                        first,
                        at,
                    )| {
                        let (event_id, webinar_id, cid) = ids;
                        Fact::Entry(Entry {
                            header,
                            entry_id,
                            session_id,
                            session_origin,
                            event_id,
                            webinar_id,
                            cid,
                            cid_resolved,
                            utm,
                            utm_inherited,
                            first_touch_utm: first,
                            first_touch_at_ms: at,
                        })
                    },
                );
            let ping = (arb_header(), "[ -~]{1,30}", "[ -~]{1,30}", arb_origin()).prop_map(
                |(header, webinar_id, session_id, session_origin)| {
                    Fact::Ping(Ping { header, webinar_id, session_id, session_origin })
                },
            );
            prop_oneof![visit, entry, ping]
        }

        proptest! {
            /// The typed fast path and apache-avro's generic decoding agree on every fact, both
            /// give back what was encoded, and truncated input is an error, never a panic.
            #[test]
            fn fast_path_equals_generic_decoding(fact in arb_fact()) {
                let codec = FactCodec::new().unwrap();
                let bytes = codec.encode(&fact).unwrap();
                prop_assert_eq!(&bytes, &codec.encode_generic(&fact).unwrap(), "fast and generic encodings differ");
                let kind = fact.kind();
                let body = &bytes[HEADER_LEN..];
                let value = apache_avro::from_avro_datum(codec.schema(kind), &mut &body[..], None).unwrap();
                let generic = from_value(kind, value).unwrap();
                let fast = fast::decode(kind, body).unwrap();
                prop_assert_eq!(&fast, &generic);
                prop_assert_eq!(&fast, &fact);
                for cut in [1, body.len() / 2] {
                    prop_assert!(fast::decode(kind, &body[..body.len() - cut]).is_err());
                }
            }
        }
    }

    #[test]
    fn round_trip_all_kinds() {
        let codec = FactCodec::new().unwrap();
        for fact in sample_facts() {
            let bytes = codec.encode(&fact).unwrap();
            assert_eq!(&bytes[..2], &MAGIC);
            assert_eq!(message_fingerprint(&bytes).unwrap(), codec.current_fingerprint(fact.kind()));
            assert_eq!(codec.decode(fact.kind(), &bytes).unwrap(), fact);
        }
    }

    #[test]
    fn rejects_garbage_unknown_schemas_and_wrong_topics() {
        let codec = FactCodec::new().unwrap();
        assert!(matches!(codec.decode(FactKind::Visit, b"{\"json\":1}"), Err(CodecError::NotSingleObject)));
        let mut bytes = codec.encode(&sample_facts()[0]).unwrap();
        assert!(matches!(codec.decode(FactKind::Ping, &bytes), Err(CodecError::WrongKind { .. })));
        bytes[2] ^= 0xff;
        assert!(matches!(codec.decode(FactKind::Visit, &bytes), Err(CodecError::UnknownSchema(_))));
        let truncated = &codec.encode(&sample_facts()[0]).unwrap()[..20];
        assert!(codec.decode(FactKind::Visit, truncated).is_err());
    }

    /// The visit schema as a future version might write it: one added optional field.
    fn visit_v2_schema() -> String {
        let mut schema: serde_json::Value = serde_json::from_str(VISIT_SCHEMA).unwrap();
        schema["fields"].as_array_mut().unwrap().push(serde_json::json!(
            {"name": "device_class", "type": ["null", "string"], "default": null}
        ));
        schema.to_string()
    }

    #[test]
    fn evolution_newer_writer_is_read_by_current_reader() {
        let v2 = Schema::parse_str(&visit_v2_schema()).unwrap();
        let Fact::Visit(expected) = sample_facts().remove(0) else { unreachable!() };
        // Write with v2, including a value for the field the current reader does not know.
        let Value::Record(mut fields) = to_value(&Fact::Visit(expected.clone())) else { unreachable!() };
        fields.push(("device_class".into(), Value::Union(1, Box::new(Value::String("tablet".into())))));
        let datum = apache_avro::to_avro_datum(&v2, Value::Record(fields)).unwrap();
        let mut msg = MAGIC.to_vec();
        msg.extend_from_slice(&fingerprint(&v2).to_le_bytes());
        msg.extend_from_slice(&datum);

        let codec = FactCodec::new().unwrap();
        // Unknown until the registry delivers the writer schema.
        assert!(matches!(codec.decode(FactKind::Visit, &msg), Err(CodecError::UnknownSchema(_))));
        codec.register(&visit_v2_schema()).unwrap();
        assert_eq!(codec.decode(FactKind::Visit, &msg).unwrap(), Fact::Visit(expected));
    }

    #[test]
    fn evolution_current_writer_is_read_by_newer_reader() {
        let v2 = Schema::parse_str(&visit_v2_schema()).unwrap();
        let codec = FactCodec::new().unwrap();
        let fact = sample_facts().remove(0);
        let msg = codec.encode(&fact).unwrap();
        let writer = codec.schema(FactKind::Visit);
        let value = apache_avro::from_avro_datum(writer, &mut &msg[HEADER_LEN..], Some(&v2)).unwrap();
        let Value::Record(fields) = value else { unreachable!() };
        let device = fields.iter().find(|(n, _)| n == "device_class").map(|(_, v)| v.clone());
        assert_eq!(device, Some(Value::Union(0, Box::new(Value::Null))), "added field takes its default");
        // Everything the current schema knows survives the newer reader.
        let known: Vec<_> = fields.into_iter().filter(|(n, _)| n != "device_class").collect();
        assert_eq!(from_value(FactKind::Visit, Value::Record(known)).unwrap(), fact);
    }
}
