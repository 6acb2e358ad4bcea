//! The upstream authority as a user sees it: the chain a workload gets, the bundle its peers
//! get, CA lifetimes capped by the upstream, rotations and switches that keep the overlap, and
//! one clear error per bad upstream file. Chains are checked with rustls-webpki, the verifier
//! rustls uses.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer as RcIssuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffed_core::{Entry, EntryId, Issuer as _, Selector, TrustDomain};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::*;
use crate::clock::testing::ManualClock;
use crate::x509::to_cert_time;
use crate::{AuthorityConfig, CaAuthority, DEFAULT_PREMINT_ENTRIES, Error, NewRootPolicy};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A test CA: its parameters (to sign with), key and certificate.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
    pem: String,
}

fn params(cn: &str, nb: SystemTime, na: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = to_cert_time(nb).unwrap();
    p.not_after = to_cert_time(na).unwrap();
    p
}

fn make(p: CertificateParams, issuer: Option<&TestCa>) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let cert = match issuer {
        None => p.self_signed(&key).unwrap(),
        Some(i) => p
            .signed_by(&key, &RcIssuer::from_params(&i.params, &i.key))
            .unwrap(),
    };
    TestCa {
        params: p,
        key,
        der: cert.der().to_vec(),
        pem: cert.pem(),
    }
}

fn root(cn: &str) -> TestCa {
    make(params(cn, t0() - DAY, t0() + 30 * DAY), None)
}

fn under(cn: &str, issuer: &TestCa) -> TestCa {
    make(params(cn, t0() - DAY, t0() + 30 * DAY), Some(issuer))
}

fn write(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes the upstream files into `dir` (0600 key, 0644 certificates).
fn files(dir: &Path, cert_pem: &str, key_pem: &str, bundle_pem: Option<&str>) -> UpstreamConfig {
    fs::create_dir_all(dir).unwrap();
    let cfg = UpstreamConfig {
        cert_file_path: dir.join("upstream.crt"),
        key_file_path: dir.join("upstream.key"),
        bundle_file_path: bundle_pem.map(|_| dir.join("bundle.crt")),
    };
    write(&cfg.cert_file_path, cert_pem, 0o644);
    write(&cfg.key_file_path, key_pem, 0o600);
    if let (Some(p), Some(b)) = (&cfg.bundle_file_path, bundle_pem) {
        write(p, b, 0o644);
    }
    cfg
}

fn cfg(dir: &Path, upstream: Option<UpstreamConfig>) -> AuthorityConfig {
    AuthorityConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.to_owned(),
        ca_ttl: HOUR,
        x509_svid_ttl: Duration::from_secs(600),
        jwt_svid_ttl: Duration::from_secs(300),
        new_root: NewRootPolicy::Refuse,
        premint_entries: DEFAULT_PREMINT_ENTRIES,
        upstream,
    }
}

fn open(dir: &Path, upstream: Option<UpstreamConfig>, clock: &Arc<ManualClock>) -> CaAuthority {
    CaAuthority::open_with_clock(cfg(dir, upstream), clock.clone()).unwrap()
}

/// A fresh SVID from the CA signing now: a new entry each time, so nothing cached is reused.
fn fresh_svid(a: &CaAuthority, n: &mut u32) -> Arc<spiffed_core::X509Svid> {
    *n += 1;
    let e = Arc::new(Entry {
        id: EntryId::new(format!("e{n}")),
        spiffe_id: format!("spiffe://example.org/w{n}").parse().unwrap(),
        selectors: vec!["unix:uid:1".parse::<Selector>().unwrap()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    });
    let mut f = pin!(a.x509_svid(&e));
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(w) => w.unwrap().peek(),
        Poll::Pending => panic!("the fetch waited"),
    }
}

fn bundle(a: &CaAuthority) -> Vec<Vec<u8>> {
    a.bundles().borrow().own().x509.authorities.clone()
}

