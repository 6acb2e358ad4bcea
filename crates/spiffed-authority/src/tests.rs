//! Tests of the authority as a whole: the request path, the rotation task and the entry feed,
//! the CA's validity and rotation under clock jumps and failures.

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use spiffed_core::{
    AuthorityError, Entry, EntryFeed, EntryId, EntryPublisher, Issuer, JwtError, JwtSvid, Selector,
    SvidWatch, TrustDomain, X509Svid,
};
use tokio::sync::watch;

use super::*;
use crate::ca;
use crate::clock::testing::ManualClock;
use crate::config::STORE_FILE;
use crate::rotation::Upkeep;
use crate::svid_cache::{IDLE_KEEP, Installed};

fn entry(id: &str, path: &str, ttl: Option<Duration>) -> Arc<Entry> {
    Arc::new(Entry {
        id: EntryId::new(id),
        spiffe_id: format!("spiffe://example.org/{path}").parse().unwrap(),
        selectors: vec!["unix:uid:1".parse::<Selector>().unwrap()],
        x509_svid_ttl: ttl,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    })
}

fn entries(n: usize) -> Vec<Arc<Entry>> {
    (0..n)
        .map(|i| entry(&format!("e{i:05}"), &format!("w{i}"), None))
        .collect()
}

fn publisher(all: &[Arc<Entry>]) -> EntryPublisher {
    EntryPublisher::new(all.iter().map(|e| (**e).clone()))
}

fn cfg(dir: &Path) -> AuthorityConfig {
    AuthorityConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.to_owned(),
        ca_ttl: Duration::from_secs(3600),
        x509_svid_ttl: Duration::from_secs(600),
        jwt_svid_ttl: Duration::from_secs(300),
        new_root: NewRootPolicy::Refuse,
        premint_entries: DEFAULT_PREMINT_ENTRIES,
        upstream: None,
    }
}

/// Runs a future that must finish without waiting (a fetch with nobody else minting).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the call waited although nothing else was going on"),
    }
}

fn fetch(a: &CaAuthority, e: &Arc<Entry>) -> Result<SvidWatch, AuthorityError> {
    ready(a.x509_svid(e))
}

/// Fetches and lets go at once.
fn svid(a: &CaAuthority, e: &Arc<Entry>) -> Arc<X509Svid> {
    fetch(a, e).unwrap().peek()
}

fn jwt(a: &CaAuthority, e: &Arc<Entry>, aud: &[String]) -> Result<Arc<JwtSvid>, AuthorityError> {
    ready(a.jwt_svid(e, aud))
}

fn own_x509(a: &CaAuthority) -> Vec<Vec<u8>> {
    a.bundles().borrow().own().x509.authorities.clone()
}

fn serial(a: &CaAuthority, id: &str) -> Option<Vec<u8>> {
    a.lock()
        .svids
        .current(&EntryId::new(id))
        .map(|s| s.serial.clone())
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Waits (yielding to the rotation task: minting is real work) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A wall clock driven by tokio's (pausable) clock, so `tokio::time::pause` moves both.
struct TokioClock {
    t0: SystemTime,
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.t0 + self.start.elapsed()
    }
}

/// The rotation task on its own runtime task; stopped (and awaited) by the returned closure.
fn spawn(a: &CaAuthority, feed: EntryFeed) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(a.clone().run_with_entries(stop_rx, feed));
    (stop_tx, task)
}

#[test]
fn svids_are_shared_per_entry_and_bundle_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    let web = entry("1", "web", None);
    let one = fetch(&a, &web).unwrap();
    let two = fetch(&a, &web).unwrap();
    assert!(Arc::ptr_eq(&one.peek(), &two.peek()), "one SVID per entry");
    assert_eq!(a.x509_mints(), 1);
    let db = entry("2", "db", None);
    assert_eq!(
        svid(&a, &db).spiffe_id.to_string(),
        "spiffe://example.org/db"
    );
    assert_eq!(a.svid_stats().cached, 2);
    assert_eq!(
        a.svid_stats().held,
        1,
        "web is held by two watches, db by none"
    );
    let bundle = own_x509(&a);
    drop(a);
    let again = CaAuthority::open(cfg(dir.path())).unwrap();
    assert_eq!(own_x509(&again), bundle);
}

