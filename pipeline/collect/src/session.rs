//! Sessions and UTM attribution, kept server-side in first-party cookies.
//!
//! - `ef_sid`: the session id used when a fact has no `session_id`; created by the collector
//!   for visits, refreshed on every response (sliding expiry of `collector.session_lifetime`,
//!   30 minutes by default, `SameSite=Lax`).
//! - `ef_utm`: the first and the last *touch* (campaign link id and UTM parameters, with time).
//!   A fact that carries a `cid` or any UTM field is a touch: it becomes the last touch, and the
//!   first one if there was none. A fact without them inherits the last touch, so a redirect or
//!   a client-side navigation that drops the query string keeps its attribution. Registrations
//!   carry the last touch as `utm` and the first touch as `first_touch_utm`.
//!
//! The policy is written down in `docs/policies/attribution.md`.

use serde::{Deserialize, Serialize};

use eventflow_core::fact::Utm;

pub const SESSION_COOKIE: &str = "ef_sid";
pub const UTM_COOKIE: &str = "ef_utm";
/// The `ef_utm` cookie lives this long after the last touch.
pub const ATTRIBUTION_MAX_AGE_SECS: u64 = 30 * 24 * 3600;
/// Browsers drop cookies over 4096 bytes; long terms and contents are left out above this.
const MAX_UTM_COOKIE_BYTES: usize = 3800;

/// A campaign touch: where the visitor came from, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    #[serde(default)]
    pub utm: Utm,
    pub at_ms: i64,
}

impl Touch {
    /// The touch a fact carries, if it has a campaign link id or any UTM field.
    pub fn of(cid: &Option<String>, utm: &Utm, at_ms: i64) -> Option<Touch> {
        (cid.is_some() || !utm.is_empty()).then(|| Touch { cid: cid.clone(), utm: utm.clone(), at_ms })
    }
}

/// The content of the `ef_utm` cookie.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    #[serde(default, rename = "f", skip_serializing_if = "Option::is_none")]
    pub first: Option<Touch>,
    #[serde(default, rename = "l", skip_serializing_if = "Option::is_none")]
    pub last: Option<Touch>,
}

impl Attribution {
    /// Records a touch: it becomes the last touch, and the first if there was none.
    pub fn touch(&mut self, touch: Touch) {
        if self.first.is_none() {
            self.first = Some(touch.clone());
        }
        self.last = Some(touch);
    }

    /// Cookie value: URL-safe base64 of compact JSON (no characters that need quoting).
    pub fn encode(&self) -> String {
        let mut copy = self.clone();
        let mut json = serde_json::to_vec(&copy).unwrap_or_default();
        if json.len() * 4 / 3 > MAX_UTM_COOKIE_BYTES {
            for t in [copy.first.as_mut(), copy.last.as_mut()].into_iter().flatten() {
                t.utm.term = None;
                t.utm.content = None;
            }
            json = serde_json::to_vec(&copy).unwrap_or_default();
        }
        base64url_encode(&json)
    }

    /// Parses a cookie value; anything malformed is treated as no attribution.
    pub fn decode(value: &str) -> Attribution {
        base64url_decode(value).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }
}

/// Cookies of a request, by name (the first occurrence wins).
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').map(str::trim).find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// Whether a cookie-provided session id is acceptable (same alphabet the collector creates,
/// plus what common trackers use), so a forged cookie cannot smuggle control characters.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A new random session id (128 bits, hex).
pub fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Settings of the `Set-Cookie` headers.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    pub domain: Option<String>,
    pub secure: bool,
    /// `Max-Age` of `ef_sid` in seconds (`collector.session_lifetime`, sliding).
    pub session_max_age_secs: u64,
}

impl CookiePolicy {
    fn set(&self, name: &str, value: &str, max_age: u64) -> String {
        let mut c = format!("{name}={value}; Path=/; Max-Age={max_age}; SameSite=Lax; HttpOnly");
        if let Some(d) = &self.domain {
            c.push_str("; Domain=");
            c.push_str(d);
        }
        if self.secure {
            c.push_str("; Secure");
        }
        c
    }

    pub fn session(&self, id: &str) -> String {
        self.set(SESSION_COOKIE, id, self.session_max_age_secs)
    }

    pub fn attribution(&self, a: &Attribution) -> String {
        self.set(UTM_COOKIE, &a.encode(), ATTRIBUTION_MAX_AGE_SECS)
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let vals: Option<Vec<u32>> = s.bytes().map(|c| B64.iter().position(|b| *b == c).map(|p| p as u32)).collect();
    let vals = vals?;
    for chunk in vals.chunks(4) {
        if chunk.len() < 2 {
            return None;
        }
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, v)| acc | (v << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push(((n >> (16 - 8 * i)) & 0xff) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utm(source: &str) -> Utm {
        Utm { source: Some(source.into()), ..Utm::default() }
    }

    #[test]
    fn first_and_last_touch() {
        let mut a = Attribution::default();
        a.touch(Touch { cid: Some("c1".into()), utm: utm("news"), at_ms: 1 });
        a.touch(Touch { cid: None, utm: utm("ads"), at_ms: 2 });
        assert_eq!(a.first.as_ref().unwrap().utm.source.as_deref(), Some("news"));
        assert_eq!(a.last.as_ref().unwrap().utm.source.as_deref(), Some("ads"));
        assert_eq!(Attribution::decode(&a.encode()), a);
        assert_eq!(Touch::of(&None, &Utm::default(), 5), None);
    }

    #[test]
    fn cookie_stays_small_and_garbage_is_ignored() {
        let long = "x".repeat(256);
        let big = Utm {
            source: Some(long.clone()),
            medium: Some(long.clone()),
            campaign: Some(long.clone()),
            term: Some(long.clone()),
            content: Some(long),
        };
        let mut a = Attribution::default();
        a.touch(Touch { cid: None, utm: big.clone(), at_ms: 1 });
        a.touch(Touch { cid: None, utm: big, at_ms: 2 });
        let value = a.encode();
        assert!(value.len() <= MAX_UTM_COOKIE_BYTES, "{}", value.len());
        assert!(value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Attribution::decode("%%%not base64"), Attribution::default());
        assert_eq!(Attribution::decode("eyJ"), Attribution::default());
    }

    #[test]
    fn base64_round_trip() {
        for len in 0..10 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64url_decode(&base64url_encode(&data)).unwrap(), data);
        }
    }

    #[test]
    fn cookies_and_session_ids() {
        let h = Some("a=1; ef_sid=abc123; ef_utm=xyz");
        assert_eq!(cookie(h, SESSION_COOKIE), Some("abc123"));
        assert_eq!(cookie(h, "missing"), None);
        assert!(valid_session_id("0f3a-b_c.d:e"));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id(""));
        assert_eq!(new_session_id().len(), 32);
        let p = CookiePolicy { domain: Some("example.com".into()), secure: true, session_max_age_secs: 1800 };
        assert_eq!(
            p.session("s"),
            "ef_sid=s; Path=/; Max-Age=1800; SameSite=Lax; HttpOnly; Domain=example.com; Secure"
        );
    }
}