/// The certificates of a concatenated DER chain.
fn split(chain: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    let mut rest = chain;
    while !rest.is_empty() {
        let (next, _) = X509Certificate::from_der(rest).unwrap();
        out.push(rest[..rest.len() - next.len()].to_vec());
        rest = next;
    }
    out
}

/// Verifies `chain` (leaf first, then intermediates) up to one of `roots` at `at`, for client
/// authentication, as a peer's rustls would.
fn verify(chain: &[u8], roots: &[Vec<u8>], at: SystemTime) -> Result<(), webpki::Error> {
    let certs = split(chain);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let inter: Vec<CertificateDer<'_>> = certs[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(certs[0].as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    let time = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn svid_chains_carry_the_intermediates_and_the_bundle_is_the_upstream_root() {
    let r = root("Org Root");
    let i = under("Org Intermediate", &r);
    let dir = tempfile::tempdir().unwrap();
    let up = files(
        &dir.path().join("up"),
        &i.pem,
        &i.key.serialize_pem(),
        Some(&r.pem),
    );
    let clock = Arc::new(ManualClock::new(t0()));
    let a = open(&dir.path().join("data"), Some(up.clone()), &clock);
    // The bundle is the upstream root alone, not the agent's CA.
    assert_eq!(bundle(&a), vec![r.der.clone()]);
    let mut n = 0;
    let svid = fresh_svid(&a, &mut n);
    let certs = split(&svid.cert_chain_der);
    // Leaf, the agent's CA, the upstream intermediate; never the root.
    assert_eq!(certs.len(), 3, "leaf + agent CA + upstream intermediate");
    assert_eq!(certs[2], i.der);
    assert!(!certs.contains(&r.der));
    verify(&svid.cert_chain_der, &bundle(&a), t0()).unwrap();
    // Another root does not verify it: the chain really goes through the upstream.
    let other = root("Other Root");
    assert!(verify(&svid.cert_chain_der, &[other.der], t0()).is_err());
    // The agent's CA: an intermediate for the trust domain, signed by the upstream.
    let (_, ca) = X509Certificate::from_der(&certs[1]).unwrap();
    let (_, upstream) = X509Certificate::from_der(&i.der).unwrap();
    assert_eq!(ca.issuer().as_raw(), upstream.subject().as_raw());
    ca.verify_signature(Some(upstream.public_key())).unwrap();
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    let ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let san = ca.subject_alternative_name().unwrap().unwrap().value;
    assert!(
        san.general_names
            .iter()
            .any(|g| matches!(g, GeneralName::URI("spiffe://example.org")))
    );
    // The Rust spiffe crate accepts the chain as an X.509-SVID.
    spiffe::X509Svid::parse_from_der(&svid.cert_chain_der, svid.key.pkcs8_der()).unwrap();

    // A restart serves the same CA and chain from ca.json, whatever the files say now: the
    // upstream key is re-read only to sign the next CA.
    drop(a);
    let j = under("Org Intermediate 2", &r);
    files(
        &dir.path().join("up"),
        &j.pem,
        &j.key.serialize_pem(),
        Some(&r.pem),
    );
    let a = open(&dir.path().join("data"), Some(up), &clock);
    let again = split(&fresh_svid(&a, &mut n).cert_chain_der);
    assert_eq!(again[1..], certs[1..]);
    assert_eq!(bundle(&a), vec![r.der]);
}

#[test]
fn a_self_signed_upstream_is_the_root_and_not_in_the_chain() {
    let r = root("Org Root");
    let dir = tempfile::tempdir().unwrap();
    let up = files(&dir.path().join("up"), &r.pem, &r.key.serialize_pem(), None);
    let clock = Arc::new(ManualClock::new(t0()));
    let a = open(&dir.path().join("data"), Some(up), &clock);
    assert_eq!(bundle(&a), vec![r.der.clone()]);
    let svid = fresh_svid(&a, &mut 0);
    let certs = split(&svid.cert_chain_der);
    assert_eq!(certs.len(), 2, "leaf + agent CA");
    assert!(!certs.contains(&r.der));
    verify(&svid.cert_chain_der, &[r.der], t0()).unwrap();
}

