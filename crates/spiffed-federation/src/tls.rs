//! TLS for both bundle endpoint profiles (SPIFFE Federation spec §5):
//!
//! - `https_spiffe`: the endpoint presents an X.509-SVID; the client checks that its chain
//!   verifies against the X.509 authorities of the endpoint's trust domain (the bundle it
//!   holds, bootstrapped and then refreshed from the endpoint itself) and that its one URI
//!   SAN is exactly the configured endpoint SPIFFE ID. No hostname check.
//! - `https_web`: the endpoint presents a Web PKI certificate; the client checks it as a
//!   browser would (roots of the host plus any configured, the URL's host name).

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};
use zeroize::Zeroizing;

/// The crypto provider of every bundle endpoint connection.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a certificate, key or root could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, and the fix.
        why: String,
    },
    /// A key cannot sign, or certificates are not what was expected.
    #[error("{0}")]
    Unusable(String),
}

fn file_error(path: &Path, why: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Every certificate of a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, format!("cannot read it: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            path,
            "no CERTIFICATE block in it; give a PEM file with the certificate chain",
        ));
    }
    Ok(certs)
}

/// A certificate chain and its key from PEM files, as rustls presents them.
pub fn certified_key_from_files(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        file_error(
            key_path,
            format!("not a PEM private key (PKCS#8, SEC1 or PKCS#1): {e}"),
        )
    })?;
    certified_key(chain, &key)
}

/// A chain and a key (PKCS#8 DER, any type rustls signs with) as rustls presents them.
pub fn certified_key_from_der(
    chain: &[Vec<u8>],
    pkcs8: &[u8],
) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = Zeroizing::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        pkcs8.to_vec(),
    )));
    certified_key(
        chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect(),
        &key,
    )
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| TlsError::Unusable(format!("the key cannot sign: {e}")))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        TlsError::Unusable(format!(
            "the key does not belong to the first certificate: {e}"
        ))
    })?;
    Ok(Arc::new(ck))
}

/// The certificate a bundle endpoint presents: whatever is current at each handshake (an
/// X.509-SVID is replaced at every rotation; a Web PKI certificate on reload).
#[derive(Debug, Default)]
pub struct CurrentCert(RwLock<Option<Arc<CertifiedKey>>>);

impl CurrentCert {
    /// Makes `key` the certificate of every later handshake.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// The current one (`None` before the first).
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// The URI SANs of a DER certificate.
pub(crate) fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut uris = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
    {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push((*u).to_owned());
            }
        }
    }
    Ok(uris)
}

/// Trust anchors from DER certificates.
pub fn anchors(ders: &[Vec<u8>]) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    let mut out = Vec::with_capacity(ders.len());
    for (i, der) in ders.iter().enumerate() {
        let c = CertificateDer::from(der.as_slice());
        let a = webpki::anchor_from_trusted_cert(&c).map_err(|e| {
            TlsError::Unusable(format!(
                "authority #{} is not a usable certificate: {e:?}",
                i + 1
            ))
        })?;
        out.push(a.to_owned());
    }
    if out.is_empty() {
        return Err(TlsError::Unusable(
            "the bundle has no X.509 authorities".to_owned(),
        ));
    }
    Ok(out)
}

/// Why an `https_spiffe` endpoint's certificate was refused. `Debug` is the message too, as
/// rustls shows a custom certificate error with `{:?}`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointCertError {
    /// The leaf does not parse.
    #[error("the endpoint's certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// The leaf's URI SANs are not exactly the expected ID.
    #[error(
        "the endpoint's certificate has the SPIFFE ID(s) [{got}], expected exactly {expected} \
         (endpoint_spiffe_id)"
    )]
    WrongId {
        /// The URI SANs found.
        got: String,
        /// The configured ID.
        expected: String,
    },
    /// The chain does not verify against the trust domain's bundle.
    #[error(
        "the endpoint's certificate does not chain to the bundle of {trust_domain} ({reason}); \
         if that trust domain's CA changed while this agent did not refresh, set its bundle \
         again (`spiffed bundle set`)"
    )]
    Untrusted {
        /// The endpoint's trust domain.
        trust_domain: String,
        /// webpki's reason.
        reason: String,
    },
}

impl std::fmt::Debug for EndpointCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Any EKU (or none) is acceptable for an X.509-SVID.
struct AnyEku;

impl webpki::ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

/// The `https_spiffe` check: the chain verifies against `anchors`, and the leaf's only URI
/// SAN is `endpoint_id`.
#[derive(Debug)]
pub struct SpiffeEndpointVerifier {
    trust_domain: String,
    endpoint_id: String,
    anchors: Vec<TrustAnchor<'static>>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeEndpointVerifier {
    /// A verifier for the endpoint `endpoint_id` of `trust_domain` with its bundle's X.509
    /// authorities as `anchors`.
    pub fn new(trust_domain: &str, endpoint_id: &str, anchors: Vec<TrustAnchor<'static>>) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            endpoint_id: endpoint_id.to_owned(),
            anchors,
            algs: provider().signature_verification_algorithms,
        }
    }

    /// The check, with our error type.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), EndpointCertError> {
        let uris = uri_sans(end_entity).map_err(EndpointCertError::Unparsable)?;
        if uris.len() != 1 || uris[0] != self.endpoint_id {
            return Err(EndpointCertError::WrongId {
                got: uris.join(", "),
                expected: self.endpoint_id.clone(),
            });
        }
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| EndpointCertError::Unparsable(format!("{e:?}")))?;
        ee.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            &AnyEku,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| EndpointCertError::Untrusted {
            trust_domain: self.trust_domain.clone(),
            reason: match e {
                webpki::Error::UnknownIssuer => {
                    "no authority in the bundle issued it (unknown issuer)".to_owned()
                }
                webpki::Error::CertExpired { .. } => {
                    "a certificate of its chain expired; check the clocks of both hosts".to_owned()
                }
                webpki::Error::CertNotValidYet { .. } => {
                    "a certificate of its chain is not valid yet; check the clocks of both hosts"
                        .to_owned()
                }
                other => format!("{other:?}"),
            },
        })
    }
}

impl ServerCertVerifier for SpiffeEndpointVerifier {
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

/// A failed handshake as a sentence: our verifier's message when it refused the endpoint's
/// certificate, rustls's otherwise.
pub(crate) fn describe_handshake_error(e: &std::io::Error) -> String {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other)))) =
        rustls_error
    {
        let other: &(dyn std::error::Error + 'static) = &**other;
        if let Some(ours) = other.downcast_ref::<EndpointCertError>() {
            return ours.to_string();
        }
    }
    format!("TLS handshake failed: {e}")
}
