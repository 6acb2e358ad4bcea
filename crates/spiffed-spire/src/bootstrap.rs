//! The bootstrap trust bundle: what authenticates the server before the agent has a bundle of
//! its own (SPIRE-AGENT.md §1). A PEM file (`spire-server bundle show`), or a SPIFFE bundle
//! (JWKS whose `x509-svid` keys carry the authority in `x5c`; `bundle show -format spiffe`).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::BundleFormat;

/// Reads the X.509 authorities (DER) from a bootstrap bundle file.
pub(crate) fn read_authorities(path: &Path, format: BundleFormat) -> Result<Vec<Vec<u8>>, String> {
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
        BundleFormat::Pem => pem(&bytes),
        BundleFormat::Spiffe => spiffe_json(&bytes),
    }
    .map_err(|e| format!("the trust bundle {} {e}; {fix}", path.display()))?;
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

fn pem(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(bytes) {
        out.push(c.map_err(|e| format!("is not PEM ({e})"))?.to_vec());
    }
    if out.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(out)
}

fn spiffe_json(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("is not JSON ({e})"))?;
    let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Err("is not a SPIFFE bundle (no \"keys\" array)".to_owned());
    };
    let mut out = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if key.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
            continue;
        }
        let x5c = key
            .get("x5c")
            .and_then(|x| x.as_array())
            .filter(|x| x.len() == 1)
            .ok_or_else(|| format!("key #{}: an x509-svid key has exactly one x5c", i + 1))?;
        let b64 = x5c[0]
            .as_str()
            .ok_or_else(|| format!("key #{}: x5c is not a string", i + 1))?;
        out.push(
            B64.decode(b64)
                .map_err(|e| format!("key #{}: x5c is not base64 ({e})", i + 1))?,
        );
    }
    if out.is_empty() {
        return Err("has no x509-svid key".to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::TestCa;

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
        let from_pem = read_authorities(&pem_path, BundleFormat::Pem).unwrap();
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
        let from_json = read_authorities(&json_path, BundleFormat::Spiffe).unwrap();
        assert_eq!(from_json, from_pem);
    }

    #[test]
    fn bad_bundles_say_how_to_make_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, "nothing here").unwrap();
        let e = read_authorities(&p, BundleFormat::Pem).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        assert!(e.contains("spire-server bundle show >"), "{e}");
        let e = read_authorities(&p, BundleFormat::Spiffe).unwrap_err();
        assert!(e.contains("is not JSON"), "{e}");
        assert!(e.contains("-format spiffe"), "{e}");
        std::fs::write(&p, r#"{"keys":[{"use":"jwt-svid"}]}"#).unwrap();
        let e = read_authorities(&p, BundleFormat::Spiffe).unwrap_err();
        assert!(e.contains("no x509-svid key"), "{e}");
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_authorities(&p, BundleFormat::Pem).unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
        let e = read_authorities(&dir.path().join("missing"), BundleFormat::Pem).unwrap_err();
        assert!(e.contains("cannot read the trust bundle"), "{e}");
    }
}
