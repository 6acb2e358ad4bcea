//! TLS to the SPIRE Server (rustls, ring provider, TLS 1.2 or 1.3, ALPN `h2`).
//!
//! The server is authenticated as spire-agent does (SPIRE-AGENT.md §1): its certificate chain
//! must verify against the X.509 authorities of the trust domain's bundle (any EKU, the current
//! time), and its leaf's only URI SAN must be exactly `spiffe://TD/spire/server`. There is no
//! hostname check: the server's SVID has no DNS SAN. With `insecure_bootstrap` (tests only)
//! the chain is not checked, but the ID still is.
//!
//! The client certificate is the *current* agent SVID, read at every handshake from
//! [`AgentCert`], so a rotation only has to swap it and drop pooled connections. `AttestAgent`
//! runs on a connection without a client certificate.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::cert;

/// Where the trust roots in use came from, for the fix in an error message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RootSource {
    /// The bootstrap bundle file (`trust_bundle_path`).
    Bootstrap(PathBuf),
    /// The bundle stored in the agent state after an attestation (it takes precedence).
    Stored(PathBuf),
}

/// The trust roots the server's certificate is verified against.
#[derive(Debug)]
pub(crate) enum RootSet {
    /// `insecure_bootstrap` with no stored bundle yet: no chain verification.
    Insecure,
    /// The X.509 authorities of the trust domain's bundle.
    Bundle {
        /// As trust anchors.
        anchors: Vec<TrustAnchor<'static>>,
        /// Where they came from.
        source: RootSource,
    },
}

impl RootSet {
    /// Trust anchors from DER certificates; an error names the certificate that is not one.
    pub(crate) fn from_ders(ders: &[Vec<u8>], source: RootSource) -> Result<Self, String> {
        let mut anchors = Vec::with_capacity(ders.len());
        for (i, der) in ders.iter().enumerate() {
            let c = CertificateDer::from(der.as_slice());
            let a = webpki::anchor_from_trusted_cert(&c)
                .map_err(|e| format!("authority #{} is not a usable certificate: {e:?}", i + 1))?;
            anchors.push(a.to_owned());
        }
        if anchors.is_empty() {
            return Err("the bundle has no X.509 authorities".to_owned());
        }
        Ok(Self::Bundle { anchors, source })
    }
}

/// The roots in use, swapped when the bundle changes.
#[derive(Debug)]
pub(crate) struct Roots(RwLock<Arc<RootSet>>);

impl Roots {
    pub(crate) fn new(set: RootSet) -> Self {
        Self(RwLock::new(Arc::new(set)))
    }

    pub(crate) fn get(&self) -> Arc<RootSet> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn set(&self, set: RootSet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }
}

/// Why the server's certificate was refused. `Debug` is the message too, since rustls shows
/// a custom certificate error with `{:?}`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ServerCertError {
    /// The leaf does not parse.
    #[error("the server's certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// The leaf has no URI SAN.
    #[error("the server's certificate has no SPIFFE ID (no URI SAN), expected {expected}")]
    NoId { expected: String },
    /// The leaf has several URI SANs.
    #[error("the server's certificate has {n} URI SANs ({ids}), expected exactly one, {expected}")]
    ManyIds {
        n: usize,
        ids: String,
        expected: String,
    },
    /// The leaf's ID is not the server's.
    #[error(
        "the server's certificate has ID {got}, expected {expected}: trust_domain must be the \
         server's, and the address that of a SPIRE Server of that trust domain"
    )]
    WrongId { got: String, expected: String },
    /// The chain does not verify against the roots.
    #[error("the server's certificate does not chain to the trust bundle ({reason}); {fix}")]
    Untrusted { reason: String, fix: String },
}

impl std::fmt::Debug for ServerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A failed handshake as a sentence: our verifier's own message when it refused the server's
/// certificate, rustls's otherwise.
pub(crate) fn describe_handshake_error(e: &std::io::Error) -> String {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other)))) =
        rustls_error
    {
        let other: &(dyn std::error::Error + 'static) = &**other;
        if let Some(ours) = other.downcast_ref::<ServerCertError>() {
            return ours.to_string();
        }
    }
    format!("TLS: {e}")
}

fn fix_for(source: &RootSource, td: &str) -> String {
    match source {
        RootSource::Bootstrap(p) => format!(
            "the bootstrap bundle {} must hold the current CA of trust domain {td} \
             (`spire-server bundle show > {}`)",
            p.display(),
            p.display()
        ),
        RootSource::Stored(p) => format!(
            "if the server's CA changed (a new server, or its data directory wiped), remove {} \
             so the agent bootstraps again from trust_bundle_path (a join-token agent then \
             needs a new token)",
            p.display()
        ),
    }
}

/// Any EKU (or none) is acceptable, as for SPIFFE (SPIRE checks no EKU on the server's SVID).
struct AnyEku;

impl webpki::ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

