//! A SPIRE Server double for unit tests: entries, a CA made with rcgen that signs the CSRs it
//! gets (checking their signatures, as the server does), JWT-SVIDs signed with a P-256 key,
//! federated bundles, and failure injection. Its time is a [`TestClock`] that follows tokio's
//! (paused) clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use spiffed_authority::Clock;
use spiffed_core::TrustDomain;
use spiffed_proto::spire::{svid, types};

use crate::server::{AuthorizedEntries, EntryVersion, ServerApi, ServerError};

/// Wall-clock time that moves with tokio's clock (paused in tests).
#[derive(Debug)]
pub(crate) struct TestClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl TestClock {
    pub(crate) fn new() -> Arc<Self> {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Arc::new(Self {
            base: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            start: tokio::time::Instant::now(),
        })
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

fn cert_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).unwrap();
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// A CA of the double.
pub(crate) struct TestCa {
    key: KeyPair,
    params: CertificateParams,
    pub(crate) der: Vec<u8>,
    pub(crate) tainted: bool,
}

impl TestCa {
    pub(crate) fn new(name: &str, now: SystemTime) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = cert_time(now - Duration::from_secs(3600));
        params.not_after = cert_time(now + Duration::from_secs(365 * 24 * 3600));
        params.serial_number = Some(serial());
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Self {
            key,
            params,
            der,
            tainted: false,
        }
    }

    /// Signs `public` (from a CSR, or any key) as an X.509-SVID for `uri`.
    fn sign(
        &self,
        public: &impl rcgen::PublicKeyData,
        uri: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Vec<u8> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "US");
        dn.push(DnType::OrganizationName, "SPIRE");
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().unwrap())];
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
        p.not_before = cert_time(now - Duration::from_secs(10));
        p.not_after = cert_time(now + ttl);
        p.serial_number = Some(serial());
        let issuer = Issuer::from_params(&self.params, &self.key);
        p.signed_by(public, &issuer).unwrap().der().to_vec()
    }
}

/// The PKIX form of an uncompressed P-256 point.
pub(crate) fn p256_pkix(point: &[u8]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    der.extend_from_slice(point);
    der
}

/// A PKIX RSA key (made up, but well-formed: the agent only reads its type).
pub(crate) fn rsa_pkix() -> Vec<u8> {
    // SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING { SEQUENCE { INTEGER n, INTEGER e } } }
    let mut modulus = vec![0x02, 0x41, 0x00];
    modulus.extend([0xc5; 64]);
    let exponent = [0x02, 0x03, 0x01, 0x00, 0x01];
    let mut rsa = vec![0x30, (modulus.len() + exponent.len()) as u8];
    rsa.extend(&modulus);
    rsa.extend(exponent);
    let mut bits = vec![0x03, (rsa.len() + 1) as u8, 0x00];
    bits.extend(&rsa);
    let alg = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut der = vec![0x30, 0x81, (alg.len() + bits.len()) as u8];
    der.extend(alg);
    der.extend(bits);
    der
}

/// What the double gets wrong on purpose in X.509 answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The SVID names another SPIFFE ID.
    WrongId,
    /// The SVID carries another public key than the CSR's.
    OtherKey,
    /// The chain holds bytes that are no certificate.
    Garbage,
    /// The SVID has no certificate.
    NoChain,
    /// Fewer results than CSRs.
    FewerResults,
    /// Every result is a PermissionDenied status.
    Refuse,
    /// Signed by a CA that is not in the bundle.
    UnknownCa,
    /// JWT-SVIDs name another subject.
    JwtWrongSub,
}

/// The double's state; tests change it through [`FakeServer::state`].
pub(crate) struct Fake {
    pub(crate) entries: BTreeMap<String, types::Entry>,
    /// X.509-SVID TTL per entry id (default one hour).
    pub(crate) ttl: HashMap<String, Duration>,
    /// Oldest first; the last signs.
    pub(crate) cas: Vec<TestCa>,
    pub(crate) jwt_key: EcdsaKeyPair,
    pub(crate) jwt_kid: String,
    pub(crate) jwt_ttl: Duration,
    /// JWT keys published besides the signing one.
    pub(crate) extra_jwt_keys: Vec<types::JwtKey>,
    pub(crate) federated: HashMap<String, types::Bundle>,
    /// Every call fails with this.
    pub(crate) down: Option<ServerError>,
    /// The next N `BatchNewX509SVID` calls fail.
    pub(crate) fail_x509_calls: usize,
    /// Every `BatchNewX509SVID` call past this many fails (a test of a loop ends instead of
    /// spinning on the paused clock forever).
    pub(crate) x509_call_limit: Option<usize>,
    pub(crate) fault: Option<Fault>,
    /// The number of CSRs of every `BatchNewX509SVID` call, failed ones too.
    pub(crate) batches: Vec<usize>,
    pub(crate) jwt_calls: usize,
    /// JWT-SVID answers carry no expires_at / issued_at (read from the token).
    pub(crate) omit_jwt_times: bool,
    pub(crate) sequence: u64,
    pub(crate) created: i64,
    pub(crate) entry_calls: usize,
    pub(crate) bundle_calls: usize,
}

