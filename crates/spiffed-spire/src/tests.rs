//! The issuer, the sync and the workload cache against the server double ([`crate::testing`]),
//! on tokio's paused clock: no test sleeps for real or asserts wall-clock timing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffed_authority::Clock;
use spiffed_core::{
    AuthorityError, Entry, EntryId, EntryLimits, Issuer, Selector, SelectorCheck, SelectorError,
    TrustDomain,
};
use spiffed_entries::{EntrySources, Rules, SourceHandle};
use tokio::sync::watch;
use tokio::task::JoinSet;
use x509_parser::prelude::FromDer;

use crate::server::ServerError;
use crate::status::{Readiness, Status, StatusHandle};
use crate::testing::{FakeServer, Fault, TestClock, p256_pkix, rsa_pkix};
use crate::{CacheError, EntrySync, IssuerConfig, SpireIssuer};

const TD: &str = "example.org";

struct UnixOnly;

impl SelectorCheck for UnixOnly {
    fn check(&self, s: &Selector) -> Result<(), SelectorError> {
        if s.kind() == "unix" {
            Ok(())
        } else {
            Err(SelectorError::UnknownType {
                selector: s.to_string(),
                known: "\"unix\"".into(),
            })
        }
    }
}

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn rules() -> Rules {
    Rules {
        trust_domain: td(),
        limits: EntryLimits::default(),
        selectors: Arc::new(UnixOnly),
    }
}

