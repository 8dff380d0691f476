//! Tenants: client ids, their time zones and the tenancy policy.
//!
//! Every fact carries a `client_id` (CONTRACT.md §1). Days are calendar days in the client's
//! time zone, so the processor and the reader API both resolve a client to its [`Tz`] here.

use std::collections::BTreeMap;
use std::fmt;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// A validated client id: `[a-z0-9][a-z0-9_-]{0,63}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ClientId(String);

/// Why a string is not a client id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    #[error("client_id is empty")]
    Empty,
    #[error("client_id is longer than 64 characters")]
    TooLong,
    #[error("client_id must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    InvalidCharacters,
}

impl ClientId {
    /// Validates `raw` against the contract's pattern.
    pub fn parse(raw: &str) -> Result<Self, ClientIdError> {
        let bytes = raw.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(ClientIdError::Empty);
        };
        if bytes.len() > 64 {
            return Err(ClientIdError::TooLong);
        }
        let lower_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !lower_alnum(first) || !bytes[1..].iter().all(|b| lower_alnum(b) || *b == b'_' || *b == b'-') {
            return Err(ClientIdError::InvalidCharacters);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Eq, Ord and Hash of ClientId are those of the inner string, so map lookups by &str agree.
impl std::borrow::Borrow<str> for ClientId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClientId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ClientId::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Per-client settings (`[clients.<id>]` in the configuration file).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    /// IANA time zone whose calendar days bucket this client's facts. Defaults to
    /// `tenancy.default_timezone`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Reader-API bearer token for this client: `sha256:<hex>` (recommended, hashed at rest) or
    /// the plain token.
    #[serde(default)]
    pub token: Option<String>,
}

/// Tenancy policy (`[tenancy]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenancyConfig {
    /// Time zone of clients without their own `timezone`.
    #[serde(default = "default_timezone")]
    pub default_timezone: String,
    /// Accept facts for client ids that are not listed under `[clients]` (default false: the
    /// collector rejects them with reason `unknown_client`, so a flood of invented ids creates
    /// no tenant, no metric series and no reconcile work).
    #[serde(default)]
    pub allow_unknown_clients: bool,
}

fn default_timezone() -> String {
    "Asia/Seoul".to_owned()
}

impl Default for TenancyConfig {
    fn default() -> Self {
        Self { default_timezone: default_timezone(), allow_unknown_clients: false }
    }
}

/// Invalid tenancy configuration, reported at start-up rather than at first use.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("unknown time zone {zone:?} for {owner}")]
    UnknownTimeZone { zone: String, owner: String },
    #[error("invalid client id {id:?} under [clients]: {source}")]
    InvalidClientId { id: String, source: ClientIdError },
}

/// Resolved view of the tenancy configuration: which clients exist and their time zones.
#[derive(Debug, Clone)]
pub struct ClientDirectory {
    default_tz: Tz,
    allow_unknown: bool,
    clients: BTreeMap<ClientId, (Tz, ClientSettings)>,
}

impl ClientDirectory {
    /// Validates every client id and time zone up front.
    pub fn new(tenancy: &TenancyConfig, clients: &BTreeMap<String, ClientSettings>) -> Result<Self, TenancyError> {
        let parse_tz = |zone: &str, owner: &str| {
            zone.parse::<Tz>()
                .map_err(|_| TenancyError::UnknownTimeZone { zone: zone.to_owned(), owner: owner.to_owned() })
        };
        let default_tz = parse_tz(&tenancy.default_timezone, "tenancy.default_timezone")?;
        let mut resolved = BTreeMap::new();
        for (raw_id, settings) in clients {
            let id = ClientId::parse(raw_id)
                .map_err(|source| TenancyError::InvalidClientId { id: raw_id.clone(), source })?;
            let tz = match &settings.timezone {
                Some(zone) => parse_tz(zone, &format!("clients.{raw_id}"))?,
                None => default_tz,
            };
            resolved.insert(id, (tz, settings.clone()));
        }
        Ok(Self { default_tz, allow_unknown: tenancy.allow_unknown_clients, clients: resolved })
    }

    /// A directory with no configured clients: every client uses `Asia/Seoul`.
    pub fn permissive() -> Self {
        Self { default_tz: chrono_tz::Asia::Seoul, allow_unknown: true, clients: BTreeMap::new() }
    }

    /// Time zone whose calendar days bucket `client`'s facts.
    pub fn timezone(&self, client: &str) -> Tz {
        self.clients.get(client).map(|(tz, _)| *tz).unwrap_or(self.default_tz)
    }

    /// Whether the collector accepts facts for `client`.
    pub fn accepts(&self, client: &ClientId) -> bool {
        self.allow_unknown || self.clients.contains_key(client)
    }

    /// Whether `client` is configured under `[clients]`.
    pub fn is_known(&self, client: &ClientId) -> bool {
        self.clients.contains_key(client)
    }

    pub fn settings(&self, client: &ClientId) -> Option<&ClientSettings> {
        self.clients.get(client).map(|(_, settings)| settings)
    }

    /// Configured clients, in id order.
    pub fn clients(&self) -> impl Iterator<Item = &ClientId> {
        self.clients.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_pattern() {
        for ok in ["a", "acme", "acme-2_x", "0", &"a".repeat(64)] {
            assert!(ClientId::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(ClientId::parse(""), Err(ClientIdError::Empty));
        assert_eq!(ClientId::parse(&"a".repeat(65)), Err(ClientIdError::TooLong));
        for bad in ["-a", "_a", "Acme", "ac me", "a/b", "a'b", "é", "a\u{0}"] {
            assert_eq!(ClientId::parse(bad), Err(ClientIdError::InvalidCharacters), "{bad:?}");
        }
    }

    #[test]
    fn unknown_clients_are_refused_by_default() {
        let mut clients = BTreeMap::new();
        clients.insert("acme".to_owned(), ClientSettings::default());
        let dir = ClientDirectory::new(&TenancyConfig::default(), &clients).unwrap();
        assert!(dir.accepts(&ClientId::parse("acme").unwrap()));
        assert!(!dir.accepts(&ClientId::parse("intruder").unwrap()));
        let open = TenancyConfig { allow_unknown_clients: true, ..TenancyConfig::default() };
        assert!(ClientDirectory::new(&open, &clients).unwrap().accepts(&ClientId::parse("intruder").unwrap()));
    }

    #[test]
    fn directory_resolves_time_zones() {
        let mut clients = BTreeMap::new();
        clients.insert("ny".to_owned(), ClientSettings { timezone: Some("America/New_York".into()), token: None });
        clients.insert("kr".to_owned(), ClientSettings::default());
        let dir = ClientDirectory::new(&TenancyConfig::default(), &clients).unwrap();
        assert_eq!(dir.timezone("ny"), chrono_tz::America::New_York);
        assert_eq!(dir.timezone("kr"), chrono_tz::Asia::Seoul);
        assert_eq!(dir.timezone("other"), chrono_tz::Asia::Seoul);

        clients.insert("bad".to_owned(), ClientSettings { timezone: Some("Mars/Olympus".into()), token: None });
        assert!(matches!(
            ClientDirectory::new(&TenancyConfig::default(), &clients),
            Err(TenancyError::UnknownTimeZone { .. })
        ));
    }
}
