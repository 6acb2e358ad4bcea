//! The JWT-SVID cache: one token per (entry, audience set), bounded in bytes and per entry.
//!
//! A caller chooses its audiences, so without bounds one caller could fill memory with tokens
//! nobody will ask for again. Two limits apply, both least-recently-used first:
//! - per entry ([`JwtCacheLimits::entries_per_identity`]): a caller can only push out its own
//!   identity's tokens, never those of other workloads;
//! - in total ([`JwtCacheLimits::bytes`]): tokens, audiences and bookkeeping, estimated.
//!
//! An evicted token is simply minted again at the next request for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use spiffed_core::{Entry, EntryId, JwtSvid};

/// Default for [`JwtCacheLimits::bytes`]: 4 MiB, several thousand ordinary tokens.
pub const DEFAULT_JWT_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Default for [`JwtCacheLimits::entries_per_identity`]: far more audience sets than a
/// workload uses at a time.
pub const DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY: usize = 64;

/// Estimated bookkeeping per cached token (map nodes, `Arc`s, the slot), in bytes.
const SLOT_OVERHEAD: usize = 256;

/// How much the JWT-SVID cache may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwtCacheLimits {
    /// Most bytes of tokens, audiences and bookkeeping (estimated) held in total.
    pub bytes: usize,
    /// Most cached tokens (audience sets) per entry.
    pub entries_per_identity: usize,
}

impl Default for JwtCacheLimits {
    fn default() -> Self {
        Self {
            bytes: DEFAULT_JWT_CACHE_BYTES,
            entries_per_identity: DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY,
        }
    }
}

/// The cache key: the entry and its sorted, deduplicated audiences.
pub(crate) type JwtKey = (EntryId, Vec<String>);

/// One cached token.
pub(crate) struct JwtSlot {
    pub(crate) entry: Arc<Entry>,
    pub(crate) svid: Arc<JwtSvid>,
    pub(crate) refresh_at: SystemTime,
    /// Its place in the use order.
    stamp: u64,
    /// Its estimated cost.
    size: usize,
}

impl JwtSlot {
    pub(crate) fn new(entry: Arc<Entry>, svid: Arc<JwtSvid>, refresh_at: SystemTime) -> Self {
        Self {
            entry,
            svid,
            refresh_at,
            stamp: 0,
            size: 0,
        }
    }
}

/// The bounded cache (see the module docs).
#[derive(Default)]
pub(crate) struct JwtCache {
    limits: JwtCacheLimits,
    slots: HashMap<Arc<JwtKey>, JwtSlot>,
    /// Every key by last use, oldest first.
    order: BTreeMap<u64, Arc<JwtKey>>,
    /// Each entry's keys by last use, oldest first.
    by_entry: HashMap<EntryId, BTreeMap<u64, Arc<JwtKey>>>,
    bytes: usize,
    clock: u64,
}

fn cost(key: &JwtKey, svid: &JwtSvid) -> usize {
    SLOT_OVERHEAD
        + key.0.as_str().len()
        + key.1.iter().map(|a| a.len() + 24).sum::<usize>()
        + svid.token.len()
        + svid.spiffe_id.to_string().len()
}

impl JwtCache {
    /// Changes the limits; what no longer fits is evicted at once.
    pub(crate) fn set_limits(&mut self, limits: JwtCacheLimits) {
        self.limits = limits;
        while self.bytes > limits.bytes && self.evict_oldest() {}
        let over: Vec<EntryId> = self
            .by_entry
            .iter()
            .filter(|(_, keys)| keys.len() > limits.entries_per_identity)
            .map(|(id, _)| id.clone())
            .collect();
        for id in over {
            while self
                .by_entry
                .get(&id)
                .is_some_and(|k| k.len() > limits.entries_per_identity)
                && self.evict_oldest_of(&id)
            {}
        }
    }