/// Checks the server's SPIFFE ID, then its chain (unless insecure).
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    td: String,
    server_id: String,
    roots: Arc<Roots>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerVerifier {
    /// A verifier for the server of trust domain `td` (its name, e.g. `example.org`).
    pub(crate) fn new(td: &str, roots: Arc<Roots>) -> Self {
        Self {
            td: td.to_owned(),
            server_id: format!("spiffe://{td}/spire/server"),
            roots,
            algs: provider().signature_verification_algorithms,
        }
    }

    /// The check itself, with our error type (tested directly).
    pub(crate) fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), ServerCertError> {
        let facts = cert::facts(end_entity).map_err(ServerCertError::Unparsable)?;
        let expected = self.server_id.clone();
        match facts.uris.as_slice() {
            [] => return Err(ServerCertError::NoId { expected }),
            [one] if *one == self.server_id => {}
            [one] => {
                return Err(ServerCertError::WrongId {
                    got: one.clone(),
                    expected,
                });
            }
            many => {
                return Err(ServerCertError::ManyIds {
                    n: many.len(),
                    ids: many.join(", "),
                    expected,
                });
            }
        }
        let roots = self.roots.get();
        let RootSet::Bundle { anchors, source } = &*roots else {
            return Ok(());
        };
        let untrusted = |reason: String| ServerCertError::Untrusted {
            reason,
            fix: fix_for(source, &self.td),
        };
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| ServerCertError::Unparsable(format!("{e:?}")))?;
        ee.verify_for_usage(
            self.algs.all,
            anchors,
            intermediates,
            now,
            AnyEku,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| {
            untrusted(match e {
                webpki::Error::UnknownIssuer => {
                    "no authority in the bundle issued it (unknown issuer)".to_owned()
                }
                webpki::Error::CertExpired { .. } => format!(
                    "a certificate of its chain expired; the leaf is valid until {}; check \
                     the clocks of both hosts",
                    cert::show(facts.not_after)
                ),
                webpki::Error::CertNotValidYet { .. } => format!(
                    "a certificate of its chain is not valid yet; the leaf is valid from {}; \
                     check the clocks of both hosts",
                    cert::show(facts.not_before)
                ),
                other => format!("{other:?}"),
            })
        })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The agent SVID presented as the client certificate: whatever is current at the handshake.
#[derive(Debug, Default)]
pub(crate) struct AgentCert(RwLock<Option<Arc<CertifiedKey>>>);

impl AgentCert {
    /// Makes `key` the certificate of every later handshake.
    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// The current one.
    pub(crate) fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesClientCert for AgentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The crypto provider of every connection to the server.
pub(crate) fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A client config for the server: the verifier, and the agent SVID as client certificate
/// (`None` for `AttestAgent`). No session resumption: a resumed session would skip the
/// server's verification against a changed bundle and carry the old client certificate.
pub(crate) fn client_config(
    verifier: Arc<ServerVerifier>,
    client_cert: Option<Arc<AgentCert>>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small PKI for tests: a CA, server SVIDs, agent SVIDs.

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use time::{Duration, OffsetDateTime};

    /// A CA that signs SVIDs.
    pub(crate) struct TestCa {
        pub(crate) cert_der: Vec<u8>,
        pub(crate) issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
            p.not_after = OffsetDateTime::now_utc() + Duration::days(1);
            let cert = p.self_signed(&key).unwrap();
            Self {
                cert_der: cert.der().to_vec(),
                issuer: Issuer::new(p, key),
            }
        }

        /// An SVID for `uris` with `key`, valid from `from` to `until` (relative to now).
        pub(crate) fn svid(
            &self,
            uris: &[&str],
            key: &KeyPair,
            from: Duration,
            until: Duration,
        ) -> Vec<u8> {
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name.push(DnType::OrganizationName, "SPIRE");
            p.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::KeyAgreement,
            ];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.not_before = OffsetDateTime::now_utc() + from;
            p.not_after = OffsetDateTime::now_utc() + until;
            p.signed_by(key, &self.issuer).unwrap().der().to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestCa;
    use super::*;
    use rcgen::KeyPair;
    use time::Duration;

    fn verifier(ca: &TestCa) -> ServerVerifier {
        let roots = RootSet::from_ders(
            std::slice::from_ref(&ca.cert_der),
            RootSource::Bootstrap("/etc/spiffed/bootstrap.pem".into()),
        )
        .unwrap();
        ServerVerifier::new("example.org", Arc::new(Roots::new(roots)))
    }

    fn server_cert(ca: &TestCa, uris: &[&str], until: Duration) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        CertificateDer::from(ca.svid(uris, &key, Duration::minutes(-1), until))
    }

    #[test]
    fn the_servers_svid_from_the_bundle_is_accepted() {
        let ca = TestCa::new("ca");
        let v = verifier(&ca);
        let leaf = server_cert(
            &ca,
            &["spiffe://example.org/spire/server"],
            Duration::hours(1),
        );
        v.check(&leaf, &[], UnixTime::now()).unwrap();
        // Through the rustls trait too.
        v.verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from("spire.example.org").unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap();
    }

