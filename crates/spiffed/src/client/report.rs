//! Summaries of what the Workload API sent, rendered as text for people or JSON for scripts.
//!
//! A summary holds only public facts (SPIFFE IDs, hints, validity, subjects, counts), never key
//! material, so it can be printed and logged freely.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use spiffe::{X509BundleSet, X509Context, X509Svid};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::ClientError;

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
}

/// One trust domain's X.509 bundle, counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct BundleCount {
    /// The trust domain name.
    pub(crate) trust_domain: String,
    /// How many X.509 authorities the bundle holds.
    pub(crate) authorities: usize,
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
            .map(|svid| SvidSummary::from_svid(svid))
            .collect::<Result<Vec<_>, _>>()?;
        // X509BundleSet iterates in trust-domain order.
        let bundles = context
            .bundle_set()
            .iter()
            .map(|(td, bundle)| BundleCount {
                trust_domain: td.to_string(),
                authorities: bundle.authorities().len(),
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
        let mut out = String::new();
        let n = self.svids.len();
        match self.elapsed {
            Some(elapsed) => {
                let _ = writeln!(out, "Received {n} svid(s) after {}", format_ms(elapsed));
            }
            None => {
                let _ = writeln!(out, "Received {n} svid(s)");
            }
        }
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
        })
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

/// One trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TrustDomainBundle {
    /// The trust domain name.
    pub(crate) trust_domain: String,
    /// Its X.509 authorities.
    pub(crate) x509_authorities: Vec<AuthoritySummary>,
    // Extension point: `jwt_authorities: Vec<JwtAuthoritySummary>` (key ID, key type) comes with
    // JWT support, filled from FetchJWTBundles and merged here by trust domain.
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
    /// Summarizes an X.509 bundle set.
    pub(crate) fn from_x509(
        set: &X509BundleSet,
        elapsed: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let bundles = set
            .iter()
            .map(|(td, bundle)| {
                let x509_authorities = bundle
                    .authorities()
                    .iter()
                    .map(|cert| authority_summary(cert.as_bytes()))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(TrustDomainBundle {
                    trust_domain: td.to_string(),
                    x509_authorities,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Self { bundles, elapsed })
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
        }
        out
    }

    /// The JSON form: `{"bundles":[{"trust_domain","x509_authorities":[{"subject",
    /// "not_after"}]}],"elapsed_ms":...}`.
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

/// RFC 3339 text for a time; falls back to the Unix timestamp if a time cannot be formatted.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| format!("@{}", t.unix_timestamp()))
}

/// Milliseconds with two decimals, for JSON.
fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// `3.28 ms`.
fn format_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
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
            }],
            bundles: vec![BundleCount {
                trust_domain: "example.org".into(),
                authorities: 1,
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
    fn json_shape() {
        let json = report().to_json();
        assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/web");
        assert_eq!(json["svids"][0]["hint"], "internal");
        assert_eq!(json["svids"][0]["chain_len"], 1);
        assert_eq!(json["bundles"][0]["trust_domain"], "example.org");
        assert_eq!(json["bundles"][0]["authorities"], 1);
        assert_eq!(json["elapsed_ms"], 3.28);
    }
}
