//! Summaries of what the Workload API sent, rendered as text for people or JSON for scripts.
//!
//! A summary holds only public facts (SPIFFE IDs, hints, validity, subjects, counts, the
//! certificates as PEM), never key material, so it can be printed and logged freely. The one
//! way a key reaches standard output is [`json_with_keys`], for `api fetch x509 --output json
//! --include-key`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::Serialize;
use spiffe::{JwtBundleSet, X509BundleSet, X509Context, X509Svid};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use zeroize::Zeroizing;

use super::ClientError;
use super::files::pem_encode;

/// One X.509-SVID, without its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct SvidSummary {
    /// The SPIFFE ID.
    pub(crate) spiffe_id: String,
    /// The agent's hint, if it gave one.
    pub(crate) hint: Option<String>,
    /// The leaf's notBefore, RFC 3339.
    pub(crate) not_before: String,
    /// The leaf's notAfter, RFC 3339.
    pub(crate) not_after: String,
    /// The number of certificates in the chain, leaf included.
    pub(crate) chain_len: usize,
    /// The chain as PEM, leaf first (one block per certificate), as `svid.N.pem` holds it.
    pub(crate) chain_pem: String,
    /// The X.509 bundle of the SVID's trust domain as PEM, as `bundle.N.pem` holds it.
    pub(crate) bundle_pem: String,
}

/// One trust domain's X.509 bundle, counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct BundleCount {
    /// The trust domain name.
    pub(crate) trust_domain: String,
    /// How many X.509 authorities the bundle holds.
    pub(crate) authorities: usize,
    /// The authorities as PEM.
    pub(crate) pem: String,
}

/// What `api fetch x509` (and each `api watch` update) received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct X509Report {
    /// The SVIDs, in the agent's order (the first is the default).
    pub(crate) svids: Vec<SvidSummary>,
    /// The bundles, by trust domain name.
    pub(crate) bundles: Vec<BundleCount>,
    /// How long the fetch took, when it was one request.
    pub(crate) elapsed: Option<Duration>,
}

impl X509Report {
    /// Summarizes an X.509 context.
    pub(crate) fn from_context(
        context: &X509Context,
        elapsed: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let svids = context
            .svids()
            .iter()
            .map(|svid| {
                let mut summary = SvidSummary::from_svid(svid)?;
                if let Some(bundle) = context.bundle_set().get(svid.spiffe_id().trust_domain()) {
                    summary.bundle_pem = certificates_pem(bundle.authorities());
                }
                Ok(summary)
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        // X509BundleSet iterates in trust-domain order.
        let bundles = context
            .bundle_set()
            .iter()
            .map(|(td, bundle)| BundleCount {
                trust_domain: td.to_string(),
                authorities: bundle.authorities().len(),
                pem: certificates_pem(bundle.authorities()),
            })
            .collect();
        Ok(Self {
            svids,
            bundles,
            elapsed,
        })
    }

    /// Readable text, in the manner of `spire-agent api fetch x509`. No trailing newline.
    pub(crate) fn render_text(&self) -> String {
        let mut out = received_line(self.svids.len(), self.elapsed);
        for svid in &self.svids {
            out.push('\n');
            let _ = writeln!(out, "SPIFFE ID:     {}", svid.spiffe_id);
            if let Some(hint) = &svid.hint {
                let _ = writeln!(out, "Hint:          {hint}");
            }
            let _ = writeln!(out, "Valid after:   {}", svid.not_before);
            let _ = writeln!(out, "Valid until:   {}", svid.not_after);
            let _ = writeln!(out, "Chain:         {} certificate(s)", svid.chain_len);
        }
        out.push('\n');
        out.push_str("Bundle trust domains:");
        for bundle in &self.bundles {
            let _ = write!(
                out,
                "\n  {} ({} authorit{})",
                bundle.trust_domain,
                bundle.authorities,
                if bundle.authorities == 1 { "y" } else { "ies" }
            );
        }
        out
    }

    /// The JSON form: `{"svids":[...],"bundles":[...],"elapsed_ms":...}`. Never the key.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "svids": self.svids,
            "bundles": self.bundles,
            "elapsed_ms": self.elapsed.map(duration_ms),
        })
    }
}

