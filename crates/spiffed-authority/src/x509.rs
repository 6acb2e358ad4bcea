//! X.509 certificate minting: CA certificates and X.509-SVIDs (CONFORMANCE.md §9).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    SigningKey,
};
use ring::rand::{SecureRandom, SystemRandom};
use spiffed_core::{PrivateKey, SpiffeId, TrustDomain};
use time::OffsetDateTime;
use zeroize::{Zeroize, Zeroizing};

use crate::Error;
use crate::upstream::Upstream;

/// How far notBefore is backdated, for clock skew between hosts (as SPIRE does).
pub(crate) const NOT_BEFORE_CUSHION: Duration = Duration::from_secs(10);

/// A random positive serial of 16 bytes (about 126 random bits), never a repeat of a key hash.
pub(crate) fn random_serial(rng: &SystemRandom) -> Result<Vec<u8>, Error> {
    let mut b = vec![0u8; 16];
    rng.fill(&mut b)
        .map_err(|_| Error::Crypto("the system random generator failed".into()))?;
    if let Some(first) = b.first_mut() {
        // Positive (top bit clear) and no leading zero byte, so DER keeps all 16 bytes.
        *first = (*first & 0x7f) | 0x40;
    }
    Ok(b)
}

/// Whole seconds: X.509 times carry no fractions, so every time we keep is what the cert says.
pub(crate) fn to_cert_time(t: SystemTime) -> Result<OffsetDateTime, Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| Error::Crypto("the clock is before 1970".into()))?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| Error::Crypto("time out of range".into()))?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| Error::Crypto(e.to_string()))
}

pub(crate) fn from_cert_time(t: OffsetDateTime) -> SystemTime {
    let secs = u64::try_from(t.unix_timestamp()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A new P-256 key pair; the PKCS#8 copy rcgen keeps in it is wiped on drop.
pub(crate) fn new_key() -> Result<Zeroizing<KeyPair>, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map(Zeroizing::new)
        .map_err(|e| Error::Crypto(e.to_string()))
}

/// The active CA's key pair, as the [`Issuer`] holds it: the PKCS#8 copy rcgen keeps in it is
/// wiped on drop (rcgen's `zeroize` feature). ring's parsed form of the key, inside the pair,
/// cannot be wiped: ring has no zeroization and does not expose it.
pub(crate) struct CaKey(KeyPair);

impl CaKey {
    pub(crate) fn new(pair: KeyPair) -> Self {
        Self(pair)
    }

    /// The raw public key (an uncompressed point for ECDSA), as a certificate carries it.
    pub(crate) fn public_key_raw(&self) -> &[u8] {
        self.0.public_key_raw()
    }
}

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// A freshly minted CA certificate and its key.
pub(crate) struct MintedCa {
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_pkcs8: Zeroizing<Vec<u8>>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// Signed by an upstream: the certificates that follow it in a chain (empty: self-signed).
    pub(crate) chain: Vec<Vec<u8>>,
    /// Signed by an upstream: the upstream roots it chains to (empty: it is its own root).
    pub(crate) roots: Vec<Vec<u8>>,
}

/// Mints a CA for `td`, valid from now (minus the cushion) for `ttl`: self-signed, or signed
/// by `upstream` and then valid no longer than the upstream's chain.
pub(crate) fn mint_ca(
    td: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
    rng: &SystemRandom,
    upstream: Option<&Upstream>,
) -> Result<MintedCa, Error> {
    let key = new_key()?;
    let serial = random_serial(rng)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "spiffed");
    dn.push(DnType::CommonName, format!("spiffed CA {td}"));
    dn.push(
        DnType::CustomDnType(vec![2, 5, 4, 5]),
        hex(&serial).chars().take(32).collect::<String>(),
    );
    p.distinguished_name = dn;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        td.id_string()
            .try_into()
            .map_err(|e: rcgen::Error| Error::Crypto(e.to_string()))?,
    )];
    let mut not_after = now + ttl;
    if let Some(up) = upstream
        && up.not_after < not_after
    {
        tracing::warn!(
            ca_ttl = %humantime::format_duration(ttl),
            upstream_not_after = %crate::ca::rfc3339(up.not_after),
            "the upstream CA expires before ca_ttl is over: the new CA is capped to the \
             upstream's notAfter; renew the upstream certificate"
        );
        not_after = up.not_after;
    }
    let nb = to_cert_time(now - NOT_BEFORE_CUSHION)?;
    let na = to_cert_time(not_after)?;
    p.not_before = nb;
    p.not_after = na;
    let bad = |e: rcgen::Error| Error::Crypto(e.to_string());
    let (cert, chain, roots) = match upstream {
        None => (p.self_signed(&*key).map_err(bad)?, vec![], vec![]),
        Some(up) => {
            p.use_authority_key_identifier_extension = true;
            let issuer =
                Issuer::from_ca_cert_der(&up.cert_der.as_slice().into(), &up.key).map_err(bad)?;
            let cert = p.signed_by(&*key, &issuer).map_err(bad)?;
            (cert, up.chain.clone(), up.roots.clone())
        }
    };
    Ok(MintedCa {
        cert_der: cert.der().to_vec(),
        key_pkcs8: Zeroizing::new(key.serialize_der()),
        not_before: from_cert_time(nb),
        not_after: from_cert_time(na),
        chain,
        roots,
    })
}

/// A signing CA loaded for use.
pub(crate) struct Signer {
    pub(crate) issuer: Issuer<'static, CaKey>,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// What follows the leaf in an SVID chain (DER, concatenated): nothing under a
    /// self-signed CA, whose certificate is in the bundle; this CA's certificate and the
    /// upstream intermediates under an upstream, whose roots are the bundle.
    pub(crate) chain_tail: Vec<u8>,
}