#[test]
fn one_caller_cannot_flood_the_jwt_cache() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    let (web, db) = (entry("1", "web", None), entry("2", "db", None));
    let db_aud = vec!["db-client".to_owned()];
    let db_token = jwt(&a, &db, &db_aud).unwrap();
    // One identity asks for 300 distinct audience sets of 4 KiB each.
    for i in 0..300 {
        let aud = vec![format!("{i:04}{}", "x".repeat(4096))];
        jwt(&a, &web, &aud).unwrap();
    }
    // Exactly the per-identity bound for web, plus db's one token (well under the bytes).
    assert_eq!(
        a.cached_jwt_svids(),
        DEFAULT_JWT_CACHE_ENTRIES_PER_IDENTITY + 1,
        "JWT-SVIDs cached"
    );
    // The other identity's token was not pushed out: the same token comes back.
    let again = jwt(&a, &db, &db_aud).unwrap();
    assert!(Arc::ptr_eq(&db_token, &again));
    // A byte budget smaller than what is held evicts at once; later tokens still mint.
    a.set_jwt_cache_limits(JwtCacheLimits {
        bytes: 32 * 1024,
        entries_per_identity: 8,
    });
    // About 5 KiB a token: some still fit (the cache works), no more than 32 KiB does.
    let fits = 1..=6;
    assert!(
        fits.contains(&a.cached_jwt_svids()),
        "{}",
        a.cached_jwt_svids()
    );
    let aud = vec!["z".repeat(4096)];
    let fresh = jwt(&a, &web, &aud).unwrap();
    assert!(
        fits.contains(&a.cached_jwt_svids()),
        "{}",
        a.cached_jwt_svids()
    );
    let again = jwt(&a, &web, &aud).unwrap();
    assert!(Arc::ptr_eq(&fresh, &again), "the fresh token is cached");
}

#[test]
fn changed_entry_parameters_re_mint() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    let mut held = fetch(&a, &entry("1", "web", None)).unwrap();
    let one = held.current();
    let two = svid(&a, &entry("1", "api", None));
    assert_ne!(one.serial, two.serial);
    assert_eq!(two.spiffe_id.to_string(), "spiffe://example.org/api");
    assert!(
        held.has_changed(),
        "the holder of the entry gets the new SVID"
    );
}

/// Rotation at half-life on a manual clock: only the entry due wakes; held SVIDs are kept,
/// unheld ones go once idle; a CA rotation changes the published bundle set.
#[test]
fn tick_rotates_at_half_life_waking_only_that_entry() {
    let dir = tempfile::tempdir().unwrap();
    // CA 3600 s, SVIDs 360 s: half-life at 180 s.
    let (a, clock) = clocked(
        dir.path(),
        Duration::from_secs(3600),
        NewRootPolicy::Refuse,
        t0(),
    );
    let (web, db) = (entry("1", "web", None), entry("2", "db", None));
    let mut w = fetch(&a, &web).unwrap();
    let first = w.current();
    clock.set(t0() + Duration::from_secs(100));
    let mut d = fetch(&a, &db).unwrap();
    d.current();
    // Before half-life nothing changes.
    let next = a.tick(clock.now());
    assert!(
        next <= t0() + Duration::from_secs(180),
        "wakes by web's refresh"
    );
    assert!(!w.has_changed());
    // Past web's half-life (and the idle window): web is re-minted and woken, db is not.
    clock.set(t0() + Duration::from_secs(181) + IDLE_KEEP);
    a.tick(clock.now());
    assert!(w.has_changed(), "web's holder is woken");
    assert_ne!(w.current().serial, first.serial);
    assert!(!d.has_changed(), "db's holder is not");
    assert_eq!(a.svid_stats().cached, 2, "held: kept past the idle window");
    // Once let go, both go at the next sweep (idle far longer than IDLE_KEEP).
    drop((w, d));
    clock.set(t0() + Duration::from_secs(400));
    a.tick(clock.now());
    assert_eq!(a.svid_stats().cached, 0);
    // The CA's half-life prepares the next CA: the bundle set grows and its sequence too.
    let bundles = a.bundles();
    let before = bundles.borrow().sequence();
    clock.set(t0() + Duration::from_secs(1801));
    a.tick(clock.now());
    assert!(bundles.has_changed().unwrap());
    assert!(bundles.borrow().sequence() > before);
    assert_eq!(bundles.borrow().own().x509.authorities.len(), 2);
}