impl SvidSummary {
    /// Summarizes an SVID from its leaf certificate.
    pub(crate) fn from_svid(svid: &X509Svid) -> Result<Self, ClientError> {
        let (not_before, not_after) = validity(svid.leaf().as_bytes())?;
        Ok(Self {
            spiffe_id: svid.spiffe_id().to_string(),
            hint: svid.hint().map(str::to_owned),
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
            chain_len: svid.cert_chain().len(),
            chain_pem: certificates_pem(svid.cert_chain()),
            bundle_pem: String::new(),
        })
    }
}

/// Certificates as PEM, one block each.
fn certificates_pem(certs: &[spiffe::cert::Certificate]) -> String {
    let mut pem = pem_encode("CERTIFICATE", certs.iter().map(|c| c.as_bytes()));
    std::mem::take(&mut *pem)
}

/// The JSON line of `api fetch x509 --output json --include-key`: `json` (an
/// [`X509Report::to_json`]) with each SVID's private key (PKCS#8 PEM) as `key_pem`, `keys[i]`
/// for SVID `i`. Written into one buffer sized up front, which is zeroized when dropped.
pub(crate) fn json_with_keys(
    json: &serde_json::Value,
    keys: &[Zeroizing<String>],
) -> Result<Zeroizing<String>, serde_json::Error> {
    // Escaping a PEM key doubles its newlines at most; the rest is the key-less line.
    let capacity = json.to_string().len() + keys.iter().map(|k| 2 * k.len() + 16).sum::<usize>();
    let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *buf, &WithKeys { json, keys })?;
    let bytes = std::mem::take(&mut *buf);
    // serde_json writes UTF-8; the error case cannot happen, and the bytes are then dropped.
    match String::from_utf8(bytes) {
        Ok(line) => Ok(Zeroizing::new(line)),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(serde::ser::Error::custom("the JSON line is not UTF-8"))
        }
    }
}

/// A report's JSON with the SVIDs' keys added.
struct WithKeys<'a> {
    json: &'a serde_json::Value,
    keys: &'a [Zeroizing<String>],
}

impl Serialize for WithKeys<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap as _, SerializeSeq as _};
        let Some(object) = self.json.as_object() else {
            return self.json.serialize(s);
        };
        let mut map = s.serialize_map(Some(object.len()))?;
        for (name, value) in object {
            match value.as_array() {
                Some(svids) if name == "svids" => {
                    map.serialize_entry(name, &SvidsWithKeys(svids, self.keys))?;
                }
                _ => map.serialize_entry(name, value)?,
            }
        }
        return map.end();

        struct SvidsWithKeys<'a>(&'a [serde_json::Value], &'a [Zeroizing<String>]);
        impl Serialize for SvidsWithKeys<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for (i, svid) in self.0.iter().enumerate() {
                    seq.serialize_element(&SvidWithKey(svid, self.1.get(i)))?;
                }
                seq.end()
            }
        }
        struct SvidWithKey<'a>(&'a serde_json::Value, Option<&'a Zeroizing<String>>);
        impl Serialize for SvidWithKey<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let (Some(object), Some(key)) = (self.0.as_object(), self.1) else {
                    return self.0.serialize(s);
                };
                let mut map = s.serialize_map(Some(object.len() + 1))?;
                for (name, value) in object {
                    map.serialize_entry(name, value)?;
                }
                map.serialize_entry("key_pem", key.as_str())?;
                map.end()
            }
        }
    }
}

/// One X.509 authority of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct AuthoritySummary {
    /// The authority's subject, e.g. `O=spiffed, CN=example.org`.
    pub(crate) subject: String,
    /// Its notAfter, RFC 3339.
    pub(crate) not_after: String,
}