impl Signer {
    /// A signer for the CA `cert_der` with key `key_pkcs8`; `upstream_chain` is what follows
    /// it in a chain when an upstream signed it (`None`: self-signed).
    pub(crate) fn new(
        cert_der: &[u8],
        key_pkcs8: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
        upstream_chain: Option<&[Vec<u8>]>,
    ) -> Result<Self, Error> {
        let key = CaKey(KeyPair::try_from(key_pkcs8).map_err(|e| Error::Crypto(e.to_string()))?);
        let issuer = Issuer::from_ca_cert_der(&cert_der.into(), key)
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let chain_tail = match upstream_chain {
            None => vec![],
            Some(rest) => std::iter::once(cert_der)
                .chain(rest.iter().map(Vec::as_slice))
                .flatten()
                .copied()
                .collect(),
        };
        Ok(Self {
            issuer,
            cert_der: cert_der.to_vec(),
            not_before,
            not_after,
            chain_tail,
        })
    }

    /// Whether the CA certificate is valid at `now`: notBefore <= now < notAfter.
    pub(crate) fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// A freshly minted leaf.
pub(crate) struct MintedSvid {
    pub(crate) chain_der: Vec<u8>,
    pub(crate) key: PrivateKey,
    pub(crate) serial: Vec<u8>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// Mints an X.509-SVID for `id` signed by `signer`, valid for `ttl` but never past the signer
/// nor before it. Refuses with [`Error::NoValidCa`] when the signer is not valid at `now`, so
/// an SVID is never born expired (notBefore > notAfter) or under a CA not yet valid.
pub(crate) fn mint_svid(
    signer: &Signer,
    id: &SpiffeId,
    dns_names: &[String],
    ttl: Duration,
    now: SystemTime,
    rng: &SystemRandom,
) -> Result<MintedSvid, Error> {
    let key = new_key()?;
    let serial = random_serial(rng)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "spiffed");
    p.distinguished_name = dn;
    let bad = |e: rcgen::Error| Error::Crypto(e.to_string());
    let mut sans = vec![SanType::URI(id.to_string().try_into().map_err(bad)?)];
    for d in dns_names {
        sans.push(SanType::DnsName(d.as_str().try_into().map_err(bad)?));
    }
    p.subject_alt_names = sans;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    if !signer.valid_at(now) {
        return Err(Error::NoValidCa(format!(
            "the signing CA is valid from {} to {}, not at {}",
            crate::ca::rfc3339(signer.not_before),
            crate::ca::rfc3339(signer.not_after),
            crate::ca::rfc3339(now)
        )));
    }
    let earliest = now.checked_sub(NOT_BEFORE_CUSHION).unwrap_or(now);
    let nb = to_cert_time(earliest.max(signer.not_before))?;
    let na = to_cert_time((now + ttl).min(signer.not_after))?;
    if !(from_cert_time(nb) <= now && now < from_cert_time(na)) {
        return Err(Error::NoValidCa(format!(
            "an SVID minted at {} would not be valid then (the signing CA expires at {})",
            crate::ca::rfc3339(now),
            crate::ca::rfc3339(signer.not_after)
        )));
    }
    p.not_before = nb;
    p.not_after = na;
    let cert = p.signed_by(&*key, &signer.issuer).map_err(bad)?;
    let mut chain_der = Vec::with_capacity(cert.der().len() + signer.chain_tail.len());
    chain_der.extend_from_slice(cert.der());
    chain_der.extend_from_slice(&signer.chain_tail);
    Ok(MintedSvid {
        chain_der,
        key: PrivateKey::new(Zeroizing::new(key.serialize_der())),
        serial,
        not_before: from_cert_time(nb),
        not_after: from_cert_time(na),
    })
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn svid_has_the_profile_clients_check() {
        let rng = SystemRandom::new();
        let td = TrustDomain::new("example.org").unwrap();
        let now = SystemTime::now();
        let ca = mint_ca(&td, Duration::from_secs(3600), now, &rng, None).unwrap();
        let signer = Signer::new(
            &ca.cert_der,
            &ca.key_pkcs8,
            ca.not_before,
            ca.not_after,
            None,
        )
        .unwrap();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let svid = mint_svid(
            &signer,
            &id,
            &["web.internal".into()],
            Duration::from_secs(7200),
            now,
            &rng,
        )
        .unwrap();
        // Capped at the CA's notAfter.
        assert_eq!(svid.not_after, ca.not_after);

        let (_, leaf) = X509Certificate::from_der(&svid.chain_der).unwrap();
        let (_, root) = X509Certificate::from_der(&ca.cert_der).unwrap();
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://example.org/web"]);
        assert!(
            san.value
                .general_names
                .iter()
                .any(|g| matches!(g, GeneralName::DNSName("web.internal")))
        );
        assert_eq!(leaf.raw_serial(), &svid.serial[..]);
        assert_eq!(svid.serial.len(), 16);
        assert!(svid.serial[0] < 0x80);
        // Signed by the root, AKI = root SKI.
        leaf.verify_signature(Some(root.public_key())).unwrap();
        let root_bc = root.basic_constraints().unwrap().unwrap();
        assert!(root_bc.value.ca);
        assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
        // The key is PKCS#8 for the leaf's public key.
        let kp = KeyPair::try_from(svid.key.pkcs8_der()).unwrap();
        assert_eq!(
            kp.public_key_raw(),
            leaf.public_key().subject_public_key.data.as_ref()
        );
        // The same parser a Rust client uses accepts it.
        spiffe::X509Svid::parse_from_der(&svid.chain_der, svid.key.pkcs8_der()).unwrap();
    }

    #[test]
    fn serials_do_not_repeat() {
        let rng = SystemRandom::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(random_serial(&rng).unwrap()));
        }
    }
}