fn entry(id: &str, path: &str) -> Arc<Entry> {
    Arc::new(Entry {
        id: EntryId::new(id),
        spiffe_id: format!("spiffe://{TD}{path}").parse().unwrap(),
        selectors: vec!["unix:uid:1".parse().unwrap()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: vec![],
        admin: false,
        downstream: false,
    })
}

fn unreachable() -> ServerError {
    ServerError::Unreachable {
        address: "spire-server:8081".into(),
        reason: "connection refused".into(),
    }
}

fn open_issuer(
    dir: &Path,
    fake: &Arc<FakeServer>,
    clock: &Arc<TestClock>,
    prefetch: usize,
) -> Result<SpireIssuer, CacheError> {
    let mut cfg = IssuerConfig::new(td(), dir);
    cfg.prefetch_max = prefetch;
    SpireIssuer::open_with_clock(fake.clone(), cfg, clock.clone())
}

struct Env {
    clock: Arc<TestClock>,
    fake: Arc<FakeServer>,
    issuer: SpireIssuer,
    sources: EntrySources,
    handle: SourceHandle,
    status: StatusHandle,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

fn synced_sources() -> (EntrySources, SourceHandle) {
    EntrySources::synced(
        rules(),
        "server",
        "the SPIRE Server",
        "change it with spire-server entry update",
    )
}

fn env(prefetch: usize) -> Env {
    let clock = TestClock::new();
    let fake = FakeServer::new(TD, clock.clone());
    let dir = tempfile::tempdir().unwrap();
    let issuer = open_issuer(dir.path(), &fake, &clock, prefetch).unwrap();
    let (sources, handle) = synced_sources();
    let (status, _) = StatusHandle::new();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(issuer.clone().run(stopped));
    Env {
        clock,
        fake,
        issuer,
        sources,
        handle,
        status,
        stop,
        task,
        dir,
    }
}

impl Env {
    fn sync(&self) -> EntrySync {
        EntrySync::with_clock(
            self.fake.clone(),
            self.issuer.clone(),
            self.handle.clone(),
            rules(),
            self.status.clone(),
            Duration::from_secs(5),
            self.clock.clone(),
        )
    }

    fn with_bundle(self) -> Self {
        self.issuer.set_own_bundle(&self.fake.bundle()).unwrap();
        self
    }

    fn synced(&self, id: &str) -> Option<Arc<Entry>> {
        self.sources.feed().read().get(&EntryId::new(id)).cloned()
    }
}

/// Waits (on the paused clock) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..20_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

async fn status_until(rx: &mut watch::Receiver<Status>, f: impl FnMut(&Status) -> bool) -> Status {
    tokio::time::timeout(Duration::from_secs(3600), rx.wait_for(f))
        .await
        .expect("the status never got there")
        .unwrap()
        .clone()
}

fn leaf_public_key(chain: &[u8]) -> Vec<u8> {
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(chain).unwrap();
    leaf.public_key().subject_public_key.data.to_vec()
}

#[tokio::test(start_paused = true)]
async fn a_first_fetch_mints_once_for_concurrent_callers_and_entries_share_a_call() {
    let env = env(0).with_bundle();
    env.fake.put_entry("e-web", "/web", &["unix:uid:1"], 1);
    let web = entry("e-web", "/web");
    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let (issuer, e) = (env.issuer.clone(), web.clone());
        tasks.spawn(async move { issuer.x509_svid(&e).await.unwrap().current() });
    }
    let svids: Vec<_> = tasks.join_all().await;
    assert!(svids.iter().all(|s| s.serial == svids[0].serial));
    assert_eq!(env.fake.state().batches, [1], "one call with one CSR");
    let svid = &svids[0];
    assert_eq!(svid.spiffe_id.to_string(), "spiffe://example.org/web");
    assert_eq!(
        crate::x509::public_of(svid.key.pkcs8_der()).unwrap(),
        leaf_public_key(&svid.cert_chain_der),
        "the private key handed out is the leaf's"
    );

    // First fetches of 20 different entries at once: one call with 20 CSRs.
    for i in 0..20 {
        env.fake
            .put_entry(&format!("e-{i:02}"), &format!("/w{i}"), &["unix:uid:1"], 1);
    }
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let issuer = env.issuer.clone();
        let e = entry(&format!("e-{i:02}"), &format!("/w{i}"));
        tasks.spawn(async move { issuer.x509_svid(&e).await.map(|mut w| w.current()) });
    }
    let got: Vec<_> = tasks.join_all().await;
    assert!(got.iter().all(Result::is_ok));
    assert_eq!(env.fake.state().batches, [1, 20]);
    // Held now: a fetch is a hit.
    env.issuer.x509_svid(&web).await.unwrap();
    assert_eq!(env.issuer.x509_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn synced_entries_are_prefetched_in_batches_of_at_most_500_halving_after_a_failure() {
    // 300 entries: one call of 300 fails; the retry goes in halves.
    let env = env(1000);
    for i in 0..300 {
        env.fake
            .put_entry(&format!("e{i:04}"), &format!("/w{i}"), &["unix:uid:1"], 1);
    }
    env.fake.state().fail_x509_calls = 1;
    let mut sync = env.sync();
    assert_eq!(sync.sync_once().await.unwrap().changed, 300);
    until("300 SVIDs pre-minted", || env.issuer.stats().cached == 300).await;
    assert_eq!(env.fake.state().batches, [300, 150, 150]);
    assert_eq!(env.issuer.limit_for_tests(), 500, "the batch grew back");
    // Every pre-minted SVID is served without another call.
    let calls = env.issuer.x509_calls();
    let e = env.synced("e0042").unwrap();
    env.issuer.x509_svid(&e).await.unwrap();
    assert_eq!(env.issuer.x509_calls(), calls);

    // 1000 entries: never more than 500 CSRs per call.
    let env = self::env(1000);
    for i in 0..1000 {
        env.fake
            .put_entry(&format!("e{i:04}"), &format!("/w{i}"), &["unix:uid:1"], 1);
    }
    env.fake.state().fail_x509_calls = 1;
    env.sync().sync_once().await.unwrap();
    until("1000 SVIDs pre-minted", || {
        env.issuer.stats().cached == 1000
    })
    .await;
    assert_eq!(env.fake.state().batches, [500, 250, 250, 500]);
    assert_eq!(env.issuer.limit_for_tests(), 500);
}

#[tokio::test(start_paused = true)]
async fn the_prefetch_budget_is_kept_and_refilled_when_a_pinned_entry_goes() {
    let env = env(2).with_bundle();
    for i in 0..5 {
        env.fake
            .put_entry(&format!("e{i}"), &format!("/w{i}"), &["unix:uid:1"], 1);
    }
    let mut sync = env.sync();
    sync.sync_once().await.unwrap();
    until("2 pre-minted", || env.issuer.stats().cached == 2).await;
    assert_eq!(env.issuer.stats().pinned, 2);
    env.fake.state().entries.remove("e0");
    sync.sync_once().await.unwrap();
    until("another entry pre-minted", || {
        let s = env.issuer.stats();
        s.cached == 2 && s.pinned == 2
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn rotation_at_half_life_wakes_only_that_entrys_watch() {
    let env = env(0).with_bundle();
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake.put_entry("b", "/b", &["unix:uid:1"], 1);
    {
        let mut st = env.fake.state();
        st.ttl.insert("a".into(), Duration::from_secs(100));
        st.ttl.insert("b".into(), Duration::from_secs(1000));
    }
    let mut wa = env.issuer.x509_svid(&entry("a", "/a")).await.unwrap();
    let mut wb = env.issuer.x509_svid(&entry("b", "/b")).await.unwrap();
    let (a0, b0) = (wa.current(), wb.current());
    // a lives 100 s from its arrival (notBefore is 10 s back, which does not count): half
    // of that is 50 s from now, ±5 s of jitter, rotated up to 1 s early with others due then.
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert!(!wa.has_changed(), "not before half its life");
    let rotated = tokio::time::timeout(Duration::from_secs(30), wa.changed())
        .await
        .expect("a is rotated at half its life");
    assert!(rotated);
    let a1 = wa.current();
    assert_ne!(a1.serial, a0.serial);
    assert!(a1.not_after > a0.not_after);
    assert!(!wb.has_changed(), "b's holders did not wake");
    assert_eq!(wb.current().serial, b0.serial);
}

/// The SPIRE Server backdates notBefore by 10 s, so an SVID of a short TTL (4 s here) is past
/// half of its notBefore..notAfter span when it arrives. It must be rotated at half of the life
/// it has left when received (every 2 s), not re-minted in a loop that hammers the server.
#[tokio::test(start_paused = true)]
async fn a_short_lived_svid_is_rotated_at_half_its_remaining_life_not_in_a_loop() {
    let env = env(0).with_bundle();
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    {
        let mut st = env.fake.state();
        st.ttl.insert("a".into(), Duration::from_secs(4));
        st.x509_call_limit = Some(50);
    }
    let mut wa = env.issuer.x509_svid(&entry("a", "/a")).await.unwrap();
    let first = wa.current();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mints = env.fake.state().batches.len();
    assert!(
        (4..=7).contains(&mints),
        "a 4 s SVID held for 10 s is minted about 5 times (at half of each one's life), \
         got {mints} calls"
    );
    let now = env.clock.now();
    let held = wa.current();
    assert_ne!(held.serial, first.serial, "it was rotated");
    assert!(held.not_after > now, "and the one held has not expired");
}

#[tokio::test(start_paused = true)]
async fn a_tainted_authority_forces_a_re_mint_of_what_chains_to_it() {
    let env = env(0).with_bundle();
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let mut w = env.issuer.x509_svid(&entry("a", "/a")).await.unwrap();
    let old = w.current();
    let old_ca = env.fake.ca_der(0);

    // A new CA, the old one not tainted: nothing moves.
    env.fake.rotate_ca(false);
    assert!(env.issuer.set_own_bundle(&env.fake.bundle()).unwrap());
    assert!(
        tokio::time::timeout(Duration::from_secs(20), w.changed())
            .await
            .is_err(),
        "a bundle change alone does not re-mint"
    );

    // The old CA tainted: re-minted at once, by the new CA.
    env.fake.rotate_ca(true);
    env.issuer.set_own_bundle(&env.fake.bundle()).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("re-minted")
    );
    let new = w.current();
    assert_ne!(new.serial, old.serial);
    assert!(crate::x509::chains_to_any(
        &old.cert_chain_der,
        b"",
        &[&old_ca]
    ));
    assert!(!crate::x509::chains_to_any(
        &new.cert_chain_der,
        b"",
        &[&old_ca]
    ));
}

#[tokio::test(start_paused = true)]
async fn a_sync_refused_before_attestation_runs_again_as_soon_as_the_agent_attests() {
    let env = env(1000);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake.state().down = Some(ServerError::NotAttested("attestation pending".into()));
    let (attested, attestation) = watch::channel(false);
    let sync = EntrySync::with_clock(
        env.fake.clone(),
        env.issuer.clone(),
        env.handle.clone(),
        rules(),
        env.status.clone(),
        Duration::from_secs(60),
        env.clock.clone(),
    )
    .wake_on_attestation(attestation);
    let (_stop, stopped) = watch::channel(false);
    let task = tokio::spawn(sync.run(stopped));
    // The first round (at once) is refused; a minute is the next one without the wake-up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(env.synced("a").is_none());
    env.fake.state().down = None;
    attested.send_replace(true);
    tokio::time::timeout(
        Duration::from_secs(5),
        until("entries synced after attestation", || {
            env.synced("a").is_some()
        }),
    )
    .await
    .expect("the sync waited for its interval instead of the attestation");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn an_entry_deleted_on_the_server_leaves_after_the_next_sync_and_its_svid_when_let_go() {
    let env = env(1000);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake.put_entry("b", "/b", &["unix:uid:2"], 1);
    let mut sync = env.sync();
    sync.sync_once().await.unwrap();
    assert!(env.synced("a").is_some() && env.synced("b").is_some());
    let w = env
        .issuer
        .x509_svid(&env.synced("b").unwrap())
        .await
        .unwrap();

    env.fake.state().entries.remove("b");
    let report = sync.sync_once().await.unwrap();
    assert_eq!(report.removed, 1);
    assert!(env.synced("b").is_none(), "gone from the entry source");
    assert!(env.synced("a").is_some());
    // Held by a stream: kept until let go, then forgotten.
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(env.issuer.stats().cached, 2);
    drop(w);
    until("b's SVID forgotten", || env.issuer.stats().cached == 1).await;
}

#[tokio::test(start_paused = true)]
async fn an_entry_re_created_with_the_same_id_is_fetched_again_and_re_minted() {
    let env = env(1000);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let mut sync = env.sync();
    sync.sync_once().await.unwrap();
    let mut w = env
        .issuer
        .x509_svid(&env.synced("a").unwrap())
        .await
        .unwrap();
    assert_eq!(w.current().spiffe_id.path(), "/a");

    // Deleted and re-created: same id and revision, another created_at.
    env.fake.put_entry("a", "/a2", &["unix:uid:1"], 1);
    let report = sync.sync_once().await.unwrap();
    assert_eq!(report.changed, 1, "fetched again");
    assert_eq!(env.synced("a").unwrap().spiffe_id.path(), "/a2");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), w.changed())
            .await
            .unwrap()
    );
    assert_eq!(w.current().spiffe_id.path(), "/a2");
    // Nothing changed: nothing fetched.
    assert_eq!(sync.sync_once().await.unwrap().changed, 0);
}

#[tokio::test(start_paused = true)]
async fn bad_answers_from_the_server_are_errors_with_a_message() {
    let env = env(0).with_bundle();
    let cases = [
        (Fault::WrongId, "not for spiffe://example.org/e0"),
        (Fault::OtherKey, "public key is not the key of our CSR"),
        (Fault::Garbage, "not a DER certificate"),
        (Fault::NoChain, "no certificate"),
        (Fault::FewerResults, "0 results for 1 CSRs"),
        (Fault::Refuse, "refused"),
        (Fault::UnknownCa, "does not verify"),
    ];
    for (i, (fault, want)) in cases.into_iter().enumerate() {
        env.fake.state().fault = Some(fault);
        let path = format!("/e{i}");
        env.fake
            .put_entry(&format!("e{i}"), &path, &["unix:uid:1"], 1);
        let err = env
            .issuer
            .x509_svid(&entry(&format!("e{i}"), &path))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(want), "{fault:?}: {err}");
    }
    // Asked again at once: the same failure, without another call.
    let calls = env.fake.state().batches.len();
    let err = env.issuer.x509_svid(&entry("e5", "/e5")).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(env.fake.state().batches.len(), calls);
    // An entry the server does not know.
    env.fake.state().fault = None;
    let err = env
        .issuer
        .x509_svid(&entry("nope", "/nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, AuthorityError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
    // And it still works.
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.issuer.x509_svid(&entry("e0", "/e0")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn jwt_svids_are_cached_refreshed_past_half_life_and_served_from_cache_when_the_server_fails()
{
    let env = env(0).with_bundle();
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let a = entry("a", "/a");
    let aud = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let t1 = env.issuer.jwt_svid(&a, &aud(&["b", "a"])).await.unwrap();
    let t2 = env
        .issuer
        .jwt_svid(&a, &aud(&["a", "b", "a"]))
        .await
        .unwrap();
    assert_eq!(
        t1.token.as_str(),
        t2.token.as_str(),
        "one audience set, one token"
    );
    assert_eq!(env.fake.state().jwt_calls, 1);
    let v = env.issuer.validate_jwt(&t1.token, "a").unwrap();
    assert_eq!(v.spiffe_id, a.spiffe_id);

    // Concurrent refreshes of one key make one call.
    tokio::time::sleep(Duration::from_secs(151)).await;
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let (issuer, a) = (env.issuer.clone(), a.clone());
        tasks.spawn(async move {
            issuer
                .jwt_svid(&a, &["a".to_string(), "b".to_string()])
                .await
                .unwrap()
        });
    }
    let t3s = tasks.join_all().await;
    let t3 = t3s[0].clone();
    assert!(t3s.iter().all(|t| t.token.as_str() == t3.token.as_str()));
    assert_ne!(
        t3.token.as_str(),
        t1.token.as_str(),
        "refreshed past half its life"
    );
    assert_eq!(env.fake.state().jwt_calls, 2);

    // The server fails past half-life: the cached token, still valid, is served.
    env.fake.state().down = Some(unreachable());
    tokio::time::sleep(Duration::from_secs(151)).await;
    let t4 = env.issuer.jwt_svid(&a, &aud(&["a", "b"])).await.unwrap();
    assert_eq!(t4.token.as_str(), t3.token.as_str());
    // Expired: an error naming the server's failure.
    tokio::time::sleep(Duration::from_secs(150)).await;
    let err = env
        .issuer
        .jwt_svid(&a, &aud(&["a", "b"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");

    // exp and iat read from the token when the answer lacks them.
    {
        let mut st = env.fake.state();
        st.down = None;
        st.omit_jwt_times = true;
    }
    let t5 = env.issuer.jwt_svid(&a, &aud(&["c"])).await.unwrap();
    assert_eq!(
        t5.expiry.duration_since(t5.issued_at).unwrap(),
        Duration::from_secs(300)
    );
    assert!(t5.expiry > env.clock.now());
    // A token for someone else is refused.
    env.fake.state().fault = Some(Fault::JwtWrongSub);
    let err = env.issuer.jwt_svid(&a, &aud(&["d"])).await.unwrap_err();
    assert!(
        err.to_string().contains("not for spiffe://example.org/a"),
        "{err}"
    );
    assert!(env.issuer.jwt_svid(&a, &[]).await.is_err(), "no audience");
}

#[tokio::test(start_paused = true)]
async fn federated_bundles_follow_federates_with() {
    let env = env(0);
    env.fake.add_federated("partner.org");
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake
        .state()
        .entries
        .get_mut("a")
        .unwrap()
        .federates_with = vec!["partner.org".into(), "spiffe://missing.org".into()];
    let mut sync = env.sync();
    let report = sync.sync_once().await.unwrap();
    assert_eq!(
        report.federated, 1,
        "missing.org is a warning, not an error"
    );
    let partner = TrustDomain::new("partner.org").unwrap();
    let set = env.issuer.bundles().borrow().clone();
    assert!(set.get(&partner).is_some());
    assert!(set.get(&TrustDomain::new("missing.org").unwrap()).is_none());
    assert_eq!(
        env.synced("a").unwrap().federates_with,
        [partner.clone(), TrustDomain::new("missing.org").unwrap()]
    );

    // No entry federates with it any more: dropped.
    {
        let mut st = env.fake.state();
        let a = st.entries.get_mut("a").unwrap();
        a.federates_with.clear();
        a.revision_number = 2;
    }
    let before = env.issuer.bundles().borrow().sequence();
    sync.sync_once().await.unwrap();
    let set = env.issuer.bundles().borrow().clone();
    assert!(set.get(&partner).is_none());
    assert!(set.sequence() > before);
}

#[tokio::test(start_paused = true)]
async fn entries_that_break_a_rule_are_left_out_alone() {
    let env = env(0);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake.put_entry("b", "/b", &["k8s:ns:default"], 1);
    env.fake.put_entry("c", "/c", &["unix:uid:3"], 1);
    env.fake
        .state()
        .entries
        .get_mut("c")
        .unwrap()
        .federates_with = vec!["not a td!".into()];
    {
        let mut st = env.fake.state();
        let d = st.entries.get_mut("a").unwrap();
        d.hint = "internal".into();
        d.admin = true;
        d.downstream = true;
    }
    let mut sync = env.sync();
    let report = sync.sync_once().await.unwrap();
    assert_eq!((report.changed, report.refused), (1, 2));
    let a = env.synced("a").unwrap();
    assert_eq!(a.hint.as_deref(), Some("internal"));
    assert!(a.admin && a.downstream);
    assert!(env.synced("b").is_none() && env.synced("c").is_none());
    // Not fetched again while unchanged; fixed on the server, it comes in.
    assert_eq!(sync.sync_once().await.unwrap().refused, 0);
    env.fake.put_entry("b", "/b", &["unix:uid:2"], 2);
    sync.sync_once().await.unwrap();
    assert!(env.synced("b").is_some());
}

#[tokio::test(start_paused = true)]
async fn the_workload_cache_serves_after_a_restart_while_the_server_is_down() {
    let env = env(1000);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake.put_entry("b", "/b", &["unix:uid:2"], 1);
    env.fake
        .state()
        .ttl
        .insert("b".into(), Duration::from_secs(100));
    env.fake.add_federated("partner.org");
    env.fake
        .state()
        .entries
        .get_mut("a")
        .unwrap()
        .federates_with = vec!["partner.org".into()];
    let mut sync = env.sync();
    sync.sync_once().await.unwrap();
    until("both pre-minted", || env.issuer.stats().cached == 2).await;
    let file = env.dir.path().join(crate::CACHE_FILE);
    until("the writer wrote the cache", || file.exists()).await;
    let jwt = env
        .issuer
        .jwt_svid(&env.synced("a").unwrap(), &["x".into()])
        .await
        .unwrap();
    let serial_a = env
        .issuer
        .x509_svid(&env.synced("a").unwrap())
        .await
        .unwrap()
        .current()
        .serial
        .clone();
    // The agent stops (the run task writes the cache a last time).
    env.stop.send(true).unwrap();
    env.task.await.unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"key\""), "keys are kept");

    // Restart while the server is down: the cached SVIDs are served at once.
    env.fake.state().down = Some(unreachable());
    let calls = env.fake.state().batches.len();
    let issuer = open_issuer(env.dir.path(), &env.fake, &env.clock, 1000).unwrap();
    let (sources, handle) = synced_sources();
    assert_eq!(issuer.publish_cached(&handle, &rules()).unwrap(), 2);
    let a = sources
        .feed()
        .read()
        .get(&EntryId::new("a"))
        .cloned()
        .unwrap();
    assert_eq!(a.federates_with, [TrustDomain::new("partner.org").unwrap()]);
    let got = issuer.x509_svid(&a).await.unwrap().current();
    assert_eq!(got.serial, serial_a);
    assert_eq!(env.fake.state().batches.len(), calls, "no server call");
    assert!(issuer.has_valid_svids());
    let set = issuer.bundles().borrow().clone();
    assert_eq!(set.own().x509.authorities.len(), 1);
    assert!(set.get(&TrustDomain::new("partner.org").unwrap()).is_some());
    // The JWT authorities came back too: a token minted before the restart validates.
    let v = issuer.validate_jwt(&jwt.token, "x").unwrap();
    assert_eq!(v.spiffe_id, a.spiffe_id);

    // Expired SVIDs are dropped by the check after a restart (b lived 100 s).
    tokio::time::sleep(Duration::from_secs(200)).await;
    let later = open_issuer(env.dir.path(), &env.fake, &env.clock, 1000).unwrap();
    let (_, handle) = synced_sources();
    later.publish_cached(&handle, &rules()).unwrap();
    assert!(later.has_valid_svids(), "a is still valid");
    let (stop_later, stopped) = watch::channel(false);
    let task = tokio::spawn(later.clone().run(stopped));
    until("b's expired SVID dropped", || later.stats().cached == 1).await;
    stop_later.send(true).unwrap();
    task.await.unwrap();

    // Readable by group: refused, naming the file and the fix.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = open_issuer(env.dir.path(), &env.fake, &env.clock, 1000).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CacheError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("chmod 600") && msg.contains(&file.display().to_string()),
        "{msg}"
    );

    // Corrupt: ignored (warned), the agent starts empty.
    std::fs::write(&file, b"{ not json").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fresh = open_issuer(env.dir.path(), &env.fake, &env.clock, 1000).unwrap();
    assert_eq!(fresh.stats().cached, 0);
    let (_, handle) = synced_sources();
    assert_eq!(fresh.publish_cached(&handle, &rules()).unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn cached_svids_nobody_asked_for_after_a_restart_are_kept_in_the_cache_file() {
    let env = env(1000);
    for id in ["a", "b", "c"] {
        env.fake
            .put_entry(id, &format!("/{id}"), &["unix:uid:1"], 1);
    }
    let mut sync = env.sync();
    sync.sync_once().await.unwrap();
    until("all pre-minted", || env.issuer.stats().cached == 3).await;
    let mut serials = std::collections::BTreeMap::new();
    for id in ["a", "b", "c"] {
        let mut got = env
            .issuer
            .x509_svid(&env.synced(id).unwrap())
            .await
            .unwrap();
        serials.insert(id, got.current().serial.clone());
    }
    env.stop.send(true).unwrap();
    env.task.await.unwrap();

    // Restart: only a is asked for, then a sync changes the entries (the cache is rewritten)
    // and the agent stops before its background check ran.
    let restarted = open_issuer(env.dir.path(), &env.fake, &env.clock, 0).unwrap();
    let (sources, handle) = synced_sources();
    restarted.publish_cached(&handle, &rules()).unwrap();
    let a = sources
        .feed()
        .read()
        .get(&EntryId::new("a"))
        .cloned()
        .unwrap();
    assert_eq!(
        restarted.x509_svid(&a).await.unwrap().current().serial,
        serials["a"]
    );
    env.fake.put_entry("d", "/d", &["unix:uid:1"], 1);
    let mut sync = EntrySync::with_clock(
        env.fake.clone(),
        restarted.clone(),
        handle.clone(),
        rules(),
        env.status.clone(),
        Duration::from_secs(5),
        env.clock.clone(),
    );
    sync.sync_once().await.unwrap();
    restarted.persist_now().await.unwrap();

    // b and c were never served, yet the file still holds them: served with no server call.
    env.fake.state().down = Some(unreachable());
    let calls = env.fake.state().batches.len();
    let third = open_issuer(env.dir.path(), &env.fake, &env.clock, 0).unwrap();
    let (sources, handle) = synced_sources();
    third.publish_cached(&handle, &rules()).unwrap();
    for id in ["a", "b", "c"] {
        let e = sources
            .feed()
            .read()
            .get(&EntryId::new(id))
            .cloned()
            .unwrap();
        let got = third.x509_svid(&e).await.unwrap().current();
        assert_eq!(got.serial, serials[id], "{id}");
    }
    assert_eq!(env.fake.state().batches.len(), calls, "no server call");
}

#[tokio::test(start_paused = true)]
async fn cached_svids_that_chain_to_a_tainted_authority_are_re_minted_after_a_restart() {
    let env = env(0).with_bundle();
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let mut sync = env.sync();
    sync.sync_once().await.unwrap();
    let a = env.synced("a").unwrap();
    let old = env.issuer.x509_svid(&a).await.unwrap().current();
    // A cache written before the taint reached the agent: the bundle there marks the CA that
    // signed the SVID tainted.
    env.fake.rotate_ca(true);
    let dir = tempfile::tempdir().unwrap();
    let snap = crate::cache::Snapshot {
        trust_domain: td(),
        entries: vec![(a.clone(), env.fake.version_of("a"))],
        svids: vec![(a.id.clone(), old.clone(), Some(env.fake.version_of("a")))],
        bundle: Some(env.fake.bundle()),
        federated: vec![],
    };
    crate::cache::write(&dir.path().join(crate::CACHE_FILE), &snap).unwrap();
    let issuer = open_issuer(dir.path(), &env.fake, &env.clock, 0).unwrap();
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(issuer.clone().run(stopped));
    let mut w = issuer.x509_svid(&a).await.unwrap();
    assert_eq!(
        w.current().serial,
        old.serial,
        "served from the cache at once"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("re-minted")
    );
    assert_ne!(w.current().serial, old.serial);
}

#[tokio::test(start_paused = true)]
async fn cached_entries_that_break_the_rules_now_are_left_out() {
    let env = env(1000);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    env.fake
        .put_entry("b", "/b", &["unix:uid:1", "unix:gid:1"], 1);
    env.sync().sync_once().await.unwrap();
    until("pre-minted", || env.issuer.stats().cached == 2).await;
    env.issuer.persist_now().await.unwrap();
    let issuer = open_issuer(env.dir.path(), &env.fake, &env.clock, 1000).unwrap();
    let (sources, handle) = synced_sources();
    let mut strict = rules();
    strict.limits.max_selectors = 1;
    assert_eq!(issuer.publish_cached(&handle, &strict).unwrap(), 1);
    assert!(sources.feed().read().get(&EntryId::new("b")).is_none());
}

#[tokio::test(start_paused = true)]
async fn the_status_goes_serving_then_serving_from_cache_then_serving() {
    let env = env(1000);
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let mut rx = env.status.subscribe();
    tokio::spawn(env.sync().run(env.stop.subscribe()));
    let s = status_until(&mut rx, |s| s.readiness == Readiness::Serving).await;
    let first_sync = s.last_sync.unwrap();
    until("pre-minted", || env.issuer.stats().cached == 1).await;

    env.fake.state().down = Some(unreachable());
    let s = status_until(&mut rx, |s| {
        matches!(s.readiness, Readiness::ServingFromCache { .. })
    })
    .await;
    let Readiness::ServingFromCache { since, reason } = s.readiness else {
        unreachable!()
    };
    assert!(reason.contains("connection refused"), "{reason}");
    assert!(since >= first_sync);
    // Backing off while the cache serves: far fewer than one call per interval.
    let before = env.fake.state().bundle_calls;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let calls = env.fake.state().bundle_calls - before;
    assert!(calls < 12, "{calls} calls in 120 s");

    env.fake.state().down = None;
    let s = status_until(&mut rx, |s| s.readiness == Readiness::Serving).await;
    assert!(s.last_sync.unwrap() > first_sync);
}

#[tokio::test(start_paused = true)]
async fn with_nothing_cached_the_status_is_not_serving_and_retries_keep_the_interval() {
    let env = env(1000);
    let mut rx = env.status.subscribe();
    env.fake.state().down = Some(ServerError::NotAttested("attesting".into()));
    tokio::spawn(env.sync().run(env.stop.subscribe()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        *rx.borrow(),
        Status::starting(),
        "not attested yet: unchanged"
    );

    env.fake.state().down = Some(unreachable());
    let s = status_until(&mut rx, |s| {
        matches!(&s.readiness, Readiness::NotServing { reason } if reason.contains("connection refused"))
    })
    .await;
    let Readiness::NotServing { reason } = s.readiness else {
        unreachable!()
    };
    assert!(reason.contains("no cached identity"), "{reason}");
    let before = env.fake.state().bundle_calls;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = env.fake.state().bundle_calls - before;
    assert!(
        (10..=14).contains(&calls),
        "{calls} calls in 60 s at a 5 s interval"
    );
}

#[tokio::test(start_paused = true)]
async fn clear_stops_every_identity_until_resume() {
    let env = env(0).with_bundle();
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let a = entry("a", "/a");
    let mut w = env.issuer.x509_svid(&a).await.unwrap();
    env.issuer.jwt_svid(&a, &["x".into()]).await.unwrap();
    env.issuer.clear("the agent was banned on the SPIRE Server");
    assert!(!w.changed().await, "streams holding it see it end");
    let err = env.issuer.x509_svid(&a).await.unwrap_err();
    assert!(err.to_string().contains("banned"), "{err}");
    let err = env.issuer.jwt_svid(&a, &["x".into()]).await.unwrap_err();
    assert!(err.to_string().contains("banned"), "{err}");
    assert!(!env.issuer.has_valid_svids());
    assert_eq!(env.issuer.cached_jwt_svids(), 0);
    env.issuer.resume();
    env.issuer.x509_svid(&a).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_its_tasks_running_a_fetch_fails_instead_of_waiting_forever() {
    let clock = TestClock::new();
    let fake = FakeServer::new(TD, clock.clone());
    let dir = tempfile::tempdir().unwrap();
    let issuer = open_issuer(dir.path(), &fake, &clock, 0).unwrap();
    issuer.set_own_bundle(&fake.bundle()).unwrap();
    fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let err = issuer.x509_svid(&entry("a", "/a")).await.unwrap_err();
    assert!(err.to_string().contains("within 45s"), "{err}");
}

#[test]
fn bundles_keep_p256_jwt_keys_and_leave_others_out() {
    let clock_less = TrustDomain::new(TD).unwrap();
    let point = {
        let mut p = vec![4u8];
        p.extend([1u8; 64]);
        p
    };
    let mut p384 = vec![
        0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05,
        0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00, 0x04,
    ];
    p384.extend([2u8; 96]);
    let b = spiffed_proto::spire::types::Bundle {
        trust_domain: TD.into(),
        x509_authorities: vec![],
        jwt_authorities: vec![
            spiffed_proto::spire::types::JwtKey {
                public_key: p256_pkix(&point),
                key_id: "ec".into(),
                expires_at: 2_000_000_000,
                tainted: false,
            },
            spiffed_proto::spire::types::JwtKey {
                public_key: rsa_pkix(),
                key_id: "rsa".into(),
                expires_at: 0,
                tainted: false,
            },
            spiffed_proto::spire::types::JwtKey {
                public_key: p384,
                key_id: "p384".into(),
                expires_at: 0,
                tainted: false,
            },
        ],
        refresh_hint: 0,
        sequence_number: 7,
    };
    let mut warned = std::collections::HashSet::new();
    let c = crate::bundle::convert(&b, &clock_less, &mut warned).unwrap();
    let kids: Vec<&str> = c.bundle.jwt.keys.iter().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids, ["ec"]);
    assert_eq!(c.bundle.jwt.keys[0].public_point, point);
    assert_eq!(c.bundle.x509.sequence, 7);
    assert_eq!(warned.len(), 2, "each left-out key warned about once");
    let other = TrustDomain::new("other.org").unwrap();
    assert!(crate::bundle::convert(&b, &other, &mut warned).is_err());
    assert!(crate::bundle::p256_point(b"garbage").is_err());
}

#[tokio::test(start_paused = true)]
async fn the_own_bundle_must_be_of_the_trust_domain_and_have_authorities() {
    let env = env(0);
    let mut b = env.fake.bundle();
    b.trust_domain = "other.org".into();
    let err = env.issuer.set_own_bundle(&b).unwrap_err();
    assert!(err.to_string().contains("other.org"), "{err}");
    let mut b = env.fake.bundle();
    b.x509_authorities.clear();
    assert!(env.issuer.set_own_bundle(&b).is_err());
    let mut b = env.fake.bundle();
    b.x509_authorities[0].asn1 = b"junk".to_vec();
    assert!(env.issuer.set_own_bundle(&b).is_err());
    // Without a bundle, a minted SVID cannot be checked: an error, not a panic.
    env.fake.put_entry("a", "/a", &["unix:uid:1"], 1);
    let err = env.issuer.x509_svid(&entry("a", "/a")).await.unwrap_err();
    assert!(err.to_string().contains("bundle is not known"), "{err}");
}

#[test]
fn server_entries_convert_with_their_fields_or_name_the_problem() {
    use spiffed_proto::spire::types;
    let mut e = types::Entry {
        id: "01J".into(),
        spiffe_id: Some(types::Spiffeid {
            trust_domain: TD.into(),
            path: "/w".into(),
        }),
        selectors: vec![
            types::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            },
            types::Selector {
                r#type: "unix".into(),
                value: "gid:1".into(),
            },
        ],
        federates_with: vec!["partner.org".into()],
        hint: "h".into(),
        admin: true,
        x509_svid_ttl: 60,
        dns_names: vec!["x.internal".into()],
        ..Default::default()
    };
    let got = crate::convert_entry(&e).unwrap();
    assert_eq!(got.id.as_str(), "01J");
    assert_eq!(got.spiffe_id.to_string(), "spiffe://example.org/w");
    assert_eq!(got.selectors.len(), 2);
    assert!(got.selectors[0] < got.selectors[1]);
    assert_eq!(got.hint.as_deref(), Some("h"));
    assert!(got.admin && !got.downstream);
    assert!(got.x509_svid_ttl.is_none() && got.dns_names.is_empty());
    e.selectors[0].value = "nokey".into();
    assert!(
        crate::convert_entry(&e)
            .unwrap_err()
            .contains("TYPE:KEY:VALUE")
    );
    e.selectors[0].value = "uid:1".into();
    // A path without its leading slash would glue onto the trust domain (example.orgw).
    if let Some(id) = e.spiffe_id.as_mut() {
        id.path = "w".into();
    }
    assert!(
        crate::convert_entry(&e)
            .unwrap_err()
            .contains("does not start with /")
    );
    // A trust domain that carries a path is refused, not split elsewhere (found by fuzzing).
    if let Some(id) = e.spiffe_id.as_mut() {
        id.trust_domain = "example/org".into();
        id.path = String::new();
    }
    assert!(
        crate::convert_entry(&e)
            .unwrap_err()
            .contains("do not form a SPIFFE ID")
    );
    e.spiffe_id = None;
    assert!(crate::convert_entry(&e).is_err());
}