/// A pre-minted SVID is rotated at half-life though nobody uses it; an on-demand one with the
/// same lifetime, unheld and idle, is dropped instead.
#[test]
fn pre_minted_svids_rotate_unused_while_idle_on_demand_ones_go() {
    let dir = tempfile::tempdir().unwrap();
    let (a, clock) = clocked(
        dir.path(),
        Duration::from_secs(36_000),
        NewRootPolicy::Refuse,
        t0(),
    );
    let ttl = Some(Duration::from_secs(200));
    let web = entry("web", "web", ttl);
    let p = publisher(std::slice::from_ref(&web));
    a.resync(&p.feed());
    a.tick(clock.now());
    let first = serial(&a, "web").unwrap();
    let synthetic = entry("synthetic/uid-1/x", "uid-1/x", ttl);
    svid(&a, &synthetic);
    // Past half-life and the idle window.
    clock.set(t0() + IDLE_KEEP + Duration::from_secs(101));
    a.tick(clock.now());
    let second = serial(&a, "web").unwrap();
    assert_ne!(second, first, "re-minted though unused");
    assert!(
        serial(&a, "synthetic/uid-1/x").is_none(),
        "idle on-demand SVID dropped"
    );
    // And again at the next half-life.
    clock.set(clock.now() + Duration::from_secs(101));
    a.tick(clock.now());
    assert_ne!(serial(&a, "web").unwrap(), second);
    assert_eq!(a.x509_mints(), 4);
}

#[test]
fn unused_svids_are_dropped_after_idle_keep_and_minted_again_on_use() {
    let dir = tempfile::tempdir().unwrap();
    let (a, clock) = clocked(
        dir.path(),
        Duration::from_secs(36_000),
        NewRootPolicy::Refuse,
        t0(),
    );
    let web = entry("1", "web", None);
    let first = svid(&a, &web);
    assert_eq!(a.x509_mints(), 1);
    clock.set(t0() + IDLE_KEEP - Duration::from_secs(1));
    a.tick(clock.now());
    assert!(
        Arc::ptr_eq(&svid(&a, &web), &first),
        "used within the window: kept"
    );
    // The fetch above counts as a use: idle from then on.
    clock.set(t0() + IDLE_KEEP * 2);
    a.tick(clock.now());
    assert_eq!(a.svid_stats().cached, 0, "dropped");
    let again = svid(&a, &web);
    assert_ne!(again.serial, first.serial, "minted again on use");
    assert_eq!(a.x509_mints(), 2);
}

#[tokio::test]
async fn registered_entries_are_pre_minted_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    let mut c = cfg(dir.path());
    c.premint_entries = 100;
    c.ca_ttl = Duration::from_secs(36_000);
    let a = CaAuthority::open_with_clock(c, clock.clone()).unwrap();
    let all = entries(5_000);
    let p = publisher(&all);
    let (stop, task) = spawn(&a, p.feed());
    until("pre-minting", || a.svid_stats().cached == 100).await;
    // Give the task a chance to (wrongly) mint more.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let stats = a.svid_stats();
    assert_eq!((stats.cached, stats.pinned, stats.held), (100, 100, 0));
    assert_eq!(a.x509_mints(), 100, "only the budget is minted ahead");
    // A pre-minted entry is served without minting.
    let pinned: Vec<_> = all
        .iter()
        .filter(|e| a.lock().svids.is_pinned(&e.id))
        .cloned()
        .collect();
    assert_eq!(pinned.len(), 100);
    let w = a.x509_svid(&pinned[0]).await.unwrap();
    assert_eq!(a.x509_mints(), 100);
    drop(w);
    // Any other is minted on first use, and dropped once idle; the pre-minted ones stay.
    let other = all
        .iter()
        .find(|e| !a.lock().svids.is_pinned(&e.id))
        .unwrap();
    a.x509_svid(other).await.unwrap();
    assert_eq!(a.x509_mints(), 101);
    assert_eq!(a.svid_stats().cached, 101);
    clock.set(t0() + IDLE_KEEP * 2);
    a.tick(clock.now());
    assert_eq!(a.svid_stats().cached, 100);
    assert!(serial(&a, pinned[0].id.as_str()).is_some());
    // A new entry joins the budget once a pinned one leaves.
    let newcomer = entry("new", "new", None);
    p.apply([(*newcomer).clone()], [pinned[1].id.clone()]);
    until("the budget refilled", || {
        a.svid_stats().pinned == 100 && a.svid_stats().cached == 100
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Events that follow are applied one by one; after missed events the registry is re-read.
#[test]
fn the_feed_is_followed_incrementally_and_re_read_after_missed_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.premint_entries = 2;
    let a = CaAuthority::open(c).unwrap();
    let all = entries(4);
    let p = publisher(&all[..2]);
    let mut feed = p.feed();
    let mut seen = None;
    a.follow(&mut feed, &mut seen);
    assert_eq!(seen, Some(1));
    a.tick(SystemTime::now());
    assert_eq!(a.svid_stats().cached, 2, "both pre-minted");
    // One event that follows: e00000 leaves, its budget goes to e00002 at once.
    p.apply([(*all[2]).clone()], [all[0].id.clone()]);
    a.follow(&mut feed, &mut seen);
    assert_eq!(seen, Some(2));
    assert!(serial(&a, "e00000").is_none());
    assert!(a.lock().svids.is_pinned(&all[2].id));
    // Two events the reader misses: it re-reads the registry.
    p.apply([], [all[1].id.clone()]);
    p.apply([(*all[3]).clone()], []);
    a.follow(&mut feed, &mut seen);
    assert_eq!(seen, Some(4));
    assert!(
        serial(&a, "e00001").is_none(),
        "removed while unseen: dropped"
    );
    assert!(
        a.lock().svids.is_pinned(&all[3].id),
        "added while unseen: pinned"
    );
    a.tick(SystemTime::now());
    let stats = a.svid_stats();
    assert_eq!((stats.cached, stats.pinned), (2, 2));
}

#[test]
fn a_hundred_thousand_entries_cost_only_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.premint_entries = 10;
    let a = CaAuthority::open(c).unwrap();
    let p = publisher(&entries(100_000));
    let feed = p.feed();
    a.resync(&feed);
    let Upkeep { jobs, .. } = a.upkeep(SystemTime::now());
    assert_eq!(jobs.len(), 10, "pre-mints only the budget");
    assert_eq!(a.svid_stats().pinned, 10);
    assert_eq!(
        a.lock().svids.len(),
        10,
        "no bookkeeping for the other entries"
    );
}