#[test]
fn the_ca_never_outlives_the_upstream() {
    // The upstream expires in 30 minutes; ca_ttl is an hour.
    let r = make(params("Short Root", t0() - DAY, t0() + HOUR / 2), None);
    let dir = tempfile::tempdir().unwrap();
    let up = files(&dir.path().join("up"), &r.pem, &r.key.serialize_pem(), None);
    let clock = Arc::new(ManualClock::new(t0()));
    let (a, logs) = crate::tests::logged(|| open(&dir.path().join("data"), Some(up), &clock));
    let (_, not_after) = a.ca_validity().unwrap();
    assert_eq!(not_after, t0() + HOUR / 2);
    // Said at start, and again when the capped CA is made.
    let loud = logs.loud();
    assert!(
        loud.iter()
            .any(|l| l.contains("expires before ca_ttl")
                && l.contains("renew the upstream certificate")),
        "{loud:?}"
    );
    assert!(
        loud.iter()
            .any(|l| l.contains("capped to the upstream's notAfter")),
        "{loud:?}"
    );
    let svid = fresh_svid(&a, &mut 0);
    assert!(svid.not_after <= t0() + HOUR / 2);
    verify(&svid.cert_chain_der, &bundle(&a), t0()).unwrap();

    // The same when only the root in bundle_file_path expires early.
    let short_root = make(params("Short Root", t0() - DAY, t0() + HOUR / 3), None);
    let long_int = under("Long Intermediate", &short_root);
    let up = files(
        &dir.path().join("up2"),
        &long_int.pem,
        &long_int.key.serialize_pem(),
        Some(&short_root.pem),
    );
    let b = open(&dir.path().join("data2"), Some(up), &clock);
    assert_eq!(b.ca_validity().unwrap().1, t0() + HOUR / 3);
}

/// Two hosts with their own data dirs and the same upstream verify each other's SVIDs at every
/// phase of two CA rotations, and through a renewed upstream intermediate and a new root.
#[test]
fn hosts_sharing_an_upstream_verify_each_other_across_rotations() {
    let r = root("Org Root");
    let i = under("Org Intermediate", &r);
    let dir = tempfile::tempdir().unwrap();
    let up = files(
        &dir.path().join("up"),
        &i.pem,
        &i.key.serialize_pem(),
        Some(&r.pem),
    );
    let clock = Arc::new(ManualClock::new(t0()));
    let a = open(&dir.path().join("a"), Some(up.clone()), &clock);
    let b = open(&dir.path().join("b"), Some(up), &clock);
    let mut n = 0;
    let check = |at: SystemTime, n: &mut u32| {
        clock.set(at);
        a.tick(at);
        b.tick(at);
        let sa = fresh_svid(&a, n);
        let sb = fresh_svid(&b, n);
        verify(&sa.cert_chain_der, &bundle(&b), at).unwrap_or_else(|e| panic!("A by B: {e:?}"));
        verify(&sb.cert_chain_der, &bundle(&a), at).unwrap_or_else(|e| panic!("B by A: {e:?}"));
        verify(&sa.cert_chain_der, &bundle(&a), at).unwrap();
        split(&sa.cert_chain_der)
    };
    // ca_ttl 1h: each CA is prepared at its predecessor's half-life (30m), signs from five
    // sixths (50m) and leaves the bundle when it expires (60m). Every 5 minutes for five
    // hours: the upstream intermediate is renewed at 90m, and a new root replaces the old at
    // 175m.
    let j = under("Org Intermediate 2", &r);
    let r2 = root("Org Root 2");
    let mut cas: Vec<Vec<u8>> = vec![];
    let mut renewed_chain_seen = false;
    let mut saw_both = false;
    for m in (0..=300).step_by(5) {
        if m == 90 {
            files(
                &dir.path().join("up"),
                &j.pem,
                &j.key.serialize_pem(),
                Some(&r.pem),
            );
        }
        if m == 175 {
            files(
                &dir.path().join("up"),
                &r2.pem,
                &r2.key.serialize_pem(),
                Some(&r2.pem),
            );
        }
        let at = t0() + Duration::from_secs(m * 60);
        let chain = check(at, &mut n);
        let roots = bundle(&a);
        if m <= 85 {
            if !cas.contains(&chain[1]) {
                cas.push(chain[1].clone());
            }
            assert_eq!(roots, vec![r.der.clone()], "at {m}m");
            assert_eq!(chain[2], i.der, "at {m}m");
        }
        renewed_chain_seen |= chain.get(2) == Some(&j.der);
        saw_both |= roots.contains(&r.der) && roots.contains(&r2.der);
        // Nothing is ever signed under a root that is not yet published.
        if verify(&chain.concat(), std::slice::from_ref(&r2.der), at).is_ok() {
            assert!(
                roots.contains(&r2.der),
                "at {m}m: signed under an unpublished root"
            );
        }
    }
    assert!(
        cas.len() >= 3,
        "two rotations within 85m: {} CAs",
        cas.len()
    );
    assert!(
        renewed_chain_seen,
        "no CA was signed by the renewed intermediate"
    );
    assert!(
        saw_both,
        "the old and new roots never overlapped in the bundle"
    );
    assert_eq!(bundle(&a), vec![r2.der.clone()]);
    assert_eq!(bundle(&b), vec![r2.der]);
}

