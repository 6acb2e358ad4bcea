//! The JWT-SVID profile: FetchJWTSVID, FetchJWTBundles, ValidateJWTSVID.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use spiffed_proto::workload::{JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest};
use spiffed_test_support::{Agent, with_header};
use tonic::Code;

use crate::agent_for_me;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The agent's active JWT signing key, read from its data dir (the test owns it), so the tests
/// can forge tokens the way an attacker holding a copy of the key, or a clock skew, would.
fn signing_key(agent: &Agent) -> (String, EcdsaKeyPair) {
    let file: Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir.join("ca.json")).unwrap()).unwrap();
    let key = file["jwt_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "active")
        .unwrap();
    let pkcs8 = B64.decode(key["key"].as_str().unwrap()).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    )
    .unwrap();
    (key["kid"].as_str().unwrap().to_owned(), pair)
}

fn forge(pair: &EcdsaKeyPair, header: Value, claims: Value) -> String {
    let msg = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let sig = pair.sign(&SystemRandom::new(), msg.as_bytes()).unwrap();
    format!("{msg}.{}", B64URL.encode(sig.as_ref()))
}

async fn validate(agent: &Agent, token: &str, audience: &str) -> Result<String, tonic::Status> {
    let mut c = agent.client().await;
    c.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
        audience: audience.into(),
        svid: token.into(),
    }))
    .await
    .map(|r| r.into_inner().spiffe_id)
}

/// The entry `agent_for_me` gives, for both modes.
fn web_for_me() -> crate::TestEntry<'static> {
    let mut web = crate::TestEntry::new(
        "spiffe://example.org/web",
        &[format!("unix:uid:{}", spiffed_test_support::my_uid())],
    );
    web.hint = Some("internal");
    web
}

/// In both modes (standalone, and agent mode where the server signs the tokens).
#[tokio::test]
async fn spiffe_crate_fetches_and_validates_locally_and_the_server_agrees() {
    for mode in crate::Mode::ALL {
        spiffe_crate_fetches_and_validates_locally_and_the_server_agrees_in(mode).await;
    }
}

async fn spiffe_crate_fetches_and_validates_locally_and_the_server_agrees_in(mode: crate::Mode) {
    let node = crate::node_with(mode, &[web_for_me()]);
    let agent = &node.agent;
    let endpoint = format!("unix://{}", agent.socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let svid = client
        .fetch_jwt_svid(["service-b", "service-c"], None)
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let local =
        spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["service-c"]).unwrap();
    assert_eq!(local.spiffe_id().to_string(), "spiffe://example.org/web");

    let mut c = agent.client().await;
    let resp = c
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "service-b".into(),
            svid: svid.token().into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, "spiffe://example.org/web");
    let claims = resp.claims.unwrap().fields;
    assert!(claims.contains_key("exp") && claims.contains_key("aud") && claims.contains_key("sub"));

    // Header and claim profile of the minted token.
    let parts: Vec<&str> = svid.token().split('.').collect();
    let header: Value = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
    let mut keys: Vec<_> = header.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["alg", "kid", "typ"]);
    let payload: Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(payload["aud"], json!(["service-b", "service-c"]));
    assert!(payload["iat"].is_u64());

    // The JWKS: kid set, no private or X.509 members.
    let mut bundles = c
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = bundles.message().await.unwrap().unwrap();
    let jwks: Value = serde_json::from_slice(&msg.bundles["spiffe://example.org"]).unwrap();
    for k in jwks["keys"].as_array().unwrap() {
        assert!(!k["kid"].as_str().unwrap().is_empty());
        assert!(k.get("d").is_none() && k.get("x5c").is_none());
    }
}

/// In both modes.
#[tokio::test]
async fn fetch_jwt_svid_request_rules() {
    for mode in crate::Mode::ALL {
        fetch_jwt_svid_request_rules_in(mode).await;
    }
}