/// Requests arriving while an entry's first mint is under way wait for it: one mint, one SVID.
#[tokio::test]
async fn requests_during_a_first_mint_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    let web = entry("web", "web", None);
    // A request has taken the ticket and is minting (outside the lock).
    let crate::svid_cache::Lookup::Mint(ticket) = a.lock().svids.lookup(&web, a.now()) else {
        panic!("the first lookup mints")
    };
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let (a, web) = (a.clone(), web.clone());
            tokio::spawn(async move { a.x509_svid(&web).await.unwrap().peek() })
        })
        .collect();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(waiting.iter().all(|w| !w.is_finished()), "they wait");
    assert_eq!(a.x509_mints(), 0, "and do not mint");
    let signer = a.signer_for(&mut a.lock().keys, a.now()).unwrap();
    let minted = a.mint(&signer, &web, a.now()).unwrap();
    a.lock()
        .svids
        .install_minted(&web, ticket, minted.clone(), a.now());
    for w in waiting {
        assert!(
            Arc::ptr_eq(&w.await.unwrap(), &minted),
            "they get that SVID"
        );
    }
    assert_eq!(a.x509_mints(), 1);
}

/// The same race on real threads: many first fetches of one entry at once mint it once.
#[test]
fn concurrent_first_fetches_of_one_entry_mint_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    for round in 0..10u64 {
        let web = entry(&format!("web{round}"), &format!("web{round}"), None);
        let start = Arc::new(std::sync::Barrier::new(8));
        let fetches: Vec<_> = (0..8)
            .map(|_| {
                let (a, web, start) = (a.clone(), web.clone(), start.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    start.wait();
                    rt.block_on(a.x509_svid(&web))
                        .unwrap()
                        .peek()
                        .serial
                        .clone()
                })
            })
            .collect();
        let mut serials: Vec<_> = fetches.into_iter().map(|f| f.join().unwrap()).collect();
        serials.dedup();
        assert_eq!(serials.len(), 1, "every caller got the same SVID");
        assert_eq!(a.x509_mints(), round + 1, "one mint per entry");
    }
}

