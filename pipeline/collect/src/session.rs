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
//!
//! Cookies come from the request, so `ef_utm` is validated like a body: a value over 4 KiB (more
//! than a browser stores), not base64url of the expected JSON, or with any value that fails
//! [`intake::check_text`] (UTM values over 256 characters, control or bidi characters, a `cid`
//! over 128) is ignored whole. Parsing and writing cookies is the `cookie` crate's, the encoding
//! the `base64` crate's.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use cookie::{Cookie, SameSite};
use serde::{Deserialize, Serialize};

use eventflow_core::fact::Utm;

use crate::intake;

pub const SESSION_COOKIE: &str = "ef_sid";
pub const UTM_COOKIE: &str = "ef_utm";
/// The `ef_utm` cookie lives this long after the last touch.
pub const ATTRIBUTION_MAX_AGE_SECS: u64 = 30 * 24 * 3600;
/// Browsers drop cookies over 4096 bytes; long terms and contents are left out above this.
const MAX_UTM_COOKIE_BYTES: usize = 3800;
/// A longer `ef_utm` value than a browser would store is not read at all.
pub const MAX_COOKIE_VALUE_BYTES: usize = 4096;

/// URL-safe base64; written without padding, read with or without.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

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
        B64.encode(&json)
    }

    /// Parses a cookie value; anything malformed or out of bounds is treated as no attribution.
    pub fn decode(value: &str) -> Attribution {
        Self::try_decode(value).unwrap_or_default()
    }

    /// The attribution in a cookie value, if it is well-formed and every value in it is valid.
    pub fn try_decode(value: &str) -> Option<Attribution> {
        if value.len() > MAX_COOKIE_VALUE_BYTES {
            return None;
        }
        let bytes = B64.decode(value).ok()?;
        let a: Attribution = serde_json::from_slice(&bytes).ok()?;
        a.is_valid().then_some(a)
    }

    /// Whether every value passes the same validation as a fact's own fields.
    pub fn is_valid(&self) -> bool {
        [&self.first, &self.last]
            .into_iter()
            .flatten()
            .all(|t| t.cid.as_deref().is_none_or(intake::valid_cid) && intake::valid_utm(&t.utm))
    }
}