#[test]
fn switching_a_data_dir_to_an_upstream_and_back_keeps_the_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let clock = Arc::new(ManualClock::new(t0()));
    let a = open(&data, None, &clock);
    let own = bundle(&a);
    assert_eq!(own.len(), 1);
    drop(a);
    let r = root("Org Root");
    let up = files(&dir.path().join("up"), &r.pem, &r.key.serialize_pem(), None);
    let at = |m: u64| t0() + Duration::from_secs(m * 60);
    clock.set(at(1));
    let (a, logs) = crate::tests::logged(|| open(&data, Some(up), &clock));
    let loud = logs.loud();
    assert!(
        loud.iter()
            .any(|l| l.contains("switching to the upstream authority")),
        "{loud:?}"
    );
    // The self-signed CA keeps signing; nothing changes before the rotation.
    assert_eq!(bundle(&a), own);
    let mut n = 0;
    assert_eq!(split(&fresh_svid(&a, &mut n).cert_chain_der).len(), 1);
    // Prepared (half-life): the upstream root is published; the self-signed CA still signs.
    clock.set(at(31));
    a.tick(at(31));
    assert_eq!(bundle(&a), vec![own[0].clone(), r.der.clone()]);
    let s = fresh_svid(&a, &mut n);
    assert_eq!(split(&s.cert_chain_der).len(), 1);
    // Activated: SVIDs chain to the upstream root, which every holder of the bundle has.
    clock.set(at(51));
    a.tick(at(51));
    let s = fresh_svid(&a, &mut n);
    assert_eq!(split(&s.cert_chain_der).len(), 2);
    verify(&s.cert_chain_der, std::slice::from_ref(&r.der), at(51)).unwrap();
    // The self-signed CA expires: the bundle is the upstream root alone.
    clock.set(at(61));
    a.tick(at(61));
    assert_eq!(bundle(&a), vec![r.der.clone()]);
    drop(a);

    // And back to self-signed: the new CA joins the bundle before it signs.
    clock.set(at(62));
    let (a, logs) = crate::tests::logged(|| open(&data, None, &clock));
    assert!(
        logs.text()
            .contains("switching from the upstream authority back to self-signed CAs"),
        "{}",
        logs.text()
    );
    assert_eq!(bundle(&a), vec![r.der.clone()]);
    // (An upstream-signed CA was prepared at 61m: it signs from 81m to 121m, and the
    // self-signed one is prepared at its half-life, 91m.)
    for m in [82, 92] {
        clock.set(at(m));
        a.tick(at(m));
    }
    let b = bundle(&a);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0], r.der);
    clock.set(at(112));
    a.tick(at(112));
    let s = fresh_svid(&a, &mut n);
    assert_eq!(split(&s.cert_chain_der).len(), 1);
    verify(&s.cert_chain_der, &[b[1].clone()], at(112)).unwrap();
}

