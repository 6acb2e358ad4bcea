//! Selector strings, as the config file, the admin API and `entry create` take them.
//!
//! Checks, for every input:
//! - parse and display round-trip both ways: `display(parse(s)) == s` and
//!   `parse(display(x)) == x`, and `Selector::new(kind, value)` rebuilds the same selector;
//! - the built-in attestor plugins' check (`spiffed_attest::builtin()`) never panics, refuses
//!   exactly the types no plugin owns as `UnknownType` (listing the configured types), and
//!   gives the same answer for the re-parsed selector;
//! - the three ways a selector reaches the agent agree: `str::parse` followed by the plugins'
//!   check, an entry in the config file (TOML-escaped) and an admin `EntrySpec` either all
//!   accept it, as the same selector, or all refuse it.
#![no_main]

#[path = "common.rs"]
mod common;

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use spiffed_agent::config::Config;
use spiffed_attest::CompositeAttestor;
use spiffed_core::{Selector, SelectorCheck, SelectorError};
use spiffed_proto::admin as pb;

/// The plugins the agent runs by default, built once.
static PLUGINS: LazyLock<CompositeAttestor> = LazyLock::new(spiffed_attest::builtin);

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = s.parse::<Selector>();
    if let Ok(sel) = &parsed {
        assert_eq!(sel.to_string(), s, "display(parse(s)) != s");
        assert_eq!(&sel.to_string().parse::<Selector>().unwrap(), sel);
        assert_eq!(&Selector::new(sel.kind(), sel.value()).unwrap(), sel);
        assert!(
            s.starts_with(&sel.kind_key()),
            "kind_key {}",
            sel.kind_key()
        );
        assert!(!sel.value().is_empty() && !sel.kind().contains(':'));

        let checked = PLUGINS.check(sel);
        let owned = PLUGINS.types().any(|t| t == sel.kind());
        match &checked {
            Err(SelectorError::UnknownType { selector, known }) => {
                assert!(!owned, "{selector} refused as of unknown type");
                assert_eq!(known, "\"unix\" and \"systemd\"");
            }
            Err(SelectorError::Shape(_)) => panic!("check refused a parsed selector's shape"),
            _ => assert!(owned, "type {} accepted without a plugin", sel.kind()),
        }
        assert_eq!(
            PLUGINS.check(&sel.to_string().parse::<Selector>().unwrap()),
            checked
        );
    }
    // What the config file and the admin API accept: well-shaped, and fine with its plugin.
    let parsed = parsed.and_then(|sel| PLUGINS.check(&sel).map(|()| sel));

    let td = common::td();
    // The config file.
    let text = format!(
        "trust_domain = \"example.org\"\n[[entries]]\nspiffe_id = \"spiffe://example.org/fuzz\"\nselectors = [{}]\n",
        common::toml_string(s)
    );
    let from_config = Config::from_toml(&text, Path::new("fuzz.toml"));
    match (&parsed, &from_config) {
        (Ok(sel), Ok(cfg)) => {
            assert_eq!(cfg.entries.len(), 1);
            assert_eq!(cfg.entries[0].selectors, [sel.clone()]);
        }
        (Err(_), Err(e)) => assert_eq!(e.key, "entries[0].selectors[0]", "{e}"),
        (p, c) => panic!("parse: {p:?}, config file: {:?}", c.as_ref().map(|_| ())),
    }

    // The admin API.
    let spec = pb::EntrySpec {
        spiffe_id: "spiffe://example.org/fuzz".into(),
        selectors: vec![s.to_owned()],
        ..Default::default()
    };
    let from_admin = common::check_spec(&spec, &td);
    match (&parsed, from_admin) {
        (Ok(sel), Some(spec)) => assert_eq!(spec.selectors, [sel.clone()]),
        (Err(_), None) => {}
        (p, a) => panic!("parse: {p:?}, admin: {a:?}"),
    }
});