/// One JWT authority of a bundle: a public key of the JWKS, named by its key ID. The JWKS
/// carries no expiry, so none is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct JwtAuthoritySummary {
    /// The key ID (`kid`), which JWT-SVIDs name in their header.
    pub(crate) kid: String,
    /// The key type, e.g. `EC P-256`, `RSA 2048`, `OKP Ed25519`, from `kty` and `crv` (or the
    /// RSA modulus size).
    pub(crate) key_type: String,
}

/// One trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TrustDomainBundle {
    /// The trust domain name.
    pub(crate) trust_domain: String,
    /// Its X.509 authorities.
    pub(crate) x509_authorities: Vec<AuthoritySummary>,
    /// Its JWT authorities, by key ID.
    pub(crate) jwt_authorities: Vec<JwtAuthoritySummary>,
}

/// What `api fetch bundles` received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BundlesReport {
    /// The bundles, by trust domain name.
    pub(crate) bundles: Vec<TrustDomainBundle>,
    /// How long the fetch took.
    pub(crate) elapsed: Option<Duration>,
}

impl BundlesReport {
    /// Summarizes an X.509 bundle set and, if the agent served one, a JWT bundle set, merged by
    /// trust domain (a trust domain in only one of them gets no authorities of the other kind).
    pub(crate) fn from_sets(
        x509: &X509BundleSet,
        jwt: Option<&JwtBundleSet>,
        elapsed: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let mut by_td: BTreeMap<String, TrustDomainBundle> = BTreeMap::new();
        let empty = |td: String| TrustDomainBundle {
            trust_domain: td,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
        };
        for (td, bundle) in x509.iter() {
            let x509_authorities = bundle
                .authorities()
                .iter()
                .map(|cert| authority_summary(cert.as_bytes()))
                .collect::<Result<Vec<_>, _>>()?;
            by_td
                .entry(td.to_string())
                .or_insert_with_key(|td| empty(td.clone()))
                .x509_authorities = x509_authorities;
        }
        for (td, bundle) in jwt.into_iter().flat_map(JwtBundleSet::iter) {
            let mut jwt_authorities: Vec<JwtAuthoritySummary> = bundle
                .jwt_authorities()
                .map(|authority| JwtAuthoritySummary {
                    kid: authority.key_id().to_owned(),
                    key_type: jwk_key_type(authority.jwk_json()),
                })
                .collect();
            // The bundle keeps its keys in a hash map: sort for stable output.
            jwt_authorities.sort_by(|a, b| a.kid.cmp(&b.kid));
            by_td
                .entry(td.to_string())
                .or_insert_with_key(|td| empty(td.clone()))
                .jwt_authorities = jwt_authorities;
        }
        Ok(Self {
            bundles: by_td.into_values().collect(),
            elapsed,
        })
    }

    /// Readable text. No trailing newline.
    pub(crate) fn render_text(&self) -> String {
        let mut out = String::new();
        let n = self.bundles.len();
        match self.elapsed {
            Some(elapsed) => {
                let _ = write!(out, "Received {n} bundle(s) after {}", format_ms(elapsed));
            }
            None => {
                let _ = write!(out, "Received {n} bundle(s)");
            }
        }
        for bundle in &self.bundles {
            let _ = write!(
                out,
                "\n\nTrust domain:  {}\nX.509 authorities: {}",
                bundle.trust_domain,
                bundle.x509_authorities.len()
            );
            for authority in &bundle.x509_authorities {
                let _ = write!(
                    out,
                    "\n  Subject:     {}\n  Valid until: {}",
                    authority.subject, authority.not_after
                );
            }
            let _ = write!(out, "\nJWT authorities: {}", bundle.jwt_authorities.len());
            for authority in &bundle.jwt_authorities {
                let _ = write!(
                    out,
                    "\n  Key ID:      {}\n  Key type:    {}\n  Valid until: unknown",
                    authority.kid, authority.key_type
                );
            }
        }
        out
    }

    /// The JSON form: `{"bundles":[{"trust_domain","x509_authorities":[{"subject",
    /// "not_after"}],"jwt_authorities":[{"kid","key_type"}]}],"elapsed_ms":...}`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bundles": self.bundles,
            "elapsed_ms": self.elapsed.map(duration_ms),
        })
    }
}

