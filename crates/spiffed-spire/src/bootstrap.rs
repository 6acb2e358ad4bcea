//! The bootstrap trust bundle: what authenticates the server before the agent has a bundle of
//! its own (SPIRE-AGENT.md §1). A PEM file (`spire-server bundle show`), or a SPIFFE bundle
//! (JWKS whose `x509-svid` keys carry the authority in `x5c`; `bundle show -format spiffe`),
//! read by the shared parser in [`spiffed_core::spiffe_bundle`].

use std::path::Path;

use spiffed_core::TrustDomain;
use spiffed_core::spiffe_bundle::SpiffeBundle;

use crate::config::BundleFormat;

/// Reads the X.509 authorities (DER) of trust domain `td` from a bootstrap bundle file.
pub(crate) fn read_authorities(
    path: &Path,
    format: BundleFormat,
    td: &TrustDomain,
) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the trust bundle {}: {e}", path.display()))?;
    let fix = format!(
        "write the server's bundle there with `spire-server bundle show{} > {}`",
        match format {
            BundleFormat::Pem => "",
            BundleFormat::Spiffe => " -format spiffe",
        },
        path.display()
    );
    let certs = match format {
        BundleFormat::Pem => SpiffeBundle::parse_pem(td, &bytes).map(|b| b.x509_authorities),
        BundleFormat::Spiffe => SpiffeBundle::parse(td, &bytes).map(|p| p.bundle.x509_authorities),
    }
    .map_err(|e| format!("the trust bundle {} {e}; {fix}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the trust bundle {} has no x509-svid key; {fix}",
            path.display()
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        crate::cert::facts(c).map_err(|e| {
            format!(
                "certificate #{} of the trust bundle {} does not parse ({e}); {fix}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::TestCa;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn pem_and_spiffe_bundles_give_the_same_authorities() {
        let dir = tempfile::tempdir().unwrap();
        let a = TestCa::new("a");
        let b = TestCa::new("b");
        let pem_path = dir.path().join("bootstrap.pem");
        let pem_text: String = [&a, &b]
            .iter()
            .map(|ca| {
                format!(
                    "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                    B64.encode(&ca.cert_der)
                )
            })
            .collect();
        std::fs::write(&pem_path, pem_text).unwrap();
        let from_pem = read_authorities(&pem_path, BundleFormat::Pem, &td()).unwrap();
        assert_eq!(from_pem, vec![a.cert_der.clone(), b.cert_der.clone()]);

        let json_path = dir.path().join("bootstrap.json");
        let json = serde_json::json!({
            "keys": [
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [B64.encode(&a.cert_der)]},
                {"use": "jwt-svid", "kty": "EC", "kid": "k"},
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [B64.encode(&b.cert_der)]},
            ],
            "spiffe_sequence": 1
        });
        std::fs::write(&json_path, json.to_string()).unwrap();
        let from_json = read_authorities(&json_path, BundleFormat::Spiffe, &td()).unwrap();
        assert_eq!(from_json, from_pem);
    }

    #[test]
    fn bad_bundles_say_how_to_make_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, "nothing here").unwrap();
        let e = read_authorities(&p, BundleFormat::Pem, &td()).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        assert!(e.contains("spire-server bundle show >"), "{e}");
        let e = read_authorities(&p, BundleFormat::Spiffe, &td()).unwrap_err();
        assert!(e.contains("is not a SPIFFE bundle"), "{e}");
        assert!(e.contains("-format spiffe"), "{e}");
        std::fs::write(&p, r#"{"keys":[{"use":"wit-svid","kty":"EC"}]}"#).unwrap();
        let e = read_authorities(&p, BundleFormat::Spiffe, &td()).unwrap_err();
        assert!(e.contains("no x509-svid key"), "{e}");
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_authorities(&p, BundleFormat::Pem, &td()).unwrap_err();
        assert!(
            e.contains("certificate #1: the certificate is not DER"),
            "{e}"
        );
        let e =
            read_authorities(&dir.path().join("missing"), BundleFormat::Pem, &td()).unwrap_err();
        assert!(e.contains("cannot read the trust bundle"), "{e}");
    }
}
