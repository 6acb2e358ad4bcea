//! JWT-SVIDs (CONFORMANCE.md §6, §10): ES256 signing keys with a `kid`, token minting, and
//! validation with an algorithm allow-list checked before anything else.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Map, Value, json};
use spiffed_core::untrusted::{MAX_LISTED, clip};
use spiffed_core::{JwtAuthority, JwtError, SpiffeId, TrustDomain, ValidatedJwt};
use zeroize::Zeroizing;

use crate::Error;
use crate::ca::{Ca, CaState, Material};

/// Expiry and not-before leeway, as go-jose (and so SPIRE and go-spiffe) use.
pub(crate) const LEEWAY: Duration = Duration::from_secs(60);

/// Every `alg` a JWT-SVID may carry ([JWT §2.1]); anything else is refused before any other
/// processing. Only ES256 can verify against this agent's P-256 keys.
const ALLOWED_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

fn crypto(e: impl std::fmt::Display) -> Error {
    Error::Crypto(e.to_string())
}

/// Mints a JWT signing key for [`crate::ca::CaSet::advance`], valid for `ttl` from `now`.
pub(crate) fn minter<'a>(
    ttl: Duration,
    rng: &'a SystemRandom,
) -> impl FnMut(SystemTime) -> Result<Ca, Error> + 'a {
    move |now| {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, rng)
            .map_err(crypto)?;
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            rng,
        )
        .map_err(crypto)?;
        let mut kid = [0u8; 24];
        rng.fill(&mut kid).map_err(crypto)?;
        // Whole seconds, as everything else persisted.
        let now_s = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .map_err(crypto)?
                    .as_secs(),
            );
        Ok(Ca {
            upstream: None,
            material: Material::Jwt {
                kid: B64URL.encode(kid),
                public: pair.public_key().as_ref().to_vec(),
            },
            key_pkcs8: Zeroizing::new(pkcs8.as_ref().to_vec()),
            not_after: now_s + ttl,
            state: CaState::Prepared,
            created: now_s,
        })
    }
}

/// The active JWT signing key, ready to sign.
///
/// Its PKCS#8 bytes stay in the [`Ca`]'s `Zeroizing` buffer, wiped on drop. ring's parsed
/// `EcdsaKeyPair` here cannot be wiped (ring has no zeroization and does not expose the key),
/// nor can the `pkcs8::Document` that `generate_pkcs8` returns in [`minter`] (a fixed array
/// inside ring, copied out at once).
pub(crate) struct JwtSigner {
    pub(crate) kid: String,
    pub(crate) pair: EcdsaKeyPair,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

impl JwtSigner {
    pub(crate) fn new(ca: &Ca, rng: &SystemRandom) -> Result<Self, Error> {
        let Material::Jwt { kid, .. } = &ca.material else {
            return Err(Error::Crypto("not a JWT key".into()));
        };
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &ca.key_pkcs8,
            rng,
        )
        .map_err(crypto)?;
        Ok(Self {
            kid: kid.clone(),
            pair,
            not_before: ca.not_before(),
            not_after: ca.not_after,
        })
    }

    /// Signs a token for `sub` and `audience`, valid for `ttl` but never past the key.
    /// Returns the token, `iat` and `exp`.
    pub(crate) fn sign(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        rng: &SystemRandom,
    ) -> Result<(Zeroizing<String>, SystemTime, SystemTime), Error> {
        if !(self.not_before <= now && now < self.not_after) {
            return Err(Error::NoValidCa(format!(
                "the JWT signing key {} is valid from {} to {}, not at {}",
                self.kid,
                crate::ca::rfc3339(self.not_before),
                crate::ca::rfc3339(self.not_after),
                crate::ca::rfc3339(now)
            )));
        }
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(crypto)?
            .as_secs();
        let cap = self
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(crypto)?
            .as_secs();
        let exp = (iat + ttl.as_secs().max(1)).min(cap);
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let claims = json!({"sub": sub.to_string(), "aud": audience, "exp": exp, "iat": iat});
        let mut token = Zeroizing::new(format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        ));
        let sig = self.pair.sign(rng, token.as_bytes()).map_err(crypto)?;
        token.push('.');
        token.push_str(&B64URL.encode(sig.as_ref()));
        Ok((
            token,
            SystemTime::UNIX_EPOCH + Duration::from_secs(iat),
            SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
        ))
    }
}