    #[test]
    fn another_id_is_refused_and_named() {
        let ca = TestCa::new("ca");
        let v = verifier(&ca);
        let leaf = server_cert(&ca, &["spiffe://example.org/web"], Duration::hours(1));
        let e = v.check(&leaf, &[], UnixTime::now()).unwrap_err();
        assert_eq!(
            e,
            ServerCertError::WrongId {
                got: "spiffe://example.org/web".into(),
                expected: "spiffe://example.org/spire/server".into()
            }
        );
        assert!(e.to_string().contains(
            "has ID spiffe://example.org/web, expected spiffe://example.org/spire/server"
        ));
        // Another trust domain's server is not ours either.
        let leaf = server_cert(
            &ca,
            &["spiffe://other.org/spire/server"],
            Duration::hours(1),
        );
        assert!(matches!(
            v.check(&leaf, &[], UnixTime::now()),
            Err(ServerCertError::WrongId { .. })
        ));
        let leaf = server_cert(&ca, &[], Duration::hours(1));
        assert!(matches!(
            v.check(&leaf, &[], UnixTime::now()),
            Err(ServerCertError::NoId { .. })
        ));
        let leaf = server_cert(
            &ca,
            &[
                "spiffe://example.org/spire/server",
                "spiffe://example.org/x",
            ],
            Duration::hours(1),
        );
        assert!(matches!(
            v.check(&leaf, &[], UnixTime::now()),
            Err(ServerCertError::ManyIds { n: 2, .. })
        ));
    }

    #[test]
    fn a_chain_to_another_root_is_refused_with_the_fix() {
        let ca = TestCa::new("ca");
        let other = TestCa::new("other");
        let v = verifier(&ca);
        let leaf = server_cert(
            &other,
            &["spiffe://example.org/spire/server"],
            Duration::hours(1),
        );
        let e = v.check(&leaf, &[], UnixTime::now()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(
                "does not chain to the trust bundle (no authority in the bundle issued it"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("spire-server bundle show > /etc/spiffed/bootstrap.pem"),
            "{msg}"
        );

        // With the stored bundle, the fix is to bootstrap again.
        let roots = RootSet::from_ders(
            &[ca.cert_der],
            RootSource::Stored("/var/lib/spiffed/agent-state.json".into()),
        )
        .unwrap();
        let v = ServerVerifier::new("example.org", Arc::new(Roots::new(roots)));
        let msg = v
            .check(&leaf, &[], UnixTime::now())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("remove /var/lib/spiffed/agent-state.json"),
            "{msg}"
        );
    }

    #[test]
    fn an_expired_server_svid_is_refused() {
        let ca = TestCa::new("ca");
        let v = verifier(&ca);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateDer::from(ca.svid(
            &["spiffe://example.org/spire/server"],
            &key,
            Duration::hours(-2),
            Duration::hours(-1),
        ));
        let msg = v
            .check(&leaf, &[], UnixTime::now())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("expired"), "{msg}");
    }

    #[test]
    fn insecure_bootstrap_skips_the_chain_but_not_the_id() {
        let other = TestCa::new("other");
        let v = ServerVerifier::new("example.org", Arc::new(Roots::new(RootSet::Insecure)));
        let good = server_cert(
            &other,
            &["spiffe://example.org/spire/server"],
            Duration::hours(1),
        );
        v.check(&good, &[], UnixTime::now()).unwrap();
        let bad = server_cert(&other, &["spiffe://example.org/nope"], Duration::hours(1));
        assert!(matches!(
            v.check(&bad, &[], UnixTime::now()),
            Err(ServerCertError::WrongId { .. })
        ));
    }

    #[test]
    fn roots_can_be_swapped() {
        let ca = TestCa::new("ca");
        let next = TestCa::new("next");
        let roots = Arc::new(Roots::new(
            RootSet::from_ders(
                std::slice::from_ref(&ca.cert_der),
                RootSource::Stored("s".into()),
            )
            .unwrap(),
        ));
        let v = ServerVerifier::new("example.org", Arc::clone(&roots));
        let leaf = server_cert(
            &next,
            &["spiffe://example.org/spire/server"],
            Duration::hours(1),
        );
        assert!(v.check(&leaf, &[], UnixTime::now()).is_err());
        roots.set(
            RootSet::from_ders(
                &[ca.cert_der, next.cert_der.clone()],
                RootSource::Stored("s".into()),
            )
            .unwrap(),
        );
        v.check(&leaf, &[], UnixTime::now()).unwrap();
    }

    #[test]
    fn empty_or_bad_bundles_are_refused() {
        assert!(RootSet::from_ders(&[], RootSource::Stored("s".into())).is_err());
        let e =
            RootSet::from_ders(&[b"junk".to_vec()], RootSource::Stored("s".into())).unwrap_err();
        assert!(e.contains("authority #1"), "{e}");
    }
}