/// The double.
pub(crate) struct FakeServer {
    pub(crate) td: TrustDomain,
    clock: Arc<TestClock>,
    st: Mutex<Fake>,
}

impl FakeServer {
    pub(crate) fn new(td: &str, clock: Arc<TestClock>) -> Arc<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let jwt_key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let now = clock.now();
        Arc::new(Self {
            td: TrustDomain::new(td).unwrap(),
            clock,
            st: Mutex::new(Fake {
                entries: BTreeMap::new(),
                ttl: HashMap::new(),
                cas: vec![TestCa::new("CA 1", now)],
                jwt_key,
                jwt_kid: "jwt-1".into(),
                jwt_ttl: Duration::from_secs(300),
                extra_jwt_keys: Vec::new(),
                federated: HashMap::new(),
                down: None,
                fail_x509_calls: 0,
                x509_call_limit: None,
                fault: None,
                batches: Vec::new(),
                jwt_calls: 0,
                omit_jwt_times: false,
                sequence: 1,
                created: 1_700_000_000,
                entry_calls: 0,
                bundle_calls: 0,
            }),
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, Fake> {
        self.st.lock().unwrap()
    }

    /// Registers (or replaces) an entry; a new `created_at` unless `keep_created`.
    pub(crate) fn put_entry(&self, id: &str, path: &str, selectors: &[&str], revision: i64) {
        let mut st = self.state();
        st.created += 1;
        let created_at = st.created;
        let e = types::Entry {
            id: id.into(),
            spiffe_id: Some(types::Spiffeid {
                trust_domain: self.td.to_string(),
                path: path.into(),
            }),
            parent_id: None,
            selectors: selectors
                .iter()
                .map(|s| {
                    let (t, v) = s.split_once(':').unwrap();
                    types::Selector {
                        r#type: t.into(),
                        value: v.into(),
                    }
                })
                .collect(),
            revision_number: revision,
            created_at,
            ..Default::default()
        };
        st.entries.insert(id.into(), e);
    }

    /// The entry's version as the server has it.
    pub(crate) fn version_of(&self, id: &str) -> EntryVersion {
        EntryVersion::of(&self.state().entries[id])
    }

    /// A new active CA; the old ones are marked tainted if `taint`.
    pub(crate) fn rotate_ca(&self, taint: bool) {
        let now = self.clock.now();
        let mut st = self.state();
        if taint {
            for ca in &mut st.cas {
                ca.tainted = true;
            }
        }
        let n = st.cas.len() + 1;
        st.cas.push(TestCa::new(&format!("CA {n}"), now));
        st.sequence += 1;
    }

    pub(crate) fn ca_der(&self, i: usize) -> Vec<u8> {
        self.state().cas[i].der.clone()
    }

    /// The bundle `GetBundle` answers.
    pub(crate) fn bundle(&self) -> types::Bundle {
        let st = self.state();
        let mut jwt = vec![types::JwtKey {
            public_key: p256_pkix(st.jwt_key.public_key().as_ref()),
            key_id: st.jwt_kid.clone(),
            expires_at: 0,
            tainted: false,
        }];
        jwt.extend(st.extra_jwt_keys.iter().cloned());
        types::Bundle {
            trust_domain: self.td.to_string(),
            x509_authorities: st
                .cas
                .iter()
                .map(|c| types::X509Certificate {
                    asn1: c.der.clone(),
                    tainted: c.tainted,
                })
                .collect(),
            jwt_authorities: jwt,
            refresh_hint: 0,
            sequence_number: st.sequence,
        }
    }

    /// A federated bundle for `td`, with a CA of its own.
    pub(crate) fn add_federated(&self, td: &str) {
        let ca = TestCa::new(&format!("{td} CA"), self.clock.now());
        let b = types::Bundle {
            trust_domain: td.into(),
            x509_authorities: vec![types::X509Certificate {
                asn1: ca.der,
                tainted: false,
            }],
            jwt_authorities: vec![],
            refresh_hint: 0,
            sequence_number: 1,
        };
        self.state().federated.insert(td.into(), b);
    }

    fn check_up(&self) -> Result<(), ServerError> {
        match &self.state().down {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn sign_jwt(
        &self,
        st: &Fake,
        sub: &str,
        aud: &[String],
        now: SystemTime,
    ) -> (String, i64, i64) {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let exp = iat + st.jwt_ttl.as_secs() as i64;
        let header = serde_json::json!({"alg": "ES256", "kid": st.jwt_kid, "typ": "JWT"});
        let claims = serde_json::json!({"sub": sub, "aud": aud, "exp": exp, "iat": iat});
        let msg = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let sig = st
            .jwt_key
            .sign(&SystemRandom::new(), msg.as_bytes())
            .unwrap();
        (format!("{msg}.{}", B64URL.encode(sig.as_ref())), exp, iat)
    }
}

fn not_found(what: &str) -> types::Status {
    types::Status {
        code: tonic::Code::NotFound as i32,
        message: format!("{what} not found or not authorized"),
    }
}

#[async_trait::async_trait]
impl ServerApi for FakeServer {
    async fn get_bundle(&self) -> Result<types::Bundle, ServerError> {
        self.state().bundle_calls += 1;
        self.check_up()?;
        Ok(self.bundle())
    }

    async fn get_federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<types::Bundle>, ServerError> {
        self.check_up()?;
        Ok(self.state().federated.get(trust_domain).cloned())
    }

    async fn authorized_entries(
        &self,
        cached: &HashMap<String, EntryVersion>,
    ) -> Result<AuthorizedEntries, ServerError> {
        self.check_up()?;
        let mut st = self.state();
        st.entry_calls += 1;
        Ok(AuthorizedEntries {
            changed: st
                .entries
                .values()
                .filter(|e| cached.get(&e.id) != Some(&EntryVersion::of(e)))
                .cloned()
                .collect(),
            authorized: st.entries.keys().cloned().collect(),
        })
    }

    async fn batch_new_x509_svid(
        &self,
        params: Vec<svid::NewX509svidParams>,
    ) -> Result<Vec<svid::batch_new_x509svid_response::Result>, ServerError> {
        self.check_up()?;
        let now = self.clock.now();
        let mut st = self.state();
        st.batches.push(params.len());
        if st.x509_call_limit.is_some_and(|l| st.batches.len() > l) {
            return Err(ServerError::Unreachable {
                address: "fake:8081".into(),
                reason: "the test's call limit".into(),
            });
        }
        if st.fail_x509_calls > 0 {
            st.fail_x509_calls -= 1;
            return Err(ServerError::Unreachable {
                address: "fake:8081".into(),
                reason: "injected failure".into(),
            });
        }
        let fault = st.fault;
        let mut out = Vec::new();
        for p in &params {
            let Some(entry) = st.entries.get(&p.entry_id) else {
                out.push(svid::batch_new_x509svid_response::Result {
                    status: Some(not_found("entry")),
                    svid: None,
                });
                continue;
            };
            if fault == Some(Fault::Refuse) {
                out.push(svid::batch_new_x509svid_response::Result {
                    status: Some(types::Status {
                        code: tonic::Code::PermissionDenied as i32,
                        message: "injected refusal".into(),
                    }),
                    svid: None,
                });
                continue;
            }
            let sid = entry.spiffe_id.clone().unwrap();
            let mut uri = format!("spiffe://{}{}", sid.trust_domain, sid.path);
            if fault == Some(Fault::WrongId) {
                uri.push_str("-not-yours");
            }
            let csr = CertificateSigningRequestParams::from_der(
                &rustls_pki_types::CertificateSigningRequestDer::from(p.csr.as_slice()),
            )
            .expect("the agent's CSR parses and is validly self-signed");
            let ttl = st
                .ttl
                .get(&p.entry_id)
                .copied()
                .unwrap_or(Duration::from_secs(3600));
            let chain = match fault {
                Some(Fault::OtherKey) => {
                    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                    vec![st.cas.last().unwrap().sign(&other, &uri, now, ttl)]
                }
                Some(Fault::Garbage) => vec![b"not a certificate".to_vec()],
                Some(Fault::NoChain) => vec![],
                Some(Fault::UnknownCa) => {
                    let rogue = TestCa::new("rogue", now);
                    vec![rogue.sign(&csr.public_key, &uri, now, ttl)]
                }
                _ => vec![st.cas.last().unwrap().sign(&csr.public_key, &uri, now, ttl)],
            };
            out.push(svid::batch_new_x509svid_response::Result {
                status: Some(types::Status {
                    code: 0,
                    message: "OK".into(),
                }),
                svid: Some(types::X509svid {
                    cert_chain: chain,
                    id: Some(sid),
                    expires_at: 0,
                    hint: entry.hint.clone(),
                }),
            });
        }
        if fault == Some(Fault::FewerResults) {
            out.pop();
        }
        Ok(out)
    }

    async fn new_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<types::Jwtsvid, ServerError> {
        self.check_up()?;
        let now = self.clock.now();
        let mut st = self.state();
        st.jwt_calls += 1;
        let Some(entry) = st.entries.get(entry_id) else {
            return Err(ServerError::Status {
                code: tonic::Code::NotFound,
                message: "entry not found or not authorized".into(),
            });
        };
        let sid = entry.spiffe_id.clone().unwrap();
        let mut sub = format!("spiffe://{}{}", sid.trust_domain, sid.path);
        if st.fault == Some(Fault::JwtWrongSub) {
            sub = format!("spiffe://{}/someone-else", sid.trust_domain);
        }
        let (token, exp, iat) = self.sign_jwt(&st, &sub, audience, now);
        let omit = st.omit_jwt_times;
        Ok(types::Jwtsvid {
            token,
            id: Some(sid),
            expires_at: if omit { 0 } else { exp },
            issued_at: if omit { 0 } else { iat },
            hint: String::new(),
        })
    }
}