/// Cookies of a request (every `Cookie` header), by name: the first well-formed occurrence wins.
pub fn cookie<'a>(headers: impl IntoIterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    headers.into_iter().flat_map(Cookie::split_parse).filter_map(Result::ok).find_map(|c| {
        // Cookies split from a borrowed header borrow their value from it.
        (c.name() == name).then(|| c.value_raw()).flatten()
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
        let mut c = Cookie::build((name.to_owned(), value.to_owned()))
            .path("/")
            .max_age(cookie::time::Duration::seconds(i64::try_from(max_age).unwrap_or(i64::MAX)))
            .same_site(SameSite::Lax)
            .http_only(true)
            .secure(self.secure);
        if let Some(d) = &self.domain {
            c = c.domain(d.clone());
        }
        c.build().to_string()
    }

    pub fn session(&self, id: &str) -> String {
        self.set(SESSION_COOKIE, id, self.session_max_age_secs)
    }

    pub fn attribution(&self, a: &Attribution) -> String {
        self.set(UTM_COOKIE, &a.encode(), ATTRIBUTION_MAX_AGE_SECS)
    }
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

    fn forged(json: &serde_json::Value) -> String {
        B64.encode(json.to_string())
    }

    #[test]
    fn forged_cookies_pass_the_same_validation_as_bodies() {
        let ok = serde_json::json!({"l": {"cid": "spring", "utm": {"source": "news"}, "at_ms": 5}});
        assert_eq!(Attribution::decode(&forged(&ok)).last.map(|t| t.utm), Some(utm("news")));
        for bad in [
            serde_json::json!({"l": {"utm": {"source": "x".repeat(257)}, "at_ms": 5}}),
            serde_json::json!({"f": {"utm": {"campaign": "a\u{0}b"}, "at_ms": 5}}),
            serde_json::json!({"l": {"utm": {"term": "sale\u{202E}fdp.exe"}, "at_ms": 5}}),
            serde_json::json!({"l": {"cid": "c".repeat(129), "at_ms": 5}}),
            serde_json::json!({"l": {"utm": {"source": 5}, "at_ms": 5}}),
        ] {
            assert_eq!(Attribution::try_decode(&forged(&bad)), None, "{bad}");
        }
        // Longer than a browser keeps: not even decoded (the padding field would be ignored).
        let long = serde_json::json!({"l": {"utm": {"source": "news"}, "at_ms": 5}, "pad": "p".repeat(3100)});
        assert!(forged(&long).len() > MAX_COOKIE_VALUE_BYTES);
        assert_eq!(Attribution::try_decode(&forged(&long)), None);
        let short = serde_json::json!({"l": {"utm": {"source": "news"}, "at_ms": 5}, "pad": "p".repeat(100)});
        assert!(Attribution::try_decode(&forged(&short)).is_some());
        // Padded values (another encoder) are read too.
        let padded = base64::engine::general_purpose::URL_SAFE.encode(ok.to_string());
        assert!(Attribution::try_decode(&padded).is_some());
    }

    proptest::proptest! {
        // Arbitrary cookie headers and values never panic the decoder, and whatever it returns
        // holds only values within the validation bounds.
        #[test]
        fn arbitrary_cookies_decode_within_bounds(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            json in proptest::collection::vec(proptest::prelude::any::<String>(), 4),
        ) {
            let header = String::from_utf8_lossy(&raw).into_owned();
            let _ = cookie([header.as_str()], UTM_COOKIE).map(Attribution::decode);
            let _ = Attribution::decode(&header);
            let shaped = serde_json::json!({"f": {"cid": json[0], "utm": {"source": json[1]}, "at_ms": 1},
                "l": {"utm": {"campaign": json[2], "content": json[3]}, "at_ms": 2}});
            for value in [forged(&shaped), B64.encode(&raw)] {
                let a = Attribution::decode(&value);
                for t in [&a.first, &a.last].into_iter().flatten() {
                    let values = [&t.cid, &t.utm.source, &t.utm.medium, &t.utm.campaign, &t.utm.term, &t.utm.content];
                    for v in values.into_iter().flatten() {
                        proptest::prop_assert!(v.chars().count() <= intake::MAX_UTM_CHARS);
                        proptest::prop_assert!(!v.chars().any(|c| c.is_control() || intake::is_bidi_control(c)));
                    }
                    if let Some(cid) = &t.cid {
                        proptest::prop_assert!(cid.chars().count() <= intake::MAX_ID_CHARS);
                    }
                }
            }
        }
    }

    #[test]
    fn cookies_and_session_ids() {
        let h = ["a=1; ef_sid=abc123; ef_utm=xyz"];
        assert_eq!(cookie(h, SESSION_COOKIE), Some("abc123"));
        assert_eq!(cookie(h, "missing"), None);
        assert_eq!(cookie(["broken", "x=1;ef_sid=s2"], SESSION_COOKIE), Some("s2"), "every Cookie header is read");
        assert!(valid_session_id("0f3a-b_c.d:e"));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id(""));
        assert_eq!(new_session_id().len(), 32);
        let p = CookiePolicy { domain: Some("example.com".into()), secure: true, session_max_age_secs: 1800 };
        let set = Cookie::parse(p.session("s")).unwrap();
        assert_eq!(
            (set.name(), set.value(), set.path(), set.domain()),
            ("ef_sid", "s", Some("/"), Some("example.com"))
        );
        assert_eq!(set.max_age(), Some(cookie::time::Duration::seconds(1800)));
        assert_eq!((set.same_site(), set.http_only(), set.secure()), (Some(SameSite::Lax), Some(true), Some(true)));
    }
}