/// `Upstream::load` on files written for one case, at t0.
fn load_err(
    cert: &str,
    key: &str,
    bundle: Option<&str>,
    tweak: impl FnOnce(&UpstreamConfig),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let up = files(dir.path(), cert, key, bundle);
    tweak(&up);
    let e = Upstream::load(&up, t0()).expect_err("must be refused");
    e.to_string()
}

fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} not in: {msg}");
    }
}

#[test]
fn bad_upstream_files_each_get_a_clear_error() {
    let r = root("Org Root");
    let i = under("Org Intermediate", &r);
    let rk = r.key.serialize_pem();
    let none = |_: &UpstreamConfig| {};

    // The key of another certificate.
    let msg = load_err(&r.pem, &i.key.serialize_pem(), None, none);
    has(
        &msg,
        &["key_file_path", "does not belong to the certificate"],
    );
    // Not a CA.
    let mut p = params("Leaf", t0() - DAY, t0() + DAY);
    p.is_ca = IsCa::ExplicitNoCa;
    let leaf = make(p, None);
    let msg = load_err(&leaf.pem, &leaf.key.serialize_pem(), None, none);
    has(&msg, &["cert_file_path", "is not a CA", "CA:TRUE"]);
    // A CA that may not sign certificates.
    let mut p = params("No Sign", t0() - DAY, t0() + DAY);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let nosign = make(p, None);
    let msg = load_err(&nosign.pem, &nosign.key.serialize_pem(), None, none);
    has(&msg, &["keyCertSign"]);
    // Expired, and not yet valid.
    let old = make(params("Old", t0() - 2 * DAY, t0() - DAY), None);
    let msg = load_err(&old.pem, &old.key.serialize_pem(), None, none);
    has(&msg, &["cert_file_path", "expired at", "renew"]);
    let later = make(params("Later", t0() + DAY, t0() + 2 * DAY), None);
    let msg = load_err(&later.pem, &later.key.serialize_pem(), None, none);
    has(&msg, &["not valid before", "clock"]);
    // An intermediate with no roots to publish.
    let msg = load_err(&i.pem, &i.key.serialize_pem(), None, none);
    has(&msg, &["set bundle_file_path"]);
    // A bundle that does not hold the chain's root.
    let other = root("Other Root");
    let msg = load_err(&i.pem, &i.key.serialize_pem(), Some(&other.pem), none);
    has(&msg, &["bundle_file_path", "no root in it signed"]);
    // An expired root in the bundle.
    let old_root = make(params("Old Root", t0() - 2 * DAY, t0() - DAY), None);
    let msg = load_err(
        &i.pem,
        &i.key.serialize_pem(),
        Some(&format!("{}{}", r.pem, old_root.pem)),
        none,
    );
    has(
        &msg,
        &["bundle_file_path", "root certificate 2", "expired at"],
    );
    // Certificates out of order.
    let msg = load_err(
        &format!("{}{}", i.pem, other.pem),
        &i.key.serialize_pem(),
        Some(&r.pem),
        none,
    );
    has(&msg, &["is not signed by certificate 2"]);
    // A key file that others may write: refused; one they may only read: a warning.
    let msg = load_err(&r.pem, &rk, None, |u| {
        fs::set_permissions(&u.key_file_path, fs::Permissions::from_mode(0o620)).unwrap();
    });
    has(
        &msg,
        &["key_file_path", "writable by group or others", "chmod"],
    );
    let msg = load_err(&r.pem, &rk, None, |u| {
        fs::set_permissions(&u.cert_file_path, fs::Permissions::from_mode(0o666)).unwrap();
    });
    has(&msg, &["cert_file_path", "writable by group or others"]);
    {
        let dir = tempfile::tempdir().unwrap();
        let up = files(dir.path(), &r.pem, &rk, None);
        fs::set_permissions(&up.key_file_path, fs::Permissions::from_mode(0o644)).unwrap();
        let (loaded, logs) = crate::tests::logged(|| Upstream::load(&up, t0()));
        assert!(loaded.is_ok());
        assert!(
            logs.loud()
                .iter()
                .any(|l| l.contains("readable by group or others") && l.contains("chmod 600")),
            "{}",
            logs.text()
        );
    }
    // A file owned by another user (only root can make one): a warning naming the fix.
    if my_uid() == Some(0) {
        let dir = tempfile::tempdir().unwrap();
        let up = files(dir.path(), &r.pem, &rk, None);
        std::os::unix::fs::chown(&up.cert_file_path, Some(65534), None).unwrap();
        let (loaded, logs) = crate::tests::logged(|| Upstream::load(&up, t0()));
        assert!(loaded.is_ok());
        assert!(
            logs.loud()
                .iter()
                .any(|l| l.contains("owned by another user") && l.contains("chown")),
            "{}",
            logs.text()
        );
    }
    // Key formats: SEC1, encrypted, not a key, a key of no known type.
    let sec1 = rk.replace("PRIVATE KEY", "EC PRIVATE KEY");
    let msg = load_err(&r.pem, &sec1, None, none);
    has(&msg, &["only PKCS#8", "openssl pkcs8 -topk8"]);
    let enc = rk.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
    let msg = load_err(&r.pem, &enc, None, none);
    has(&msg, &["encrypted"]);
    let msg = load_err(&r.pem, &r.pem, None, none);
    has(&msg, &["not a private key"]);
    let junk = "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n";
    let msg = load_err(&r.pem, junk, None, none);
    has(&msg, &["cannot be used", "P-256"]);
    // Not certificates at all.
    let msg = load_err("", &rk, None, none);
    has(&msg, &["cert_file_path", "holds no PEM certificate"]);
    let msg = load_err(&rk, &rk, None, none);
    has(&msg, &["not a CERTIFICATE"]);
    // Missing files.
    let msg = load_err(&r.pem, &rk, None, |u| {
        fs::remove_file(&u.key_file_path).unwrap()
    });
    has(&msg, &["key_file_path", "cannot be read"]);

    // At start, the error stops the authority, naming the file; nothing is written.
    let dir = tempfile::tempdir().unwrap();
    let up = files(&dir.path().join("up"), &r.pem, &i.key.serialize_pem(), None);
    let clock = Arc::new(ManualClock::new(t0()));
    let e = CaAuthority::open_with_clock(cfg(&dir.path().join("data"), Some(up)), clock)
        .expect_err("a bad upstream stops the start");
    assert!(matches!(e, Error::Upstream(_)), "{e}");
    has(&e.to_string(), &["upstream_authority.disk.key_file_path"]);
    assert!(!dir.path().join("data").join("ca.json").exists());
}

#[test]
fn a_failing_upstream_at_rotation_keeps_the_current_ca_and_retries() {
    let r = root("Org Root");
    let dir = tempfile::tempdir().unwrap();
    let up = files(&dir.path().join("up"), &r.pem, &r.key.serialize_pem(), None);
    let clock = Arc::new(ManualClock::new(t0()));
    let a = open(&dir.path().join("data"), Some(up.clone()), &clock);
    let before = bundle(&a);
    // The key file is replaced by one of another certificate: the next CA cannot be signed.
    let other = root("Other");
    write(&up.key_file_path, &other.key.serialize_pem(), 0o600);
    let at = t0() + Duration::from_secs(31 * 60);
    clock.set(at);
    a.tick(at);
    assert_eq!(bundle(&a), before);
    let s = fresh_svid(&a, &mut 0);
    verify(&s.cert_chain_der, &before, at).unwrap();
    // Fixed: the next attempt prepares the CA.
    write(&up.key_file_path, &r.key.serialize_pem(), 0o600);
    let at = at + Duration::from_secs(120);
    clock.set(at);
    a.tick(at);
    assert_eq!(a.lock().keys.keys.x509.cas.len(), 2);
}
