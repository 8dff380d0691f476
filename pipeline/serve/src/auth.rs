//! Bearer-token tenancy: each client's token reads only that client; the admin token reads all.
//!
//! Tokens are configured as `sha256:<hex>` (recommended: only the hash is at rest) or plain;
//! plain ones are hashed when the configuration is loaded. A presented token is hashed and
//! compared in constant time. Tokens never appear in logs or errors.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use eventflow_core::ClientDirectory;

type Hash = [u8; 32];

fn sha256(token: &str) -> Hash {
    Sha256::digest(token.as_bytes()).into()
}

/// `sha256:<hex>` or a plain token, as its hash.
fn parse_configured(value: &str) -> Result<Hash, String> {
    match value.strip_prefix("sha256:") {
        Some(h) => {
            let bytes = hex::decode(h.trim()).map_err(|_| "sha256: must be followed by 64 hex digits".to_owned())?;
            bytes.try_into().map_err(|_| "sha256: must be followed by 64 hex digits".to_owned())
        }
        None if value.len() < 16 => Err("tokens must be at least 16 characters".to_owned()),
        None => Ok(sha256(value)),
    }
}

fn constant_time_eq(a: &Hash, b: &Hash) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Client(String),
}

impl Principal {
    pub fn may_read(&self, client: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Client(c) => c == client,
        }
    }
}

/// The configured tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    admin: Option<Hash>,
    clients: BTreeMap<String, Hash>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("admin", &self.admin.is_some()).field("clients", &self.clients.len()).finish()
    }
}

impl Tokens {
    /// Loads the admin token and every `[clients.<id>] token`.
    pub fn new(admin: Option<&str>, clients: &ClientDirectory) -> Result<Self, String> {
        let admin = admin.map(|a| parse_configured(a).map_err(|e| format!("api.admin_token: {e}"))).transpose()?;
        let mut map = BTreeMap::new();
        for id in clients.clients() {
            if let Some(token) = clients.settings(id).and_then(|s| s.token.as_deref()) {
                map.insert(id.to_string(), parse_configured(token).map_err(|e| format!("clients.{id}.token: {e}"))?);
            }
        }
        Ok(Self { admin, clients: map })
    }

    /// Who presents `bearer`, if anyone.
    pub fn authenticate(&self, bearer: &str) -> Option<Principal> {
        let h = sha256(bearer);
        if self.admin.as_ref().is_some_and(|a| constant_time_eq(a, &h)) {
            return Some(Principal::Admin);
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

    #[test]
    fn admin_client_and_strangers() {
        let mut clients = BTreeMap::new();
        clients.insert(
            "acme".to_owned(),
            ClientSettings { timezone: None, token: Some(Tokens::hash_for_config("acme-secret-token-1")) },
        );
        clients.insert("beta".to_owned(), ClientSettings { timezone: None, token: Some("beta-plain-token-22".into()) });
        let dir = ClientDirectory::new(&TenancyConfig::default(), &clients).unwrap();
        let t = Tokens::new(Some("admin-token-0123456789"), &dir).unwrap();
        assert_eq!(t.authenticate("admin-token-0123456789"), Some(Principal::Admin));
        assert_eq!(t.authenticate("acme-secret-token-1"), Some(Principal::Client("acme".into())));
        assert_eq!(t.authenticate("beta-plain-token-22"), Some(Principal::Client("beta".into())));
        assert_eq!(t.authenticate("sha256:whatever"), None);
        assert!(Principal::Client("acme".into()).may_read("acme"));
        assert!(!Principal::Client("acme".into()).may_read("beta"));
        assert!(format!("{t:?}").find("secret").is_none());
        assert!(Tokens::new(Some("short"), &dir).is_err());
    }
}