/// Parses a DER certificate for display.
fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, ClientError> {
    X509Certificate::from_der(der)
        .map(|(_rest, cert)| cert)
        .map_err(|e| ClientError::Certificate(e.to_string()))
}

/// The validity window of a DER certificate.
fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), ClientError> {
    let cert = parse_cert(der)?;
    let v = cert.validity();
    Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// Subject and notAfter of a DER certificate.
fn authority_summary(der: &[u8]) -> Result<AuthoritySummary, ClientError> {
    let cert = parse_cert(der)?;
    Ok(AuthoritySummary {
        subject: cert.subject().to_string(),
        not_after: rfc3339(cert.validity().not_after.to_datetime()),
    })
}

/// A JWK's key type for display: `EC P-256`, `OKP Ed25519`, `RSA 2048` (significant modulus
/// bits), else its `kty`, else `unknown`. Reads only public members.
fn jwk_key_type(jwk_json: &[u8]) -> String {
    let Ok(jwk) = serde_json::from_slice::<serde_json::Value>(jwk_json) else {
        return "unknown".to_owned();
    };
    let member = |name: &str| jwk.get(name).and_then(serde_json::Value::as_str);
    match (member("kty"), member("crv")) {
        (Some(kty @ ("EC" | "OKP")), Some(crv)) => format!("{kty} {crv}"),
        (Some("RSA"), _) => match member("n").and_then(|n| B64URL.decode(n).ok()) {
            Some(modulus) => match rsa_bits(&modulus) {
                0 => "RSA".to_owned(),
                bits => format!("RSA {bits}"),
            },
            None => "RSA".to_owned(),
        },
        (Some(kty), _) => kty.to_owned(),
        (None, _) => "unknown".to_owned(),
    }
}

/// The number of significant bits of a big-endian unsigned integer.
fn rsa_bits(be: &[u8]) -> usize {
    let Some(first) = be.iter().position(|&b| b != 0) else {
        return 0;
    };
    let lead = be.get(first).map_or(0, |b| b.leading_zeros() as usize);
    (be.len() - first) * 8 - lead
}

/// RFC 3339 text for a time; falls back to the Unix timestamp if a time cannot be formatted.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| format!("@{}", t.unix_timestamp()))
}

