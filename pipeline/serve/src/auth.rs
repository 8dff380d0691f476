//! Bearer-token tenancy: each client's token reads only that client; the admin token reads all;
//! the optional metrics token reads `/metrics` in full and nothing else.
//!
//! Tokens are configured as `sha256:<hex>` (recommended: only the hash is at rest) or plain;
//! plain ones are hashed when the configuration is loaded. A presented token is hashed and
//! compared in constant time. Tokens never appear in logs or errors.
//!
//! Every token meets one strength rule ([`check_strength`]: at least 24 characters and about 96
//! bits by a character-frequency estimate), whatever its form: a plain token is checked when the
//! configuration is loaded; a hashed one cannot be, so it is checked where the token itself is
//! seen: `eventflow hash-token` refuses to hash a weak token, a presented token that fails the
//! rule never authenticates (so the hash of `test` is useless even if configured), and hashes
//! of well-known placeholders (`test`, `change-me`, ...) are refused at load with the key named.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use eventflow_core::ClientDirectory;

type Hash = [u8; 32];

fn sha256(token: &str) -> Hash {
    Sha256::digest(token.as_bytes()).into()
}

/// Shortest accepted token, in characters.
pub const MIN_TOKEN_CHARS: usize = 24;
/// Least accepted estimated entropy of a token, in bits ([`estimated_bits`]).
pub const MIN_TOKEN_BITS: f64 = 96.0;
/// Longest token looked at when presented (longer ones never authenticate).
const MAX_TOKEN_CHARS: usize = 512;

/// Tokens that appeared in examples and manifests, or that people type as placeholders: their
/// `sha256:` forms are refused in a configuration.
const KNOWN_WEAK: &[&str] = &[
    "",
    "test",
    "testing",
    "token",
    "secret",
    "password",
    "admin",
    "changeme",
    "change-me",
    "change_me",
    "example",
    "placeholder",
    "eventflow",
    "eventflow-admin-dev-token",
    "demo",
    "default",
    "letmein",
    "123456",
    "12345678",
    "x",
];

/// Entropy estimate of `token` in bits: its length times the Shannon entropy of its own
/// character frequencies. Repetition and small alphabets score low (`aaaa...` 0 bits,
/// `passwordpasswordpassword` about 66); 32 random hex digits score about 120.
pub fn estimated_bits(token: &str) -> f64 {
    let mut counts: HashMap<char, usize> = HashMap::new();
    let mut n = 0usize;
    for c in token.chars() {
        *counts.entry(c).or_default() += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n_f = n as f64;
    let per_char: f64 = counts.values().map(|&k| (k as f64 / n_f) * (n_f / k as f64).log2()).sum();
    per_char * n_f
}

/// The strength rule every token meets (see the module documentation).
pub fn check_strength(token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("tokens must not contain spaces or control characters".to_owned());
    }
    if n < MIN_TOKEN_CHARS {
        return Err(format!(
            "tokens must be at least {MIN_TOKEN_CHARS} characters (this one has {n}); generate one with `eventflow hash-token`"
        ));
    }
    let bits = estimated_bits(token);
    if bits < MIN_TOKEN_BITS {
        return Err(format!(
            "token too predictable (about {bits:.0} bits estimated from its characters, at least {MIN_TOKEN_BITS:.0} needed: \
             avoid repetition and few distinct characters); generate one with `eventflow hash-token`"
        ));
    }
    Ok(())
}

/// `sha256:<hex>` or a plain token, as its hash; `None` for an empty value (not set).
fn parse_configured(value: &str) -> Result<Option<Hash>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    match value.strip_prefix("sha256:") {
        Some(h) => {
            let bytes = hex::decode(h.trim()).map_err(|_| {
                "sha256: must be followed by 64 hex digits (the output of `eventflow hash-token`)".to_owned()
            })?;
            let hash: Hash = bytes.try_into().map_err(|_| {
                "sha256: must be followed by 64 hex digits (the output of `eventflow hash-token`)".to_owned()
            })?;
            if KNOWN_WEAK.iter().any(|w| constant_time_eq(&sha256(w), &hash)) {
                return Err(
                    "is the sha256 form of a well-known placeholder token (such as \"test\"); generate a real \
                            one with `eventflow hash-token`"
                        .to_owned(),
                );
            }
            Ok(Some(hash))
        }
        None => {
            check_strength(value)?;
            Ok(Some(sha256(value)))
        }
    }
}

fn constant_time_eq(a: &Hash, b: &Hash) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    /// The scrape-only token (`api.metrics_token`): `/metrics` in full, no client.
    Metrics,
    Client(String),
}

impl Principal {
    pub fn may_read(&self, client: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Metrics => false,
            Principal::Client(c) => c == client,
        }
    }

    /// Whether `/metrics` may list tenants (client-labelled series) to this principal.
    pub fn may_scrape_tenants(&self) -> bool {
        matches!(self, Principal::Admin | Principal::Metrics)
    }
}