#[tokio::test]
async fn a_changed_entry_is_re_minted_and_sent_to_its_holders_only() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    let all = entries(2);
    let p = publisher(&all);
    let (stop, task) = spawn(&a, p.feed());
    until("pre-minting", || a.svid_stats().cached == 2).await;
    let mut w0 = a.x509_svid(&all[0]).await.unwrap();
    let mut w1 = a.x509_svid(&all[1]).await.unwrap();
    let first = w0.current();
    w1.current();
    let mut changed = (*all[0]).clone();
    changed.dns_names = vec!["web.internal".into()];
    p.apply([changed], []);
    tokio::time::timeout(Duration::from_secs(30), w0.changed())
        .await
        .unwrap();
    let fresh = w0.current();
    assert_ne!(fresh.serial, first.serial);
    let (_, leaf) = x509_parser::parse_x509_certificate(&fresh.cert_chain_der).unwrap();
    let sans = format!(
        "{:?}",
        leaf.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(sans.contains("web.internal"), "{sans}");
    assert!(!w1.has_changed(), "the other entry's stream is not woken");
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn removed_entries_keep_their_svid_while_held_and_rotate_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    let mut c = cfg(dir.path());
    c.ca_ttl = Duration::from_secs(36_000);
    let a = CaAuthority::open_with_clock(c, clock.clone()).unwrap();
    let all = entries(3);
    let p = publisher(&all);
    let (stop, task) = spawn(&a, p.feed());
    until("pre-minting", || a.svid_stats().cached == 3).await;
    // A synthetic identity (dev mode) is never registered: minted on request, unheld.
    let synthetic = entry("synthetic/uid-1/x", "uid-1/x", None);
    a.x509_svid(&synthetic).await.unwrap();
    // A stream holds entry 1's SVID.
    let mut held = a.x509_svid(&all[1]).await.unwrap();
    let first = held.current();
    let gone = serial(&a, "e00002").unwrap();

    p.apply([], [all[1].id.clone(), all[2].id.clone()]);
    until("the removal", || serial(&a, "e00002").is_none()).await;
    assert_eq!(
        serial(&a, "e00001"),
        Some(first.serial.clone()),
        "held: kept"
    );
    assert!(serial(&a, "synthetic/uid-1/x").is_some());

    // Asking for the removed entry again (a caller on a stale view) mints a new SVID.
    let again = a.x509_svid(&all[2]).await.unwrap().peek();
    assert_ne!(again.serial, gone);

    // The held SVID of the removed entry is rotated at half-life (600 s SVIDs).
    clock.set(t0() + Duration::from_secs(301));
    a.tick(clock.now());
    assert!(held.has_changed(), "rotated");
    assert_ne!(held.current().serial, first.serial);
    // Once the stream lets go, it goes at the next sweep; the registered one stays.
    drop(held);
    a.tick(clock.now());
    assert!(serial(&a, "e00001").is_none());
    assert!(serial(&a, "e00000").is_some());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn a_background_mint_never_replaces_one_made_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let a = CaAuthority::open(cfg(dir.path())).unwrap();
    let all = entries(2);
    let now = SystemTime::now();
    {
        let mut st = a.lock();
        st.svids.fill(&all, now);
    }
    let Upkeep { jobs, signer, .. } = a.upkeep(now);
    assert_eq!(jobs.len(), 2);
    let signer = signer.unwrap();
    // A request mints entry 0 while the background mint is under way.
    let requested = svid(&a, &all[0]);
    for j in &jobs {
        let done = a.mint_and_install(&signer, j, now);
        let want = if j.entry.id == all[0].id {
            Installed::Skipped
        } else {
            Installed::Added
        };
        assert_eq!(done, Some(want), "{}", j.entry.id);
    }
    assert_eq!(serial(&a, "e00000"), Some(requested.serial.clone()));
    assert!(serial(&a, "e00001").is_some());
}

/// The rotation task on `tokio::time::pause`d time: a pre-minted SVID nobody uses is rotated
/// at each half-life, and the stream holding it is woken each time.
#[tokio::test(start_paused = true)]
async fn the_rotation_task_rotates_on_paused_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TokioClock {
        t0: t0(),
        start: tokio::time::Instant::now(),
    });
    let a = CaAuthority::open_with_clock(cfg(dir.path()), clock).unwrap();
    let web = entry("web", "web", Some(Duration::from_secs(20)));
    let p = publisher(std::slice::from_ref(&web));
    let (stop, task) = spawn(&a, p.feed());
    until("pre-minting", || a.svid_stats().cached == 1).await;
    let mut w = a.x509_svid(&web).await.unwrap();
    let mut serials = vec![w.current().serial.clone()];
    for _ in 0..3 {
        // Each wait is about 10 s of paused time, which tokio skips at once.
        assert!(w.changed().await);
        let s = w.current();
        assert!(usable_now(&s, a.now()));
        serials.push(s.serial.clone());
    }
    serials.dedup();
    assert_eq!(serials.len(), 4, "a new SVID at each half-life");
    assert_eq!(a.x509_mints(), 4);
    stop.send(true).unwrap();
    task.await.unwrap();
}

fn usable_now(s: &X509Svid, now: SystemTime) -> bool {
    s.not_before <= now && now < s.not_after
}