/// Milliseconds with two decimals, for JSON.
pub(crate) fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// `3.28 ms`.
pub(crate) fn format_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The first line of a fetch's text output: how many SVIDs, and how fast when known.
pub(crate) fn received_line(n: usize, elapsed: Option<Duration>) -> String {
    match elapsed {
        Some(elapsed) => format!("Received {n} svid(s) after {}\n", format_ms(elapsed)),
        None => format!("Received {n} svid(s)\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> X509Report {
        X509Report {
            svids: vec![SvidSummary {
                spiffe_id: "spiffe://example.org/web".into(),
                hint: Some("internal".into()),
                not_before: "2026-01-01T00:00:00Z".into(),
                not_after: "2026-01-01T01:00:00Z".into(),
                chain_len: 1,
                chain_pem: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
                bundle_pem: "-----BEGIN CERTIFICATE-----\nAQ==\n-----END CERTIFICATE-----\n".into(),
            }],
            bundles: vec![BundleCount {
                trust_domain: "example.org".into(),
                authorities: 1,
                pem: "-----BEGIN CERTIFICATE-----\nAQ==\n-----END CERTIFICATE-----\n".into(),
            }],
            elapsed: Some(Duration::from_micros(3280)),
        }
    }

    #[test]
    fn text_has_id_hint_validity_chain_bundles_and_timing() {
        let text = report().render_text();
        for want in [
            "Received 1 svid(s) after 3.28 ms",
            "SPIFFE ID:     spiffe://example.org/web",
            "Hint:          internal",
            "Valid after:   2026-01-01T00:00:00Z",
            "Valid until:   2026-01-01T01:00:00Z",
            "Chain:         1 certificate(s)",
            "Bundle trust domains:\n  example.org (1 authority)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.ends_with('\n'));
    }

    #[test]
    fn key_types_from_jwk_members() {
        assert_eq!(
            jwk_key_type(br#"{"kty":"EC","kid":"k","crv":"P-256","x":"","y":""}"#),
            "EC P-256"
        );
        assert_eq!(
            jwk_key_type(br#"{"kty":"OKP","kid":"k","crv":"Ed25519","x":""}"#),
            "OKP Ed25519"
        );
        // 0x00 0x80 then 255 more bytes: 2048 significant bits.
        let mut n = vec![0u8, 0x80];
        n.extend([1u8; 255]);
        let rsa = format!(
            r#"{{"kty":"RSA","kid":"k","n":"{}","e":"AQAB"}}"#,
            B64URL.encode(&n)
        );
        assert_eq!(jwk_key_type(rsa.as_bytes()), "RSA 2048");
        assert_eq!(jwk_key_type(br#"{"kty":"RSA","kid":"k"}"#), "RSA");
        assert_eq!(jwk_key_type(br#"{"kty":"oct","kid":"k"}"#), "oct");
        assert_eq!(jwk_key_type(br#"{"kid":"k"}"#), "unknown");
        assert_eq!(jwk_key_type(b"not json"), "unknown");
    }

    #[test]
    fn bundles_text_and_json_show_jwt_authorities() {
        let report = BundlesReport {
            bundles: vec![TrustDomainBundle {
                trust_domain: "example.org".into(),
                x509_authorities: vec![AuthoritySummary {
                    subject: "CN=example.org".into(),
                    not_after: "2026-01-02T00:00:00Z".into(),
                }],
                jwt_authorities: vec![JwtAuthoritySummary {
                    kid: "kid-1".into(),
                    key_type: "EC P-256".into(),
                }],
            }],
            elapsed: None,
        };
        let text = report.render_text();
        for want in [
            "Trust domain:  example.org",
            "X.509 authorities: 1\n  Subject:     CN=example.org",
            "JWT authorities: 1\n  Key ID:      kid-1\n  Key type:    EC P-256\n  Valid until: \
             unknown",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let json = report.to_json();
        assert_eq!(json["bundles"][0]["jwt_authorities"][0]["kid"], "kid-1");
        assert_eq!(
            json["bundles"][0]["jwt_authorities"][0]["key_type"],
            "EC P-256"
        );
        assert_eq!(
            json["bundles"][0]["x509_authorities"][0]["subject"],
            "CN=example.org"
        );
    }

    #[test]
    fn json_shape() {
        let json = report().to_json();
        assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/web");
        assert_eq!(json["svids"][0]["hint"], "internal");
        assert_eq!(json["svids"][0]["chain_len"], 1);
        assert_eq!(json["bundles"][0]["trust_domain"], "example.org");
        assert_eq!(json["bundles"][0]["authorities"], 1);
        assert_eq!(json["elapsed_ms"], 3.28);
        assert!(
            json["svids"][0]["chain_pem"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN")
        );
        assert!(
            json["svids"][0]["bundle_pem"]
                .as_str()
                .unwrap()
                .contains("AQ==")
        );
        assert!(json["bundles"][0]["pem"].as_str().unwrap().contains("AQ=="));
        assert!(json["svids"][0].get("key_pem").is_none());
    }

    #[test]
    fn keys_are_added_only_through_json_with_keys() {
        let json = report().to_json();
        let key = Zeroizing::new(
            "-----BEGIN PRIVATE KEY-----\nAg==\n-----END PRIVATE KEY-----\n".to_owned(),
        );
        let line = json_with_keys(&json, std::slice::from_ref(&key)).unwrap();
        assert!(!line.contains('\n'), "{}", line.as_str());
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["svids"][0]["key_pem"], key.as_str());
        // Everything else is the key-less report.
        let mut without = back;
        without["svids"][0]
            .as_object_mut()
            .unwrap()
            .remove("key_pem");
        assert_eq!(without, json);
    }
}
