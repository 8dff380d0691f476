//! Compact identities for in-memory sets.
//!
//! The processor keeps sets of sessions, visit `event_uid`s and entry ids for the open windows.
//! It stores 128-bit XXH3 hashes instead of the strings: 16 bytes per member whatever the id
//! length, and a collision probability around n²/2¹²⁹ (below 10⁻²⁶ for a billion members).

use xxhash_rust::xxh3::Xxh3;

/// 128-bit identity of `(scope, value)`; `scope` keeps equal values of different clients apart.
pub fn id128(scope: &str, value: &str) -> u128 {
    let mut h = Xxh3::new();
    h.update(scope.as_bytes());
    // Separator that cannot occur in a client id, so ("a", "bc") != ("ab", "c").
    h.update(&[0xff]);
    h.update(value.as_bytes());
    h.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_and_stable() {
        assert_eq!(id128("acme", "s1"), id128("acme", "s1"));
        assert_ne!(id128("acme", "s1"), id128("other", "s1"));
        assert_ne!(id128("a", "bc"), id128("ab", "c"));
    }
}
