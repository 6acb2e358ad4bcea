//! The agent's configuration file: any text an operator could write.
//!
//! Checks: `Config::from_toml` never panics; a refusal points into the file (a line and column
//! that exist) and names the file; an accepted file holds what validation promises (absolute
//! paths, socket paths a Unix socket can hold and apart from each other, lifetimes within
//! bounds and `x509_svid_ttl <= ca_ttl`, sorted unique admin uids, and entries that are all
//! valid members of the trust domain, with sorted unique selectors, unique ids, and no two
//! with the same ID and selectors); and parsing is deterministic.
#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use spiffed_agent::config::{Config, MAX_ENTRIES};

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.toml");
    let cfg = match Config::from_toml(text, file) {
        Ok(cfg) => cfg,
        Err(e) => {
            let lines = text.split('\n').count();
            assert!(
                (1..=lines).contains(&e.line) && e.column >= 1,
                "error at {}:{} of a {lines}-line file: {e}",
                e.line,
                e.column
            );
            assert_eq!(e.file, file);
            assert!(e.to_string().starts_with("fuzz.toml:"), "{e}");
            assert!(!e.message.is_empty() && !e.fix.is_empty(), "{e}");
            // Deterministic: the same text gives the same first problem.
            let again = Config::from_toml(text, file).err().unwrap();
            assert_eq!(
                (again.line, again.column, again.key),
                (e.line, e.column, e.key)
            );
            return;
        }
    };
    for p in [&cfg.socket_path, &cfg.admin_socket_path, &cfg.data_dir] {
        assert!(p.is_absolute(), "{}", p.display());
    }
    for p in [&cfg.socket_path, &cfg.admin_socket_path] {
        assert!(p.as_os_str().len() <= 107, "{}", p.display());
    }
    assert_ne!(cfg.socket_path, cfg.admin_socket_path);
    assert_ne!(cfg.socket_path.parent(), cfg.admin_socket_path.parent());
    assert!(cfg.socket_mode <= 0o777, "{:o}", cfg.socket_mode);
    for ttl in [cfg.x509_svid_ttl, cfg.jwt_svid_ttl, cfg.ca_ttl] {
        assert!(ttl >= Duration::from_secs(1) && ttl <= TEN_YEARS, "{ttl:?}");
    }
    assert!(cfg.x509_svid_ttl <= cfg.ca_ttl);
    assert!(
        cfg.admin_uids.windows(2).all(|w| w[0] < w[1]),
        "{:?}",
        cfg.admin_uids
    );
    assert!(!cfg.admin_uids.contains(&u32::MAX));
    assert!(cfg.entries.len() <= MAX_ENTRIES);
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    for e in &cfg.entries {
        let rules = spiffed_core::EntryRules {
            trust_domain: &cfg.trust_domain,
            limits: spiffed_core::EntryLimits {
                max_selectors: cfg.max_selectors_per_entry,
                max_dns_names: cfg.max_dns_names_per_entry,
                min_svid_ttl: cfg.min_svid_ttl,
                ca_ttl: cfg.ca_ttl,
            },
            selectors: &spiffed_attest::builtin(),
        };
        e.check(&rules)
            .unwrap_or_else(|err| panic!("accepted entry {} is invalid: {err}", e.id));
        assert!(e.spiffe_id.is_member_of(&cfg.trust_domain));
        assert!(!e.selectors.is_empty());
        assert!(
            e.selectors.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            e.selectors
        );
        for s in &e.selectors {
            assert_eq!(&s.to_string().parse::<spiffed_core::Selector>().unwrap(), s);
        }
        if let Some(ttl) = e.x509_svid_ttl {
            assert!(ttl <= cfg.ca_ttl, "entry {} outlives the CA", e.id);
        }
        assert!(ids.insert(e.id.clone()), "duplicate id {}", e.id);
        assert!(
            keys.insert((e.spiffe_id.to_string(), e.selectors.clone())),
            "duplicate entry {}",
            e.id
        );
    }
    let again = Config::from_toml(text, file).unwrap();
    assert_eq!(again.summary(), cfg.summary());
    assert_eq!(again.entries, cfg.entries);
});