    /// The cached token for `key`, marked as just used.
    pub(crate) fn get(&mut self, key: &JwtKey) -> Option<&JwtSlot> {
        self.clock += 1;
        let stamp = self.clock;
        let slot = self.slots.get_mut(key)?;
        let old = std::mem::replace(&mut slot.stamp, stamp);
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(stamp, k.clone());
            if let Some(mine) = self.by_entry.get_mut(&key.0) {
                mine.remove(&old);
                mine.insert(stamp, k);
            }
        }
        Some(slot)
    }

    /// Caches `slot` under `key`, evicting the least recently used tokens of the same entry,
    /// then of anyone, until it fits. A token larger than the whole budget is not cached.
    pub(crate) fn insert(&mut self, key: JwtKey, mut slot: JwtSlot) {
        self.remove(&key);
        let size = cost(&key, &slot.svid);
        if size > self.limits.bytes || self.limits.entries_per_identity == 0 {
            return;
        }
        while self
            .by_entry
            .get(&key.0)
            .is_some_and(|k| k.len() >= self.limits.entries_per_identity)
            && self.evict_oldest_of(&key.0)
        {}
        while self.bytes + size > self.limits.bytes && self.evict_oldest() {}
        self.clock += 1;
        slot.stamp = self.clock;
        slot.size = size;
        let key = Arc::new(key);
        self.order.insert(slot.stamp, key.clone());
        self.by_entry
            .entry(key.0.clone())
            .or_default()
            .insert(slot.stamp, key.clone());
        self.bytes += size;
        self.slots.insert(key, slot);
    }

    /// Keeps only the tokens for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&JwtKey, &JwtSlot) -> bool) {
        let gone: Vec<Arc<JwtKey>> = self
            .slots
            .iter()
            .filter(|(k, s)| !keep(k, s))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// How many tokens are cached.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The estimated bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, key: &JwtKey) {
        let Some(slot) = self.slots.remove(key) else {
            return;
        };
        self.order.remove(&slot.stamp);
        if let Some(mine) = self.by_entry.get_mut(&key.0) {
            mine.remove(&slot.stamp);
            if mine.is_empty() {
                self.by_entry.remove(&key.0);
            }
        }
        self.bytes = self.bytes.saturating_sub(slot.size);
        if self.slots.is_empty() {
            // Give the memory back after a burst.
            self.slots.shrink_to_fit();
            self.by_entry.shrink_to_fit();
        }
    }

    /// Evicts the least recently used token; false when empty.
    fn evict_oldest(&mut self) -> bool {
        let Some(key) = self.order.first_key_value().map(|(_, k)| k.clone()) else {
            return false;
        };
        self.remove(&key);
        true
    }

    /// Evicts the least recently used token of entry `id`; false when it has none.
    fn evict_oldest_of(&mut self, id: &EntryId) -> bool {
        let Some(key) = self
            .by_entry
            .get(id)
            .and_then(|m| m.first_key_value())
            .map(|(_, k)| k.clone())
        else {
            return false;
        };
        self.remove(&key);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use zeroize::Zeroizing;

    fn entry(id: &str) -> Arc<Entry> {
        Arc::new(Entry {
            id: EntryId::new(id),
            spiffe_id: format!("spiffe://example.org/{id}").parse().unwrap(),
            selectors: vec![],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        })
    }

    fn slot(e: &Arc<Entry>, token_len: usize) -> JwtSlot {
        let now = SystemTime::now();
        JwtSlot::new(
            e.clone(),
            Arc::new(JwtSvid {
                spiffe_id: e.spiffe_id.clone(),
                token: Zeroizing::new("t".repeat(token_len)),
                expiry: now + Duration::from_secs(300),
                issued_at: now,
            }),
            now + Duration::from_secs(150),
        )
    }

    fn key(e: &Arc<Entry>, aud: &str) -> JwtKey {
        (e.id.clone(), vec![aud.to_owned()])
    }

    #[test]
    fn one_identity_only_pushes_out_its_own_tokens() {
        let mut c = JwtCache::default();
        c.set_limits(JwtCacheLimits {
            bytes: 1 << 20,
            entries_per_identity: 4,
        });
        let (web, db) = (entry("web"), entry("db"));
        c.insert(key(&db, "db-aud"), slot(&db, 500));
        for i in 0..100 {
            c.insert(key(&web, &format!("aud{i}")), slot(&web, 500));
        }
        assert_eq!(c.len(), 5, "4 of web's, 1 of db's");
        assert!(c.get(&key(&db, "db-aud")).is_some(), "db's token survives");
        assert!(c.get(&key(&web, "aud99")).is_some());
        assert!(c.get(&key(&web, "aud95")).is_none(), "web's oldest went");
    }

    #[test]
    fn bytes_are_bounded_least_recently_used_first() {
        let mut c = JwtCache::default();
        let budget = 64 * 1024;
        c.set_limits(JwtCacheLimits {
            bytes: budget,
            entries_per_identity: 1000,
        });
        let entries: Vec<_> = (0..50).map(|i| entry(&format!("e{i}"))).collect();
        let hot = key(&entries[0], "hot");
        c.insert(hot.clone(), slot(&entries[0], 4000));
        for (i, e) in entries.iter().enumerate().skip(1) {
            // The hot token is used all along; the others once.
            assert!(c.get(&hot).is_some(), "hot token evicted at {i}");
            c.insert(key(e, &"a".repeat(4000)), slot(e, 6000));
            assert!(c.bytes() <= budget, "{} > {budget}", c.bytes());
        }
        assert!(c.len() < 10, "{} tokens in 64 KiB", c.len());
        assert!(c.get(&hot).is_some());
        // One token above the whole budget is served but never cached.
        c.insert(key(&entries[1], "huge"), slot(&entries[1], budget));
        assert!(c.get(&key(&entries[1], "huge")).is_none());
        assert!(c.bytes() <= budget);
        // Expiry sweeps and lower limits apply to what is held.
        c.retain(|k, _| k == &hot);
        assert_eq!(c.len(), 1);
        c.set_limits(JwtCacheLimits {
            bytes: 100,
            entries_per_identity: 1,
        });
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }
}
