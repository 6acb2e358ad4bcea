//! JWT-SVID validation (`ValidateJWTSVID`): a token and an audience from any local caller,
//! through the authority's validation with a real key set (a CA and JWT key made once per
//! process in a temporary data dir).
//!
//! The first byte picks the mode:
//! - 0: the rest is `token \0 audience`, as sent;
//! - 1: the rest is `header \0 payload \0 signature`, each base64url-encoded here so the
//!   fuzzer reaches the JSON and the key lookup (`$KID` in the header becomes the real kid);
//! - 2: the rest is `audience \0 audience ... \0 mutation`: a token is minted for those
//!   audiences, then bytes of it are XORed as the mutation says.
//!
//! Checks: no token the authority did not sign is ever accepted (modes 0 and 1 never pass;
//! in mode 2 an accepted mutation signs exactly what the original signed); a minted token is
//! accepted for each of its audiences, with its subject and those claims, and refused for any
//! other audience.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use libfuzzer_sys::fuzz_target;
use spiffed_authority::{AuthorityConfig, CaAuthority, NewRootPolicy};
use spiffed_core::{Entry, EntryId, Issuer, JwtError, Selector, ValidatedJwt};

struct Fixture {
    _dir: tempfile::TempDir,
    authority: CaAuthority,
    entry: Arc<Entry>,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let td = "example.org".parse().unwrap();
        let authority = CaAuthority::open(AuthorityConfig {
            trust_domain: td,
            data_dir: dir.path().join("data"),
            ca_ttl: Duration::from_secs(24 * 3600),
            x509_svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(300),
            new_root: NewRootPolicy::Refuse,
            premint_entries: 0,
            upstream: None,
        })
        .unwrap();
        let entry = Arc::new(Entry {
            id: EntryId::new("fuzz"),
            spiffe_id: "spiffe://example.org/fuzz".parse().unwrap(),
            selectors: vec!["unix:uid:0".parse::<Selector>().unwrap()],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
        });
        Fixture {
            _dir: dir,
            authority,
            entry,
            runtime: tokio::runtime::Builder::new_current_thread().build().unwrap(),
        }
    })
}

/// The part of a compact JWS that its signature covers.
fn signed_part(token: &str) -> &str {
    token.rfind('.').map_or(token, |i| &token[..i])
}

/// What an accepted token must carry: our entry's subject and the audience asked for.
fn check_accepted(fx: &Fixture, v: &ValidatedJwt, audience: &str) {
    assert_eq!(v.spiffe_id, fx.entry.spiffe_id);
    let claims = std::str::from_utf8(&v.claims_json).unwrap();
    assert!(claims.starts_with('{'), "{claims}");
    assert!(
        claims.contains(&format!("\"sub\":\"{}\"", fx.entry.spiffe_id)),
        "{claims}"
    );
    // The audience appears in the claims (JSON-escaped the way serde_json writes strings).
    let plain = audience
        .chars()
        .all(|c| c != '"' && c != '\\' && !c.is_control());
    if plain {
        assert!(
            claims.contains(&format!("\"{audience}\"")),
            "{audience:?} not in {claims}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    match mode % 3 {
        0 => {
            let mut parts = rest.splitn(2, |&b| b == 0);
            let (Some(token), audience) = (parts.next(), parts.next().unwrap_or_default()) else {
                return;
            };
            let (Ok(token), Ok(audience)) =
                (std::str::from_utf8(token), std::str::from_utf8(audience))
            else {
                return;
            };
            if let Ok(v) = fx.authority.validate_jwt(token, audience) {
                panic!("accepted a token we never signed: {token:?} -> {v:?}");
            }
        }
        1 => {
            let mut parts = rest.splitn(3, |&b| b == 0);
            let (header, payload, sig) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let kid = fx
                .authority
                .bundles()
                .borrow()
                .own()
                .jwt
                .keys
                .first()
                .map(|k| k.kid.clone())
                .unwrap_or_default();
            let header = String::from_utf8_lossy(header).replace("$KID", &kid);
            let token = format!(
                "{}.{}.{}",
                B64URL.encode(header),
                B64URL.encode(payload),
                B64URL.encode(sig)
            );
            if let Ok(v) = fx.authority.validate_jwt(&token, "fuzz") {
                panic!("accepted a token we never signed: {token:?} -> {v:?}");
            }
        }
        _ => minted(fx, rest),
    }
});

fn minted(fx: &Fixture, rest: &[u8]) {
    let mut pieces: Vec<&[u8]> = rest.split(|&b| b == 0).collect();
    let mutation = pieces.pop().unwrap_or_default();
    let audiences: Vec<String> = pieces
        .iter()
        .take(8)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| !a.is_empty())
        .collect();
    if audiences.is_empty() {
        return;
    }
    let svid = fx
        .runtime
        .block_on(fx.authority.jwt_svid(&fx.entry, &audiences))
        .unwrap();
    let token: &str = &svid.token;
    for a in &audiences {
        let v = fx
            .authority
            .validate_jwt(token, a)
            .unwrap_or_else(|e| panic!("minted token refused for {a:?}: {e}"));
        check_accepted(fx, &v, a);
    }
    let other = format!("{}-other", audiences.join(""));
    if !audiences.contains(&other) {
        match fx.authority.validate_jwt(token, &other) {
            Err(JwtError::Audience { .. }) => {}
            r => panic!("minted token for {audiences:?} with audience {other:?}: {r:?}"),
        }
    }

    // XOR bytes of the token: (position: 2 bytes, value: 1 byte) per change.
    let mut bytes = token.as_bytes().to_vec();
    for m in mutation.chunks_exact(3) {
        let pos = usize::from(u16::from_le_bytes([m[0], m[1]])) % bytes.len();
        bytes[pos] ^= m[2];
    }
    if mutation.len() % 3 != 0 {
        // A trailing byte or two: cut the token there instead.
        bytes.truncate(usize::from(mutation[mutation.len() - 1]) % (bytes.len() + 1));
    }
    let Ok(mutated) = String::from_utf8(bytes) else {
        return;
    };
    if mutated == token {
        return;
    }
    if let Ok(v) = fx.authority.validate_jwt(&mutated, &audiences[0]) {
        assert_eq!(
            signed_part(&mutated),
            signed_part(token),
            "accepted a token whose signed part we never signed: {mutated:?}"
        );
        check_accepted(fx, &v, &audiences[0]);
    }
}