fn malformed(why: impl Into<String>) -> JwtError {
    JwtError::Malformed(why.into())
}

fn decode_part(part: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    // go-jose refuses padding, and so do we; the base64 engine refuses it too, but say why.
    if part.contains('=') {
        return Err(malformed(format!("the {what} is padded base64")));
    }
    B64URL
        .decode(part)
        .map_err(|_| malformed(format!("the {what} is not base64url")))
}

fn json_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(malformed(format!("the {what} is not a JSON object"))),
    }
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| JwtError::Claim(format!("{name} is not a number"))),
        Some(_) => Err(JwtError::Claim(format!("{name} is not a number"))),
    }
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Validates `token` for `audience` at `now`. `authorities` gives the JWT keys trusted for a
/// trust domain (`None`: no bundle for it).
///
/// Every caller-supplied string an error carries (alg, typ, kid, subject, audiences) is
/// bounded with [`clip`]: errors are logged and sent back in the status message.
pub(crate) fn validate(
    token: &str,
    audience: &str,
    now: SystemTime,
    authorities: impl Fn(&TrustDomain) -> Option<Vec<JwtAuthority>>,
) -> Result<ValidatedJwt, JwtError> {
    if token.trim_start().starts_with('{') {
        return Err(malformed(
            "JWS JSON serialization is not allowed; use compact",
        ));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts.as_slice() else {
        return Err(malformed("a JWS compact token has exactly three parts"));
    };
    let header = json_object(&decode_part(h, "header")?, "header")?;

    // The algorithm allow-list comes first: nothing else is looked at for `none` or HS256.
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(JwtError::Algorithm(String::new())),
    };
    if !ALLOWED_ALGS.contains(&alg.as_str()) {
        return Err(JwtError::Algorithm(clip(&alg)));
    }
    if header.contains_key("crit") {
        return Err(JwtError::Header("crit is not supported".into()));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(t) => {
            return Err(JwtError::Header(format!(
                "typ {} is not JWT or JOSE",
                clip(&t.to_string())
            )));
        }
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(JwtError::MissingKid),
    };

    let payload = decode_part(p, "payload")?;
    let claims = json_object(&payload, "payload")?;
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(JwtError::Claim("sub is not a string".into())),
        None => return Err(JwtError::Claim("sub is missing".into())),
    };
    let spiffe_id = SpiffeId::new(&sub).map_err(|_| JwtError::Subject(clip(&sub)))?;
    let keys = authorities(spiffe_id.trust_domain())
        .ok_or_else(|| JwtError::NoBundle(spiffe_id.trust_domain().to_string()))?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| JwtError::UnknownKid(clip(&kid)))?;
    if alg != "ES256" {
        return Err(JwtError::AlgorithmMismatch {
            alg,
            key: "EC P-256",
            kid,
        });
    }
    let sig = decode_part(s, "signature")?;
    if sig.len() != 64 {
        // A DER-encoded ECDSA signature, or garbage: ES256 is raw R || S.
        return Err(JwtError::Signature);
    }
    let signed = &token[..h.len() + 1 + p.len()];
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &key.public_point)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)?;

    let now_s = secs(now);
    let leeway = LEEWAY.as_secs_f64();
    let exp =
        numeric_date(&claims, "exp")?.ok_or_else(|| JwtError::Claim("exp is missing".into()))?;
    if exp + leeway < now_s {
        return Err(JwtError::Expired);
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = numeric_date(&claims, name)?
            && t > now_s + leeway
        {
            return Err(JwtError::NotYetValid);
        }
    }
    let auds: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| JwtError::Claim("aud holds a non-string".into()))?,
        Some(_) => return Err(JwtError::Claim("aud is not a string or a list".into())),
        None => return Err(JwtError::Claim("aud is missing".into())),
    };
    if !auds.iter().any(|a| a == audience) {
        let mut got: Vec<String> = auds.iter().take(MAX_LISTED).map(|a| clip(a)).collect();
        if auds.len() > MAX_LISTED {
            got.push(format!("…{} more", auds.len() - MAX_LISTED));
        }
        return Err(JwtError::Audience {
            want: clip(audience),
            got,
        });
    }
    Ok(ValidatedJwt {
        spiffe_id,
        claims_json: payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        rng: SystemRandom,
        signer: JwtSigner,
        authority: JwtAuthority,
        td: TrustDomain,
    }

    fn fixture() -> Fixture {
        let rng = SystemRandom::new();
        let mut ca = minter(Duration::from_secs(3600), &rng)(SystemTime::now()).unwrap();
        ca.state = CaState::Active;
        let signer = JwtSigner::new(&ca, &rng).unwrap();
        let Material::Jwt { kid, public } = ca.material.clone() else {
            panic!()
        };
        Fixture {
            signer,
            authority: JwtAuthority {
                kid,
                public_point: public,
                not_after: ca.not_after,
            },
            rng,
            td: TrustDomain::new("example.org").unwrap(),
        }
    }

    impl Fixture {
        fn check(&self, token: &str, aud: &str) -> Result<ValidatedJwt, JwtError> {
            let keys = vec![self.authority.clone()];
            validate(token, aud, SystemTime::now(), |td| {
                (td == &self.td).then(|| keys.clone())
            })
        }

        fn token(&self, sub: &str, aud: &[&str]) -> String {
            let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
            let (t, _, _) = self
                .signer
                .sign(
                    &SpiffeId::new(sub).unwrap(),
                    &aud,
                    Duration::from_secs(300),
                    SystemTime::now(),
                    &self.rng,
                )
                .unwrap();
            t.to_string()
        }

        /// Signs arbitrary header and claims with the real key.
        fn forge(&self, header: Value, claims: Value) -> String {
            let msg = format!(
                "{}.{}",
                B64URL.encode(header.to_string()),
                B64URL.encode(claims.to_string())
            );
            let sig = self.signer.pair.sign(&self.rng, msg.as_bytes()).unwrap();
            format!("{msg}.{}", B64URL.encode(sig.as_ref()))
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_tokens_have_the_svid_profile_and_validate() {
        let f = fixture();
        let t = f.token("spiffe://example.org/web", &["a", "b"]);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = json_object(&B64URL.decode(parts[0]).unwrap(), "h").unwrap();
        let mut keys: Vec<_> = header.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["alg", "kid", "typ"]);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(B64URL.decode(parts[2]).unwrap().len(), 64);
        let v = f.check(&t, "b").unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/web");
        let claims: Value = serde_json::from_slice(&v.claims_json).unwrap();
        assert_eq!(claims["aud"], json!(["a", "b"]));
        assert!(claims["exp"].as_u64().unwrap() > now());
    }

    #[test]
    fn rejections_name_their_reason() {
        let f = fixture();
        let good = f.token("spiffe://example.org/web", &["a"]);
        assert!(matches!(
            f.check(&good, "other"),
            Err(JwtError::Audience { .. })
        ));
        // Tampered payload: one claim changed, signature kept.
        let parts: Vec<&str> = good.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = json!("spiffe://example.org/admin");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            B64URL.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(f.check(&tampered, "a").unwrap_err(), JwtError::Signature);
        // alg none with an empty signature.
        let none = format!(
            "{}.{}.",
            B64URL.encode(r#"{"alg":"none","kid":"x"}"#),
            parts[1]
        );
        assert!(matches!(f.check(&none, "a"), Err(JwtError::Algorithm(a)) if a == "none"));
        // HS256 keyed with the public key bytes (key confusion).
        let hs_msg = format!(
            "{}.{}",
            B64URL.encode(format!(r#"{{"alg":"HS256","kid":"{}"}}"#, f.authority.kid)),
            parts[1]
        );
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &f.authority.public_point),
            hs_msg.as_bytes(),
        );
        let hs = format!("{hs_msg}.{}", B64URL.encode(tag.as_ref()));
        assert!(matches!(f.check(&hs, "a"), Err(JwtError::Algorithm(a)) if a == "HS256"));
        // Lower-case alg and EdDSA.
        for alg in ["es256", "EdDSA"] {
            let t = f.forge(
                json!({"alg": alg, "kid": f.authority.kid}),
                json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+60}),
            );
            assert!(
                matches!(f.check(&t, "a"), Err(JwtError::Algorithm(_))),
                "{alg}"
            );
        }
        // RS256 header on an EC key.
        let t = f.forge(
            json!({"alg":"RS256","kid": f.authority.kid}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+60}),
        );
        assert!(matches!(
            f.check(&t, "a"),
            Err(JwtError::AlgorithmMismatch { .. })
        ));
        // Missing and unknown kid.
        let t = f.forge(
            json!({"alg":"ES256"}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+60}),
        );
        assert_eq!(f.check(&t, "a").unwrap_err(), JwtError::MissingKid);
        let t = f.forge(
            json!({"alg":"ES256","kid":"nope"}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+60}),
        );
        assert!(matches!(f.check(&t, "a"), Err(JwtError::UnknownKid(_))));
        // Expired (beyond the leeway), exp as a string, no exp, future nbf.
        let kid = f.authority.kid.clone();
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()-300}),
        );
        assert_eq!(f.check(&t, "a").unwrap_err(), JwtError::Expired);
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":"soon"}),
        );
        assert!(matches!(f.check(&t, "a"), Err(JwtError::Claim(_))));
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://example.org/w","aud":["a"]}),
        );
        assert!(matches!(f.check(&t, "a"), Err(JwtError::Claim(_))));
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+600,"nbf":now()+300}),
        );
        assert_eq!(f.check(&t, "a").unwrap_err(), JwtError::NotYetValid);
        // typ at+jwt, another trust domain, a bad subject.
        let t = f.forge(
            json!({"alg":"ES256","kid":kid,"typ":"at+jwt"}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+60}),
        );
        assert!(matches!(f.check(&t, "a"), Err(JwtError::Header(_))));
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://other.org/w","aud":["a"],"exp":now()+60}),
        );
        assert!(matches!(f.check(&t, "a"), Err(JwtError::NoBundle(td)) if td == "other.org"));
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"web","aud":["a"],"exp":now()+60}),
        );
        assert!(matches!(f.check(&t, "a"), Err(JwtError::Subject(_))));
        // aud as a single string is accepted.
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://example.org/w","aud":"a","exp":now()+60}),
        );
        assert!(f.check(&t, "a").is_ok());
        // Caller-supplied strings in errors are bounded: a 45 KB kid, alg or audience list.
        let big = "k".repeat(45_000);
        let t = f.forge(
            json!({"alg":"ES256","kid":big}),
            json!({"sub":"spiffe://example.org/w","aud":["a"],"exp":now()+60}),
        );
        let e = f.check(&t, "a").unwrap_err();
        assert!(matches!(e, JwtError::UnknownKid(_)));
        assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
        let t = f.forge(json!({"alg":big,"kid":kid}), json!({}));
        assert!(f.check(&t, "a").unwrap_err().to_string().len() < 400);
        let many: Vec<String> = (0..5000).map(|i| format!("{i}{big}")).take(50).collect();
        let t = f.forge(
            json!({"alg":"ES256","kid":kid}),
            json!({"sub":"spiffe://example.org/w","aud":many,"exp":now()+60}),
        );
        let e = f.check(&t, &big).unwrap_err();
        assert!(matches!(e, JwtError::Audience { .. }));
        assert!(e.to_string().len() < 3000, "{} bytes", e.to_string().len());
        // Structure.
        assert!(matches!(f.check("a.b", "a"), Err(JwtError::Malformed(_))));
        assert!(matches!(
            f.check("{\"payload\":1}", "a"),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            f.check(&format!("{good}="), "a"),
            Err(JwtError::Malformed(_))
        ));
    }
}
