//! Which clients get their own per-client series (`eventflow_visits_today{client}`,
//! `eventflow_reconcile_mismatch{client,...}`): the label set must stay bounded whatever client
//! ids arrive (with `tenancy.allow_unknown_clients`, anyone can invent one).
//!
//! Configured clients always have their own series; the other clients fill the remaining
//! places of `processor.metrics_max_clients` by rank (highest first, ties by client id), and the
//! rest are summed into one series `client="_other"` and counted in a `*_clients_folded` gauge,
//! as the API's quality gauges do (`api.quality_max_clients`).

use std::collections::BTreeSet;

/// The split of the unconfigured clients: those with their own series, and those folded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub own: BTreeSet<String>,
    pub folded: BTreeSet<String>,
}

/// Splits `candidates` (unconfigured clients with their rank) so that, with the `configured`
/// clients, at most `max` clients have their own series.
pub fn split<'a>(
    configured: &BTreeSet<String>,
    candidates: impl IntoIterator<Item = (&'a String, u64)>,
    max: usize,
) -> Split {
    let mut others: Vec<(&String, u64)> = candidates.into_iter().filter(|(c, _)| !configured.contains(*c)).collect();
    others.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let places = max.saturating_sub(configured.len());
    let mut out = Split::default();
    for (i, (client, _)) in others.into_iter().enumerate() {
        if i < places {
            out.own.insert(client.clone());
        } else {
            out.folded.insert(client.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn configured_clients_always_then_the_highest_ranked_others() {
        let configured = ids(&["acme", "globex"]);
        let ranks: Vec<(String, u64)> = [("c1", 1), ("c2", 5), ("c3", 5), ("c4", 9), ("acme", 0)]
            .iter()
            .map(|(c, v)| (c.to_string(), *v))
            .collect();
        let s = split(&configured, ranks.iter().map(|(c, v)| (c, *v)), 4);
        // Two places: c4 (9), then c2 and c3 tie at 5 and c2 wins by id.
        assert_eq!(s.own, ids(&["c2", "c4"]));
        assert_eq!(s.folded, ids(&["c1", "c3"]));
        // A cap at or below the configured clients folds every other client.
        let s = split(&configured, ranks.iter().map(|(c, v)| (c, *v)), 1);
        assert!(s.own.is_empty());
        assert_eq!(s.folded.len(), 4);
        // Room for everyone.
        let s = split(&configured, ranks.iter().map(|(c, v)| (c, *v)), 1000);
        assert_eq!((s.own.len(), s.folded.len()), (4, 0));
    }
}
