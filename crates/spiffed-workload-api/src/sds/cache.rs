//! SDS resources built once and shared by every stream that sends them.
//!
//! A rotation wakes every stream of a workload at once; each used to PEM-encode the same chain
//! and key and pack the same secrets. What a stream sends is determined by the workload's
//! snapshot fingerprint (entry, serial, hint and federation of each SVID, and the bundle set
//! sequence), the names it asked for and its validation form, so that triple keys the cache;
//! only the version and nonce are the stream's own.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use envoy_types::pb::google::protobuf::Any;

use super::Validation;
use super::wire::Resources;
use crate::ApiError;
use crate::service::X509Fingerprint;

/// Most fingerprints kept; the cache starts afresh when full, or when the bundle set changes
/// (every older entry is then stale).
const MAX_FINGERPRINTS: usize = 256;
/// Most (names, validation) variants kept per fingerprint; past this, answers are built but
/// not kept (a client cycling through names cannot grow the cache).
const MAX_VARIANTS: usize = 8;

type Variant = (Vec<String>, Validation, Resources);

/// The cache, shared by the SDS service's clones.
#[derive(Default)]
pub(super) struct Cache {
    by_fingerprint: Mutex<HashMap<X509Fingerprint, Vec<Variant>>>,
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, HashMap<X509Fingerprint, Vec<Variant>>> {
        // A cache is valid after any panic mid-update.
        self.by_fingerprint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The resources for `names` in `validation` form for the snapshot `fp`, from the cache or
    /// made by `build` (a refusal is not kept: it is rare, and its log must name the caller).
    pub(super) fn get_or_build(
        &self,
        fp: &X509Fingerprint,
        names: &BTreeSet<String>,
        validation: Validation,
        build: impl FnOnce() -> Result<Vec<Any>, ApiError>,
    ) -> Result<Resources, ApiError> {
        let matches = |v: &&Variant| v.1 == validation && v.0.iter().eq(names.iter());
        if let Some(hit) = self.lock().get(fp).and_then(|vs| vs.iter().find(matches)) {
            return Ok(hit.2.clone());
        }
        let built = Resources::new(build()?);
        let mut cache = self.lock();
        let stale = cache.keys().next().is_some_and(|(_, seq)| *seq != fp.1);
        if stale || (cache.len() >= MAX_FINGERPRINTS && !cache.contains_key(fp)) {
            cache.clear();
        }
        let variants = cache.entry(fp.clone()).or_default();
        if variants.iter().find(matches).is_none() && variants.len() < MAX_VARIANTS {
            variants.push((names.iter().cloned().collect(), validation, built.clone()));
        }
        Ok(built)
    }

    /// How many fingerprints are kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn fp(serial: u8, seq: u64) -> X509Fingerprint {
        (
            vec![(spiffed_core::EntryId::new("e1"), vec![serial], None, vec![])],
            seq,
        )
    }

    fn names(ns: &[&str]) -> BTreeSet<String> {
        ns.iter().map(|n| (*n).to_owned()).collect()
    }

    fn any(v: &str) -> Vec<Any> {
        vec![Any {
            type_url: "t".into(),
            value: v.as_bytes().to_vec(),
        }]
    }

    #[test]
    fn one_build_per_snapshot_names_and_form() {
        let cache = Cache::default();
        let builds = AtomicUsize::new(0);
        let get = |f: &X509Fingerprint, n: &[&str], v: Validation| {
            cache
                .get_or_build(f, &names(n), v, || {
                    builds.fetch_add(1, Ordering::Relaxed);
                    Ok(any(&format!("{n:?}{v:?}")))
                })
                .unwrap()
        };
        let a = get(&fp(1, 1), &["default"], Validation::Spiffe);
        let b = get(&fp(1, 1), &["default"], Validation::Spiffe);
        assert_eq!(b, a);
        assert_eq!(
            builds.load(Ordering::Relaxed),
            1,
            "a second stream reuses it"
        );
        // Other names, another form, another SVID: each is built.
        get(&fp(1, 1), &["ROOTCA", "default"], Validation::Spiffe);
        get(&fp(1, 1), &["default"], Validation::TrustedCa);
        get(&fp(2, 1), &["default"], Validation::Spiffe);
        assert_eq!(builds.load(Ordering::Relaxed), 4);
        assert_eq!(cache.len(), 2);
        // A new bundle set makes every older answer stale.
        get(&fp(2, 2), &["default"], Validation::Spiffe);
        assert_eq!(builds.load(Ordering::Relaxed), 5);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn refusals_are_not_kept_and_the_cache_is_bounded() {
        let cache = Cache::default();
        let e = cache.get_or_build(&fp(1, 1), &names(&["x"]), Validation::Spiffe, || {
            Err(ApiError::SdsNotAuthorized(vec!["x".into()]))
        });
        assert!(e.is_err());
        assert_eq!(cache.len(), 0);
        for s in 0..=MAX_FINGERPRINTS {
            let f = (
                vec![(
                    spiffed_core::EntryId::new(format!("e{s}")),
                    vec![1],
                    None,
                    vec![],
                )],
                1,
            );
            cache
                .get_or_build(&f, &names(&[]), Validation::Spiffe, || Ok(any("r")))
                .unwrap();
            assert!(cache.len() <= MAX_FINGERPRINTS);
        }
        // Variants per fingerprint are bounded too; the ones past the bound are still served.
        let f = fp(9, 1);
        for i in 0..MAX_VARIANTS + 3 {
            let n = format!("n{i}");
            let got = cache
                .get_or_build(&f, &names(&[&n]), Validation::Spiffe, || Ok(any(&n)))
                .unwrap();
            assert_eq!(got, Resources::new(any(&n)));
        }
        assert_eq!(cache.lock().get(&f).map(Vec::len), Some(MAX_VARIANTS));
    }
}