/// The configured tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    admin: Option<Hash>,
    metrics: Option<Hash>,
    clients: BTreeMap<String, Hash>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("admin", &self.admin.is_some())
            .field("metrics", &self.metrics.is_some())
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Tokens {
    /// Loads the admin token, the metrics token and every `[clients.<id>] token`; an error
    /// names the key. Empty values count as not set.
    pub fn new(admin: Option<&str>, metrics: Option<&str>, clients: &ClientDirectory) -> Result<Self, String> {
        let admin =
            admin.map(|a| parse_configured(a).map_err(|e| format!("api.admin_token: {e}"))).transpose()?.flatten();
        let metrics =
            metrics.map(|a| parse_configured(a).map_err(|e| format!("api.metrics_token: {e}"))).transpose()?.flatten();
        let mut map = BTreeMap::new();
        for id in clients.clients() {
            if let Some(token) = clients.settings(id).and_then(|s| s.token.as_deref()) {
                if let Some(hash) = parse_configured(token).map_err(|e| format!("clients.{id}.token: {e}"))? {
                    map.insert(id.to_string(), hash);
                }
            }
        }
        Ok(Self { admin, metrics, clients: map })
    }

    /// Who presents `bearer`, if anyone. A token that fails [`check_strength`] is nobody,
    /// whatever is configured.
    pub fn authenticate(&self, bearer: &str) -> Option<Principal> {
        if bearer.len() > MAX_TOKEN_CHARS || check_strength(bearer).is_err() {
            return None;
        }
        let h = sha256(bearer);
        if self.admin.as_ref().is_some_and(|a| constant_time_eq(a, &h)) {
            return Some(Principal::Admin);
        }
        if self.metrics.as_ref().is_some_and(|a| constant_time_eq(a, &h)) {
            return Some(Principal::Metrics);
        }
        // Compare against every client (no early exit on the first byte).
        let mut found = None;
        for (client, stored) in &self.clients {
            if constant_time_eq(stored, &h) {
                found = Some(Principal::Client(client.clone()));
            }
        }
        found
    }

    /// `sha256:<hex>` form of a token, for configuration files (`eventflow token hash`).
    pub fn hash_for_config(token: &str) -> String {
        format!("sha256:{}", hex::encode(sha256(token)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventflow_core::{ClientSettings, TenancyConfig};

    const ADMIN: &str = "admin-Qx7mK2pV9rLt4ZwN8cHd";
    const ACME: &str = "acme-secret-R3vB8nM1qT6yW0kF";
    const BETA: &str = "beta-plain-J5hG2xC9sD4aE7uP";
    const SCRAPE: &str = "scrape-L8pN3vQ6tY1mR4wZ5kX";

    fn directory(tokens: &[(&str, &str)]) -> ClientDirectory {
        let clients = tokens
            .iter()
            .map(|(id, t)| ((*id).to_owned(), ClientSettings { timezone: None, token: Some((*t).to_owned()) }))
            .collect();
        ClientDirectory::new(&TenancyConfig::default(), &clients).unwrap()
    }

    #[test]
    fn admin_metrics_client_and_strangers() {
        let dir = directory(&[("acme", &Tokens::hash_for_config(ACME)), ("beta", BETA)]);
        let t = Tokens::new(Some(ADMIN), Some(SCRAPE), &dir).unwrap();
        assert_eq!(t.authenticate(ADMIN), Some(Principal::Admin));
        assert_eq!(t.authenticate(SCRAPE), Some(Principal::Metrics));
        assert_eq!(t.authenticate(ACME), Some(Principal::Client("acme".into())));
        assert_eq!(t.authenticate(BETA), Some(Principal::Client("beta".into())));
        assert_eq!(t.authenticate("sha256:whatever"), None);
        assert!(Principal::Client("acme".into()).may_read("acme"));
        assert!(!Principal::Client("acme".into()).may_read("beta"));
        assert!(!Principal::Metrics.may_read("acme") && Principal::Metrics.may_scrape_tenants());
        assert!(!Principal::Client("acme".into()).may_scrape_tenants());
        assert!(format!("{t:?}").find("secret").is_none());
        // Empty values are "not set".
        let t = Tokens::new(Some(""), None, &directory(&[("acme", "")])).unwrap();
        assert_eq!(t.authenticate(ADMIN), None);
    }

    #[test]
    fn every_token_form_meets_the_same_rule_and_errors_name_the_key() {
        let dir = directory(&[]);
        for weak in
            ["short", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "passwordpasswordpassword", "change-me-change-me-change-me"]
        {
            let err = Tokens::new(Some(weak), None, &dir).unwrap_err();
            assert!(err.starts_with("api.admin_token: "), "{weak}: {err}");
            let err = Tokens::new(None, Some(weak), &dir).unwrap_err();
            assert!(err.starts_with("api.metrics_token: "), "{weak}: {err}");
        }
        // The hash of "test" (shipped in the manifests before) and of "change-me" are refused.
        for placeholder in ["test", "change-me"] {
            let dir = directory(&[("acme", &Tokens::hash_for_config(placeholder))]);
            let err = Tokens::new(None, None, &dir).unwrap_err();
            assert!(err.starts_with("clients.acme.token: ") && err.contains("placeholder"), "{err}");
        }
        let err = Tokens::new(None, None, &directory(&[("acme", "sha256:<run eventflow hash-token>")])).unwrap_err();
        assert!(err.starts_with("clients.acme.token: sha256: must be followed by 64 hex digits"), "{err}");
        // Whatever hash is configured, a weak presented token is nobody.
        let sneaky = Tokens { admin: Some(sha256("weak")), ..Tokens::default() };
        assert_eq!(sneaky.authenticate("weak"), None);
        assert_eq!(sneaky.authenticate(&"y".repeat(600)), None);
    }

    #[test]
    fn the_entropy_estimate_separates_random_from_repetitive() {
        assert_eq!(estimated_bits(""), 0.0);
        assert_eq!(estimated_bits("aaaaaaaaaaaa"), 0.0);
        assert!((estimated_bits("abababababababababababab") - 24.0).abs() < 1e-9);
        assert!(estimated_bits("0f3a9c1d7e5b2468acef1357bd02ce4f") > 110.0);
        assert!(check_strength("0f3a9c1d7e5b2468acef1357bd02ce4f").is_ok());
        assert!(check_strength("has a space in it 0123456789abcdef").is_err());
    }
}
