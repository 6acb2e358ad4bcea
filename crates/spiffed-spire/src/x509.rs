//! The X.509 side of minting through the server: a fresh key and a self-signed CSR per entry,
//! and the checks an X.509-SVID from the server passes before anyone gets it.
//!
//! The server sets everything in the certificate from its entry (SPIFFE ID, DNS names, TTL) and
//! takes only the public key from the CSR. So what comes back is checked against what we asked
//! for: the leaf names the entry's SPIFFE ID, carries our key, is valid now, and its chain
//! verifies (signature by signature) up to an X.509 authority of the trust domain's bundle.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use spiffed_core::{PrivateKey, SpiffeId, X509Svid};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA};
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

/// Most certificates accepted in one chain (leaf and intermediates).
const MAX_CHAIN: usize = 16;
/// How far in the future a notBefore may be (the server's clock ahead of ours).
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(300);

/// A fresh P-256 key and a CSR for it, self-signed, naming the SPIFFE ID in its URI SAN (as
/// spire-agent's; the server only takes the key from it).
pub(crate) struct NewKey {
    /// The private key, PKCS#8 DER; zeroized on drop.
    pub(crate) pkcs8: Zeroizing<Vec<u8>>,
    /// The public key as the certificate carries it (uncompressed point).
    pub(crate) public: Vec<u8>,
    /// The CSR, DER.
    pub(crate) csr: Vec<u8>,
}

/// Generates a key and its CSR for `id`.
pub(crate) fn new_key(id: &SpiffeId) -> Result<NewKey, String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map(Zeroizing::new)
        .map_err(|e| format!("generating a P-256 key failed: {e}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "SPIRE");
    params.distinguished_name = dn;
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| format!("{id} cannot go in a CSR: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&*key)
        .map_err(|e| format!("signing the CSR failed: {e}"))?;
    Ok(NewKey {
        pkcs8: Zeroizing::new(key.serialize_der()),
        public: key.public_key_raw().to_vec(),
        csr: csr.der().to_vec(),
    })
}

/// One X.509 authority of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Authority {
    /// The CA certificate, DER.
    pub(crate) der: Vec<u8>,
    /// Marked tainted by the server: SVIDs that chain to it are re-minted at once.
    pub(crate) tainted: bool,
}

/// An SVID that passed the checks, and the authority its chain verified to.
pub(crate) struct Checked {
    pub(crate) svid: X509Svid,
    /// The DER of the bundle authority the chain verifies to.
    pub(crate) anchor: Vec<u8>,
}

pub(crate) fn to_system_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(format!("{what} has trailing bytes after the certificate")),
        Err(e) => Err(format!("{what} is not a DER certificate: {e}")),
    }
}

/// Splits concatenated DER certificates.
pub(crate) fn split_chain(mut der: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    while !der.is_empty() {
        if out.len() >= MAX_CHAIN {
            return Err(format!("the chain has more than {MAX_CHAIN} certificates"));
        }
        let (rest, _) = X509Certificate::from_der(der)
            .map_err(|e| format!("certificate {} of the chain does not parse: {e}", out.len()))?;
        let (one, rest) = der.split_at(der.len() - rest.len());
        out.push(one);
        der = rest;
    }
    Ok(out)
}

fn valid_at(cert: &X509Certificate<'_>, now: SystemTime) -> bool {
    let v = cert.validity();
    let now = secs(now);
    v.not_before.timestamp() <= now.saturating_add(MAX_SKEW.as_secs() as i64)
        && now < v.not_after.timestamp()
}

fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    let alg = &child.signature_algorithm.algorithm;
    if *alg == OID_PKCS1_SHA1WITHRSA || *alg == OID_SHA1_WITH_RSA {
        return false;
    }
    child.verify_signature(Some(parent.public_key())).is_ok()
}

