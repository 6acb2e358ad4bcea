//! JWT-SVIDs from the server: the cache per (SPIFFE ID, audience set), and what is read from a
//! token the server signed (its `kid`, `sub`, `exp`, `iat`).
//!
//! The cache is bounded by count (spire-agent's `jwt_svid_cache_max_size`, 1000 by default),
//! least recently used first. A token is served from it until half its lifetime has passed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Map, Value};
use spiffed_core::JwtSvid;

/// The cache key: the SPIFFE ID and the sorted, de-duplicated audiences.
pub(crate) type JwtKey = (String, Vec<String>);

/// One cached token.
pub(crate) struct Cached {
    pub(crate) svid: Arc<JwtSvid>,
    /// Served from the cache until then (half its lifetime).
    pub(crate) refresh_at: SystemTime,
    /// The key that signed it.
    pub(crate) kid: String,
    stamp: u64,
}

/// The bounded cache.
pub(crate) struct JwtCache {
    max: usize,
    slots: HashMap<Arc<JwtKey>, Cached>,
    /// Keys by last use, oldest first.
    order: BTreeMap<u64, Arc<JwtKey>>,
    clock: u64,
}

impl JwtCache {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            slots: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
        }
    }

    /// The cached token for `key`, marked as just used.
    pub(crate) fn get(&mut self, key: &JwtKey) -> Option<&Cached> {
        self.clock += 1;
        let stamp = self.clock;
        let slot = self.slots.get_mut(key)?;
        let old = std::mem::replace(&mut slot.stamp, stamp);
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(stamp, k);
        }
        Some(slot)
    }

    /// Caches a token, evicting the least recently used beyond the bound.
    pub(crate) fn insert(
        &mut self,
        key: JwtKey,
        svid: Arc<JwtSvid>,
        refresh_at: SystemTime,
        kid: String,
    ) {
        self.remove(&key);
        if self.max == 0 {
            return;
        }
        while self.slots.len() >= self.max {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.slots.remove(&oldest);
        }
        self.clock += 1;
        let key = Arc::new(key);
        self.order.insert(self.clock, key.clone());
        self.slots.insert(
            key,
            Cached {
                svid,
                refresh_at,
                kid,
                stamp: self.clock,
            },
        );
    }

    /// Keeps only the tokens for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Cached) -> bool) {
        let gone: Vec<Arc<JwtKey>> = self
            .slots
            .iter()
            .filter(|(_, c)| !keep(c))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.order.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    fn remove(&mut self, key: &JwtKey) {
        if let Some(c) = self.slots.remove(key) {
            self.order.remove(&c.stamp);
        }
    }
}

/// What the agent reads from a token (it does not verify it: the server just signed it, and
/// its key may not be in the bundle yet).
#[derive(Debug, Default)]
pub(crate) struct TokenInfo {
    pub(crate) kid: String,
    pub(crate) sub: Option<String>,
    pub(crate) exp: Option<i64>,
    pub(crate) iat: Option<i64>,
}

fn part(token: &str, i: usize, what: &str) -> Result<Map<String, Value>, String> {
    let p = token
        .split('.')
        .nth(i)
        .ok_or_else(|| format!("the token has no {what}"))?;
    let bytes = B64URL
        .decode(p)
        .map_err(|_| format!("the token's {what} is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(format!("the token's {what} is not a JSON object")),
    }
}

fn number(m: &Map<String, Value>, name: &str) -> Option<i64> {
    match m.get(name)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        _ => None,
    }
}

/// Reads the header's `kid` and the payload's `sub`, `exp` and `iat`.
pub(crate) fn token_info(token: &str) -> Result<TokenInfo, String> {
    if token.split('.').count() != 3 {
        return Err("the token is not a JWS in compact form (three parts)".into());
    }
    let header = part(token, 0, "header")?;
    let payload = part(token, 1, "payload")?;
    Ok(TokenInfo {
        kid: header
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        sub: payload
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_owned),
        exp: number(&payload, "exp"),
        iat: number(&payload, "iat"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::SpiffeId;
    use std::time::Duration;
    use zeroize::Zeroizing;

    fn svid(n: usize) -> Arc<JwtSvid> {
        Arc::new(JwtSvid {
            spiffe_id: SpiffeId::new(format!("spiffe://td/w{n}")).unwrap(),
            token: Zeroizing::new(format!("t{n}")),
            expiry: SystemTime::now() + Duration::from_secs(300),
            issued_at: SystemTime::now(),
        })
    }

    #[test]
    fn the_cache_is_bounded_least_recently_used_first() {
        let mut c = JwtCache::new(3);
        let key = |n: usize| (format!("spiffe://td/w{n}"), vec!["a".to_owned()]);
        let later = SystemTime::now() + Duration::from_secs(150);
        for n in 0..3 {
            c.insert(key(n), svid(n), later, "k".into());
        }
        assert!(c.get(&key(0)).is_some(), "0 is used again");
        c.insert(key(3), svid(3), later, "k".into());
        assert_eq!(c.len(), 3);
        assert!(c.get(&key(1)).is_none(), "1 was the least recently used");
        assert!(c.get(&key(0)).is_some() && c.get(&key(3)).is_some());
        c.retain(|t| t.svid.token.as_str() != "t0");
        assert!(c.get(&key(0)).is_none());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn token_claims_are_read_and_garbage_is_an_error() {
        let h = B64URL.encode(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
        let p = B64URL.encode(r#"{"sub":"spiffe://td/w","aud":["a"],"exp":200,"iat":100}"#);
        let info = token_info(&format!("{h}.{p}.sig")).unwrap();
        assert_eq!(info.kid, "k1");
        assert_eq!(info.sub.as_deref(), Some("spiffe://td/w"));
        assert_eq!((info.exp, info.iat), (Some(200), Some(100)));
        assert!(token_info("a.b").is_err());
        assert!(token_info("!!.??.x").is_err());
        assert!(token_info(&format!("{h}.{}.x", B64URL.encode("[1]"))).is_err());
    }
}