#[test]
fn jwt_svids_validate_against_their_own_trust_domain_in_the_set() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = CaAuthority::open(cfg(d1.path())).unwrap();
    let mut c = cfg(d2.path());
    c.trust_domain = TrustDomain::new("other.org").unwrap();
    let b = CaAuthority::open(c).unwrap();
    let theirs = Arc::new(Entry {
        spiffe_id: "spiffe://other.org/api".parse().unwrap(),
        ..(*entry("x", "x", None)).clone()
    });
    let token = jwt(&b, &theirs, &["a".to_owned()]).unwrap();
    match a.validate_jwt(&token.token, "a") {
        Err(JwtError::NoBundle(td)) => assert_eq!(td, "other.org"),
        other => panic!("expected NoBundle, got {other:?}"),
    }
    let bundles = a.bundles();
    let before = bundles.borrow().sequence();
    a.set_federated(b.bundles().borrow().own().clone()).unwrap();
    assert!(bundles.borrow().sequence() > before);
    assert_eq!(bundles.borrow().federated().count(), 1);
    let ok = a.validate_jwt(&token.token, "a").unwrap();
    assert_eq!(ok.spiffe_id.to_string(), "spiffe://other.org/api");
    // Our own tokens still validate; our own bundle cannot be overridden.
    let mine = jwt(&a, &entry("1", "web", None), &["a".to_owned()]).unwrap();
    a.validate_jwt(&mine.token, "a").unwrap();
    let err = a
        .set_federated(a.bundles().borrow().own().clone())
        .unwrap_err();
    assert!(err.to_string().contains("own trust domain"), "{err}");
    a.remove_federated(&TrustDomain::new("other.org").unwrap());
    assert!(a.validate_jwt(&token.token, "a").is_err());
}

// ---- CA validity, clock jumps, failing rotation and new trust roots ----

/// Collects what the authority logs (text, no colours) while a test runs.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// Lines at WARN or ERROR.
    pub(crate) fn loud(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }
}

/// Runs `f` with the authority's logs captured.
pub(crate) fn logged<T>(f: impl FnOnce() -> T) -> (T, Logs) {
    let logs = Logs::default();
    let sub = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    (out, logs)
}

fn clocked(
    dir: &Path,
    ttl: Duration,
    policy: NewRootPolicy,
    t0: SystemTime,
) -> (CaAuthority, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0));
    let mut c = cfg(dir);
    c.ca_ttl = ttl;
    c.x509_svid_ttl = ttl / 10;
    c.new_root = policy;
    let a = CaAuthority::open_with_clock(c, clock.clone()).unwrap();
    (a, clock)
}

/// Whether the SVID handed out is valid at `now`.
fn all_valid_at(w: &SvidWatch, now: SystemTime) {
    let x = w.peek();
    assert!(
        x.not_before <= now && now < x.not_after,
        "an SVID invalid at {now:?} was handed out: notBefore {:?}, notAfter {:?}",
        x.not_before,
        x.not_after
    );
}

fn unavailable(r: Result<SvidWatch, AuthorityError>) -> String {
    match r {
        Err(AuthorityError::Unavailable(why)) => why,
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(w) => panic!(
            "expected Unavailable, got an SVID valid {:?}..{:?}",
            w.peek().not_before,
            w.peek().not_after
        ),
    }
}

#[test]
fn a_failing_rotation_write_backs_off_and_never_mints_invalid_svids() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(600);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
    let web = entry("1", "web", None);
    fetch(&a, &web).unwrap();
    // ca.json can no longer be replaced (as on a full disk: every rotation write fails).
    let file = a.ca_file().to_owned();
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    std::fs::write(file.join("keep"), b"x").unwrap();

    // Drive the rotation task's loop on simulated time, with a request (as from an open
    // stream) at every turn, from before half-life to long past the CA's expiry.
    let end = t0 + ttl * 3;
    let ((), logs) = logged(|| {
        let mut turns = 0;
        while clock.now() < end && turns < 3000 {
            let now = clock.now();
            let next = a.tick(now);
            match fetch(&a, &web) {
                Ok(w) => all_valid_at(&w, now),
                Err(AuthorityError::Unavailable(_)) => assert!(now >= t0 + ttl),
                Err(e) => panic!("{e}"),
            }
            // As `serve` does: never sooner than 10 ms.
            clock.set(next.max(now + Duration::from_millis(10)));
            turns += 1;
        }
        assert!(
            clock.now() >= end,
            "{turns} turns reached only {:?} of {:?}: the failed rotation retries without \
             backoff",
            clock.now().duration_since(t0).unwrap(),
            end.duration_since(t0).unwrap()
        );
    });
    // Simulated time makes these exact: from the first failure at half-life (300 s) to
    // 1800 s, waits of 1, 2, 4 ... 32 s, then 60 s each: 30 attempts. A backoff that
    // changes (or stops backing off) changes the count.
    let attempts = a.lock().keys.rotation.alarm.count;
    assert_eq!(attempts, 30, "rotation attempts in {:?}", ttl * 3);
    // The first failure, a repeat every 5 minutes, and the refusals once no CA is valid.
    let loud = logs.loud();
    assert_eq!(loud.len(), 9, "loud lines:\n{}", loud.join("\n"));
    assert!(loud[0].contains("CA rotation failed"), "{}", loud[0]);
    // After the expiry: refused with a reason, never an SVID born expired.
    let why = unavailable(fetch(&a, &web));
    assert!(why.contains("every CA expired"), "{why}");
}