/// Checks an SVID chain (`chain`, leaf first) for `want` with public key `public` at `now`,
/// up to one of `authorities` (untainted ones are tried first). Builds the SVID with `key`.
pub(crate) fn check_chain(
    chain: &[&[u8]],
    want: &SpiffeId,
    public: &[u8],
    key: Zeroizing<Vec<u8>>,
    authorities: &[Authority],
    now: SystemTime,
) -> Result<Checked, String> {
    if chain.is_empty() {
        return Err("the SVID has no certificate".into());
    }
    if chain.len() > MAX_CHAIN {
        return Err(format!("the chain has more than {MAX_CHAIN} certificates"));
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse(der, &format!("certificate {i} of the chain")))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = certs.first().ok_or("the SVID has no certificate")?;
    let uris: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(format!(
                "the leaf's subject alternative names are invalid: {e}"
            ));
        }
    };
    let want_s = want.to_string();
    match uris.as_slice() {
        [one] if *one == want_s => {}
        [one] => {
            return Err(format!(
                "the SVID is for {}, not for {want_s}",
                spiffed_core::untrusted::clip(one)
            ));
        }
        [] => return Err(format!("the SVID has no URI SAN (want {want_s})")),
        more => {
            return Err(format!(
                "the SVID has {} URI SANs; an X.509-SVID has exactly one ({want_s})",
                more.len()
            ));
        }
    }
    if leaf.public_key().subject_public_key.data.as_ref() != public {
        return Err("the SVID's public key is not the key of our CSR".into());
    }
    match leaf.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err("the SVID's leaf is a CA certificate".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("the leaf's basic constraints are invalid: {e}")),
    }
    let v = leaf.validity();
    let not_before = to_system_time(v.not_before.timestamp());
    let not_after = to_system_time(v.not_after.timestamp());
    if not_after <= now {
        return Err(format!(
            "the SVID expired at {} (notAfter); the clocks of the server and this host differ?",
            v.not_after
        ));
    }
    if not_before > now + MAX_SKEW {
        return Err(format!(
            "the SVID is valid only from {} (notBefore); the clocks of the server and this host \
             differ",
            v.not_before
        ));
    }
    for (i, pair) in certs.windows(2).enumerate() {
        let [child, parent] = pair else { continue };
        if !parent.is_ca() {
            return Err(format!(
                "certificate {} of the chain signs certificate {i} but is not a CA",
                i + 1
            ));
        }
        if !valid_at(parent, now) {
            return Err(format!(
                "certificate {} of the chain is not valid now",
                i + 1
            ));
        }
        if !signed_by(child, parent) {
            return Err(format!(
                "certificate {i} of the chain is not signed by certificate {}",
                i + 1
            ));
        }
    }
    let top = certs.last().ok_or("the SVID has no certificate")?;
    let top_der = chain.last().copied().unwrap_or_default();
    let ordered = authorities
        .iter()
        .filter(|a| !a.tainted)
        .chain(authorities.iter().filter(|a| a.tainted));
    let mut anchor = None;
    for a in ordered {
        if chain.len() > 1 && a.der == top_der {
            anchor = Some(a.der.clone());
            break;
        }
        let Ok(ca) = parse(&a.der, "an authority") else {
            continue;
        };
        if ca.is_ca() && valid_at(&ca, now) && signed_by(top, &ca) {
            anchor = Some(a.der.clone());
            break;
        }
    }
    let Some(anchor) = anchor else {
        return Err(if authorities.is_empty() {
            "the trust domain's bundle is not known yet (no X.509 authority to verify the SVID \
             with)"
                .to_owned()
        } else {
            format!(
                "the SVID's chain does not verify to any of the {} X.509 authorities of the \
                 trust domain's bundle",
                authorities.len()
            )
        });
    };
    Ok(Checked {
        svid: X509Svid {
            spiffe_id: want.clone(),
            cert_chain_der: chain.concat(),
            key: PrivateKey::new(key),
            serial: leaf.raw_serial().to_vec(),
            not_before,
            not_after,
        },
        anchor,
    })
}

/// Whether an SVID with this chain (concatenated DER) chains to any of `tainted` (DERs of
/// authorities): one of its certificates is one, or its top certificate is signed by one.
pub(crate) fn chains_to_any(chain_der: &[u8], anchor: &[u8], tainted: &[&[u8]]) -> bool {
    if tainted.contains(&anchor) {
        return true;
    }
    let Ok(chain) = split_chain(chain_der) else {
        return false;
    };
    if chain.iter().any(|c| tainted.contains(c)) {
        return true;
    }
    let Some(top) = chain.last().and_then(|d| parse(d, "top").ok()) else {
        return false;
    };
    tainted.iter().any(|t| {
        parse(t, "an authority")
            .map(|ca| signed_by(&top, &ca))
            .unwrap_or(false)
    })
}

/// The public key (uncompressed point) of a PKCS#8 P-256 key, checking it parses.
pub(crate) fn public_of(pkcs8: &[u8]) -> Result<Vec<u8>, String> {
    let pair = KeyPair::try_from(pkcs8).map_err(|e| format!("the key does not parse: {e}"))?;
    let pair = Zeroizing::new(pair);
    Ok(pair.public_key_raw().to_vec())
}