async fn fetch_jwt_svid_request_rules_in(mode: crate::Mode) {
    let node = crate::node_with(mode, &[web_for_me()]);
    let agent = &node.agent;
    let mut c = agent.client().await;
    let call = |aud: Vec<&str>, id: &str| {
        with_header(JwtsvidRequest {
            audience: aud.into_iter().map(String::from).collect(),
            spiffe_id: id.into(),
        })
    };
    assert_eq!(
        c.fetch_jwtsvid(call(vec![], "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.fetch_jwtsvid(call(vec!["a"], "spiffe://example.org/web/"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let denied = c
        .fetch_jwtsvid(call(vec!["a"], "spiffe://example.org/db"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let ok = c
        .fetch_jwtsvid(call(vec!["a"], "spiffe://example.org/web"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.svids.len(), 1);
    assert_eq!(ok.svids[0].hint, "internal");
}

#[tokio::test]
async fn validate_rejects_every_bad_token_with_a_reason() {
    let agent = agent_for_me("");
    let mut c = agent.client().await;
    let good = c
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    assert_eq!(
        validate(&agent, &good, "a").await.unwrap(),
        "spiffe://example.org/web"
    );

    let (kid, pair) = signing_key(&agent);
    let claims = |exp: u64, sub: &str| json!({"sub": sub, "aud": ["a"], "exp": exp, "iat": now()});
    let parts: Vec<&str> = good.split('.').collect();
    let mut tampered_claims: Value =
        serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
    tampered_claims["sub"] = json!("spiffe://example.org/admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64URL.encode(tampered_claims.to_string()),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        B64URL.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    // HS256 keyed with the public key's bytes, the classic key-confusion attack.
    let jwks: Value = {
        let mut b = c
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        serde_json::from_slice(&b.message().await.unwrap().unwrap().bundles["spiffe://example.org"])
            .unwrap()
    };
    let hs_msg = format!(
        "{}.{}",
        B64URL.encode(json!({"alg":"HS256","kid":kid}).to_string()),
        parts[1]
    );
    let hs_key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        jwks["keys"][0].to_string().as_bytes(),
    );
    let hs = format!(
        "{hs_msg}.{}",
        B64URL.encode(ring::hmac::sign(&hs_key, hs_msg.as_bytes()).as_ref())
    );
    let cases = [
        ("wrong audience", good.clone(), "b", "audience"),
        (
            "expired",
            forge(
                &pair,
                json!({"alg":"ES256","kid":kid,"typ":"JWT"}),
                claims(now() - 300, "spiffe://example.org/web"),
            ),
            "a",
            "expired",
        ),
        ("tampered payload", tampered, "a", "signature"),
        ("alg none", none, "a", "algorithm"),
        ("HS256 with the public key", hs, "a", "algorithm"),
        (
            "unknown kid",
            forge(
                &pair,
                json!({"alg":"ES256","kid":"not-a-key","typ":"JWT"}),
                claims(now() + 60, "spiffe://example.org/web"),
            ),
            "a",
            "key id",
        ),
        (
            "missing kid",
            forge(
                &pair,
                json!({"alg":"ES256","typ":"JWT"}),
                claims(now() + 60, "spiffe://example.org/web"),
            ),
            "a",
            "kid",
        ),
        (
            "another trust domain",
            forge(
                &pair,
                json!({"alg":"ES256","kid":kid,"typ":"JWT"}),
                claims(now() + 60, "spiffe://other.org/web"),
            ),
            "a",
            "other.org",
        ),
    ];
    for (what, token, aud, reason) in cases {
        let err = validate(&agent, &token, aud).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(reason), "{what}: {}", err.message());
    }
}

#[tokio::test]
async fn tokens_validate_until_expiry_through_key_rotations() {
    // Keys live 4s (prepared at 2s, signing at ~3.3s); tokens 2s. Over ~9s at least two
    // signing-key rotations happen, and every token must validate while it is unexpired.
    // Lifetimes this short need the floors lowered (min_svid_ttl, min_ca_ttl).
    let agent = agent_for_me(crate::SHORT_TTLS);
    let mut c = agent.client().await;
    let mut tokens: Vec<(String, u64)> = vec![];
    let mut kids = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(9);
    let mut round = 0u32;
    while Instant::now() < deadline {
        round += 1;
        let svid = c
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["a".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner()
            .svids
            .remove(0)
            .svid;
        let parts: Vec<&str> = svid.split('.').collect();
        let header: Value = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
        let payload: Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        kids.insert(header["kid"].as_str().unwrap().to_owned());
        if !tokens.iter().any(|(t, _)| t == &svid) {
            tokens.push((svid, payload["exp"].as_u64().unwrap()));
        }
        for (t, exp) in &tokens {
            // Whole-second exp: check only tokens with a full second left.
            if now() >= exp.saturating_sub(1) {
                continue;
            }
            if let Err(e) = validate(&agent, t, "a").await {
                panic!(
                    "round {round}: an unexpired token was rejected: {e:?}\n{}",
                    agent.logs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        kids.len() >= 3,
        "saw {} signing keys: fewer than two rotations",
        kids.len()
    );
    assert!(tokens.len() >= 6, "only {} distinct tokens", tokens.len());
}

async fn fetch_jwt(agent: &Agent, audience: Vec<String>) -> Result<String, tonic::Status> {
    let mut c = agent.client().await;
    c.fetch_jwtsvid(with_header(JwtsvidRequest {
        audience,
        spiffe_id: String::new(),
    }))
    .await
    .map(|r| r.into_inner().svids[0].svid.clone())
}

/// Issue 10 item 6: 64 KiB audiences were accepted, logged verbatim and cached without bound.
#[tokio::test]
async fn audiences_are_bounded_and_cannot_grow_the_cache_or_the_log() {
    let agent = agent_for_me("");
    // Too many, too long, and the 60 KiB audience of the report: InvalidArgument naming the
    // setting.
    for (audience, limit) in [
        (vec!["a".to_owned(); 17], "max_jwt_audiences"),
        (vec!["a".repeat(1025)], "max_jwt_audience_length"),
        (vec!["a".repeat(60 * 1024)], "max_jwt_audience_length"),
    ] {
        let e = fetch_jwt(&agent, audience).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(limit), "{}", e.message());
    }
    // The largest accepted request still works.
    fetch_jwt(&agent, vec!["b".repeat(1024); 16]).await.unwrap();

    // One caller asks for 150 distinct audience sets of 1000 bytes each.
    let first = fetch_jwt(&agent, vec![format!("0000{}", "x".repeat(996))])
        .await
        .unwrap();
    let before = agent.logs().len();
    let mut c = agent.client().await;
    for i in 1..150 {
        c.fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![format!("{i:04}{}", "x".repeat(996))],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap();
    }
    let grown = agent.logs().len() - before;
    // The audiences alone are 149,000 bytes; each line shows a bounded digest instead.
    assert!(
        grown < 149 * 1000,
        "{grown} bytes of log for 149 requests:\n{}",
        &agent.logs()[before..before + 2000.min(grown)]
    );
    // The cache did not keep them all: the first audience set, pushed out by the caller's own
    // later ones, gets a freshly minted token.
    let again = fetch_jwt(&agent, vec![format!("0000{}", "x".repeat(996))])
        .await
        .unwrap();
    assert_ne!(
        again, first,
        "the first token is still cached after 149 others"
    );
    // A token still cached comes back unchanged.
    let recent = vec![format!("{:04}{}", 149, "x".repeat(996))];
    assert_eq!(
        fetch_jwt(&agent, recent.clone()).await.unwrap(),
        fetch_jwt(&agent, recent).await.unwrap()
    );
}

/// Issue 10 item 6: a caller with no identity sent a 45 KB `kid` and wrote 45 MB of log in
/// 17 s.
#[tokio::test]
async fn huge_kids_from_a_caller_without_identity_cost_little_log() {
    let agent = Agent::start(&crate::bin(), "");
    let claims = json!({"sub": "spiffe://example.org/w", "aud": ["a"], "exp": now() + 60});
    let token = |kid: &str| {
        format!(
            "{}.{}.{}",
            B64URL.encode(json!({"alg": "ES256", "kid": kid, "typ": "JWT"}).to_string()),
            B64URL.encode(claims.to_string()),
            B64URL.encode([7u8; 64])
        )
    };
    // The 45 KB kid of the report: the token is refused by size, before it is parsed.
    let e = validate(&agent, &token(&"k".repeat(45_000)), "a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("max_jwt_token_length"),
        "{}",
        e.message()
    );

    // A 20 KB kid fits the token limit: it is refused as unknown, and neither the answer nor
    // the log carries it whole, however often it is sent.
    let big = token(&"q".repeat(20_000));
    let before = agent.logs().len();
    let mut c = agent.client().await;
    for _ in 0..200 {
        let e = c
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: big.clone(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("key id"), "{}", e.message());
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    }
    // In a later second the suppressed lines are summarized: ask until the summary appears.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.logs()[before..].contains("suppressed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no summary line within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        validate(&agent, &big, "a").await.unwrap_err();
    }
    let logs = agent.logs();
    let grown = logs.len() - before;
    assert!(grown < 50_000, "{grown} bytes of log for 201 requests");
    assert!(!logs.contains(&"q".repeat(1000)), "the kid is logged whole");
    assert!(
        logs.contains("suppressed"),
        "no summary line:\n{}",
        &logs[before..]
    );
}