#[test]
fn a_forward_clock_jump_refuses_in_run_mode_and_replaces_the_ca_in_dev_mode() {
    let ttl = Duration::from_secs(3600);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let web = entry("1", "web", None);
    for policy in [
        NewRootPolicy::Refuse,
        NewRootPolicy::AtStart,
        NewRootPolicy::Always,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (a, clock) = clocked(dir.path(), ttl, policy, t0);
        let held = fetch(&a, &web).unwrap();
        all_valid_at(&held, t0);
        let before = own_x509(&a);
        // A VM restored from a snapshot, a laptop resumed days later.
        let later = t0 + ttl * 48;
        clock.set(later);
        // Before the rotation task even runs, nothing invalid is handed out.
        let ((why, next), logs) = logged(|| {
            let why = unavailable(fetch(&a, &web));
            (why, a.tick(later))
        });
        assert!(why.contains("every CA expired"), "{why}");
        assert!(next > later, "no spin after a jump");
        let text = logs.text();
        assert!(
            text.contains("ERROR") && text.contains("no CA is valid"),
            "{text}"
        );
        if policy == NewRootPolicy::Always {
            let ids = fetch(&a, &web).unwrap();
            all_valid_at(&ids, later);
            let after = own_x509(&a);
            assert_ne!(after, before, "a new CA");
            let fp = ca::fingerprint(&after[0]);
            assert!(
                logs.loud()
                    .iter()
                    .any(|l| l.contains("NEW CA") && l.contains(&fp)),
                "{text}"
            );
        } else {
            let why = unavailable(fetch(&a, &web));
            assert!(why.contains("--new-trust-root"), "{why}");
            assert_eq!(own_x509(&a), before, "no silent new root");
        }
    }
}

#[test]
fn a_clock_behind_the_ca_refuses_until_it_catches_up() {
    let ttl = Duration::from_secs(3600);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let dir = tempfile::tempdir().unwrap();
    let web = entry("1", "web", None);
    let ((a, clock), logs) = logged(|| {
        // Started with the clock behind a CA made earlier (an NTP step back, a bad RTC).
        drop(clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0));
        clocked(
            dir.path(),
            ttl,
            NewRootPolicy::Refuse,
            t0 - Duration::from_secs(3 * 86400),
        )
    });
    assert!(logs.text().contains("clock is behind"), "{}", logs.text());
    drop(clock);
    let why = unavailable(fetch(&a, &web));
    assert!(why.contains("clock is behind"), "{why}");

    // Same while running: an SVID minted now is not handed out once the clock steps back
    // before its notBefore.
    let dir = tempfile::tempdir().unwrap();
    let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
    fetch(&a, &web).unwrap();
    clock.set(t0 - Duration::from_secs(3600));
    let why = unavailable(fetch(&a, &web));
    assert!(why.contains("clock is behind"), "{why}");
    clock.set(t0 + Duration::from_secs(1));
    let ids = fetch(&a, &web).unwrap();
    all_valid_at(&ids, t0 + Duration::from_secs(1));
}

/// JWT-SVIDs follow the injected clock too: a clock behind the JWT key's notBefore gets
/// Unavailable (not a Mint error), and a token cached before the clock stepped back is not
/// handed out while its `iat` is in the future.
#[test]
fn jwt_svids_follow_the_injected_clock() {
    let ttl = Duration::from_secs(3600);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let dir = tempfile::tempdir().unwrap();
    let web = entry("1", "web", None);
    let aud = vec!["a".to_owned()];
    let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
    let first = jwt(&a, &web, &aud).unwrap();
    assert_eq!(first.issued_at, t0);
    clock.set(t0 - Duration::from_secs(3600));
    match jwt(&a, &web, &aud) {
        Err(AuthorityError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    clock.set(t0 + Duration::from_secs(60));
    let again = jwt(&a, &web, &aud).unwrap();
    assert_eq!(again.token, first.token, "still cached");
    let claims = a.validate_jwt(&again.token, "a").unwrap();
    assert_eq!(claims.spiffe_id, web.spiffe_id);
    // Validation uses the same clock: far past the token's expiry it is refused.
    clock.set(t0 + Duration::from_secs(86_000));
    assert!(a.validate_jwt(&again.token, "a").is_err());
}

#[test]
fn a_clock_behind_the_active_ca_signs_with_an_older_one_still_valid() {
    let ttl = Duration::from_secs(600);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
    let first = own_x509(&a)[0].clone();
    // Prepare at half-life, activate at five sixths: the first CA is retired, still valid.
    for t in [301, 502] {
        clock.set(t0 + Duration::from_secs(t));
        a.tick(clock.now());
    }
    let bundle = own_x509(&a);
    assert_eq!(bundle.len(), 2);
    // The clock steps back before the new CA's notBefore.
    let back = t0 + Duration::from_secs(200);
    clock.set(back);
    let web = entry("1", "web", None);
    let ids = fetch(&a, &web).unwrap();
    all_valid_at(&ids, back);
    let held = ids.peek();
    let (_, leaf) = x509_parser::parse_x509_certificate(&held.cert_chain_der).unwrap();
    let (_, old) = x509_parser::parse_x509_certificate(&first).unwrap();
    assert_eq!(leaf.issuer(), old.subject(), "signed by the older CA");
}

/// The deletions, emptyings and expiries that would silently make a new trust root.
fn damage(dir: &Path, how: &str) {
    let file = ca::ca_file(dir);
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    match how {
        "deleted" => std::fs::remove_file(&file).unwrap(),
        "empty" => edit(&|v| v["authorities"] = serde_json::json!([])),
        "retired" => edit(&|v| {
            for a in v["authorities"].as_array_mut().unwrap() {
                a["state"] = "retired".into();
            }
        }),
        "expired" => {}
        _ => unreachable!(),
    }
}

#[test]
fn a_new_trust_root_needs_consent_and_is_logged_with_its_fingerprint() {
    let ttl = Duration::from_secs(3600);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for how in ["deleted", "empty", "retired", "expired"] {
        for policy in [NewRootPolicy::AtStart, NewRootPolicy::Always] {
            let dir = tempfile::tempdir().unwrap();
            let (a, _) = clocked(dir.path(), ttl, NewRootPolicy::Refuse, t0);
            let before = own_x509(&a);
            drop(a);
            // The entry store shows the data dir was used (it matters once ca.json is gone).
            std::fs::write(dir.path().join(STORE_FILE), b"").unwrap();
            damage(dir.path(), how);
            let start = if how == "expired" { t0 + ttl * 2 } else { t0 };
            let file = ca::ca_file(dir.path());
            let saved = std::fs::read(&file).ok();
            let clock = Arc::new(ManualClock::new(start));
            let mut c = cfg(dir.path());
            c.ca_ttl = ttl;
            c.x509_svid_ttl = ttl / 10;
            let err = CaAuthority::open_with_clock(c.clone(), clock.clone())
                .err()
                .unwrap_or_else(|| panic!("{how}: a new trust root was made without consent"));
            let msg = err.to_string();
            assert!(matches!(err, Error::NewTrustRoot { .. }), "{how}: {msg}");
            assert!(msg.contains(&file.display().to_string()), "{how}: {msg}");
            assert!(msg.contains("--new-trust-root"), "{how}: {msg}");
            assert_eq!(
                std::fs::read(&file).ok(),
                saved,
                "{how}: the file is left alone"
            );

            c.new_root = policy;
            let (a, logs) =
                logged(|| CaAuthority::open_with_clock(c.clone(), clock.clone()).unwrap());
            let after = own_x509(&a);
            assert_ne!(after, before, "{how}");
            let fp = ca::fingerprint(after.last().unwrap());
            assert!(
                logs.loud()
                    .iter()
                    .any(|l| l.contains("NEW CA") && l.contains(&fp)),
                "{how}: {}",
                logs.text()
            );
        }
    }
}

#[test]
fn a_fresh_data_dir_creates_its_ca_quietly_with_its_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, logs) = logged(|| CaAuthority::open(cfg(dir.path())).unwrap());
    let fp = ca::fingerprint(&own_x509(&a)[0]);
    assert!(logs.loud().is_empty(), "{}", logs.text());
    assert!(
        logs.text()
            .lines()
            .any(|l| l.contains("INFO") && l.contains(&fp)),
        "{}",
        logs.text()
    );
    // A restart makes nothing new.
    drop(a);
    let (_, logs) = logged(|| CaAuthority::open(cfg(dir.path())).unwrap());
    assert!(!logs.text().contains("created"), "{}", logs.text());
}

#[test]
fn a_mismatched_key_is_refused_even_in_dev_mode() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let ttl = Duration::from_secs(600);
    let (a, clock) = clocked(dir.path(), ttl, NewRootPolicy::Always, t0);
    clock.set(t0 + Duration::from_secs(301));
    a.tick(clock.now());
    assert_eq!(own_x509(&a).len(), 2);
    drop(a);
    let file = ca::ca_file(dir.path());
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let k0 = v["authorities"][0]["key"].take();
    v["authorities"][0]["key"] = v["authorities"][1]["key"].clone();
    v["authorities"][1]["key"] = k0;
    std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
    let mut c = cfg(dir.path());
    c.new_root = NewRootPolicy::Always;
    let msg = CaAuthority::open_with_clock(c, clock)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("does not belong"),
        "{msg}"
    );
}
