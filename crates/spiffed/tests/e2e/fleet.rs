//! A small fleet on a highly available SPIRE Server (`spiffed_test_support::fleet`): two
//! spire-server v1.13.3 sharing a PostgreSQL database, reached by one name that resolves to
//! both (a hosts file in each spiffed's own mount namespace), and three spiffed agents. The
//! faults of an HA deployment: a server killed (agents move to the other with no workload
//! noticing), the server back (agents return to it: no herd on the survivor), and the servers
//! closing every connection after 3 minutes (reopened unnoticed). Must run as root.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spiffed_test_support::fleet::{Fleet, FleetAgent, FleetOptions};
use spiffed_test_support::spire::EntrySpec;
use spiffed_test_support::{my_uid, raw_client, x509_stream};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::agent_mode::{chains_to, health, tail, wait_ids};
use crate::{bin, split_der};

fn id(path: &str) -> String {
    format!("spiffe://example.org/{path}")
}

/// What the workloads' streams saw.
#[derive(Default, Debug)]
struct Seen {
    /// Messages per agent.
    messages: Vec<usize>,
    /// Messages per agent received after `mark` was set.
    after_mark: Vec<usize>,
    mark: bool,
    /// Every problem: a stream error or end, an SVID not valid on arrival, a chain its
    /// bundle does not verify.
    problems: Vec<String>,
}

/// Holds a FetchX509SVID stream on each agent (as a workload of this uid) and checks every
/// message: each SVID valid at arrival and verified by the bundle sent with it.
async fn hold_streams(agents: &[FleetAgent]) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen {
        messages: vec![0; agents.len()],
        after_mark: vec![0; agents.len()],
        ..Seen::default()
    }));
    for (i, a) in agents.iter().enumerate() {
        let mut client = raw_client(&a.agent.socket).await;
        let mut stream = x509_stream(&mut client).await;
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let _client = client;
            loop {
                let msg = stream.message().await;
                let mut s = seen.lock().unwrap();
                let m = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        s.problems.push(format!("agent {i}: the stream ended"));
                        return;
                    }
                    Err(e) => {
                        s.problems
                            .push(format!("agent {i}: the stream failed: {e}"));
                        return;
                    }
                };
                s.messages[i] += 1;
                if s.mark {
                    s.after_mark[i] += 1;
                }
                for svid in &m.svids {
                    let certs = split_der(&svid.x509_svid);
                    let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
                    if !leaf.validity().is_valid() {
                        s.problems.push(format!(
                            "agent {i}: {} arrived outside its validity ({:?})",
                            svid.spiffe_id,
                            leaf.validity()
                        ));
                    }
                    if !chains_to(&svid.x509_svid, &split_der(&svid.bundle)) {
                        s.problems.push(format!(
                            "agent {i}: {} does not verify with its bundle",
                            svid.spiffe_id
                        ));
                    }
                }
            }
        });
    }
    seen
}

/// Samples `spiffed healthcheck` of every agent every 300 ms until `stop`; returns the
/// readiness values seen per agent and every failed check.
fn sample_health(
    sockets: Vec<std::path::PathBuf>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<BTreeSet<String>>, Vec<String>)> {
    std::thread::spawn(move || {
        let mut states = vec![BTreeSet::new(); sockets.len()];
        let mut failures = vec![];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, s) in sockets.iter().enumerate() {
                let out = std::process::Command::new(bin())
                    .args(["healthcheck", "--output", "json", "--timeout", "5s"])
                    .arg("--socket")
                    .arg(s)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                states[i].insert(v["readiness"].as_str().unwrap_or("?").to_owned());
                if !out.status.success() {
                    failures.push(format!("agent {i}: {text}"));
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        (states, failures)
    })
}

/// The one server each agent is connected to now (`None` while it has none or several).
fn placement(fleet: &Fleet, agents: &[FleetAgent]) -> Vec<Option<usize>> {
    agents
        .iter()
        .map(|a| match fleet.servers_of(a.agent.pid())[..] {
            [s] => Some(s),
            _ => None,
        })
        .collect()
}

fn logs(agents: &[FleetAgent]) -> String {
    agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("--- agent {i}\n{}", tail(&a.agent.logs(), 25)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts a fleet of two servers and `n` agents, each with one short-lived entry (20 s, so it
/// is renewed every ~10 s through whichever server answers) for this uid, and waits until
/// every agent serves it.
async fn fleet_with_agents(n: usize) -> (Fleet, Vec<FleetAgent>) {
    let fleet = tokio::task::spawn_blocking(|| Fleet::start(FleetOptions::default()))
        .await
        .unwrap();
    let sel = format!("unix:uid:{}", my_uid());
    let mut agents = vec![];
    for i in 0..n {
        let a = fleet.start_agent(&bin(), "");
        let mut e = EntrySpec::workload(&a.agent_id, &id(&format!("node{i}/web")), &[&sel]);
        e.x509_svid_ttl = Some(20);
        fleet.any_server().entry_create(&e);
        agents.push(a);
    }
    for (i, a) in agents.iter().enumerate() {
        wait_ids(&a.agent, &[id(&format!("node{i}/web"))]).await;
    }
    (fleet, agents)
}

/// Kill (SIGKILL) the server an agent talks to: every agent moves to the other within
/// seconds and syncs through it (an entry created there arrives); workloads keep their
/// streams, every SVID they receive is valid, and the healthcheck keeps passing. The server
/// comes back: the agents that preferred it return to it (the placement before the kill is
/// restored), rather than all staying on the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_fails_over_and_its_agents_return_when_it_is_back() {
    let started = Instant::now();
    let (mut fleet, agents) = fleet_with_agents(3).await;
    eprintln!("fleet up, 3 agents serving: {:?}", started.elapsed());
    let before = spiffed_test_support::spire::poll_until(
        Duration::from_secs(30),
        "every agent connected to one server",
        || {
            let p = placement(&fleet, &agents);
            p.iter().all(Option::is_some).then_some(p)
        },
    );
    eprintln!("placement before the kill: {before:?}");
    let victim = before[0].unwrap();
    let survivor = 1 - victim;

    let seen = hold_streams(&agents).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_health(
        agents.iter().map(|a| a.agent.socket.clone()).collect(),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    fleet.kill_server(victim);
    let killed = Instant::now();
    seen.lock().unwrap().mark = true;
    // An entry created after the kill reaches each agent only through the survivor.
    let sel = format!("unix:uid:{}", my_uid());
    for (i, a) in agents.iter().enumerate() {
        fleet.any_server().entry_create(&EntrySpec::workload(
            &a.agent_id,
            &id(&format!("node{i}/after-kill")),
            &[&sel],
        ));
    }
    let deadline = killed + Duration::from_secs(60);
    let mut moved_at = None;
    loop {
        let p = placement(&fleet, &agents);
        if moved_at.is_none() && p.iter().all(|s| *s == Some(survivor)) {
            moved_at = Some(killed.elapsed());
        }
        let mut synced = true;
        for (i, a) in agents.iter().enumerate() {
            let ids = crate::agent_mode::x509(&a.agent.socket)
                .await
                .map(|s| crate::agent_mode::ids_of(&s))
                .unwrap_or_default();
            synced &= ids.contains(&id(&format!("node{i}/after-kill")));
        }
        if moved_at.is_some() && synced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the kill of server {victim}, not every agent moved to server {survivor} and \
             synced through it (placement {p:?}, synced {synced}); logs:\n{}",
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "killed server {victim}: every agent on server {survivor} after {:?}, synced through it after {:?}",
        moved_at.unwrap(),
        killed.elapsed()
    );
    // The short-lived SVIDs are renewed through the survivor (each agent's stream gets new
    // ones), valid on arrival.
    let renewed = Instant::now() + Duration::from_secs(40);
    while seen.lock().unwrap().after_mark.iter().any(|n| *n < 2) {
        assert!(
            Instant::now() < renewed,
            "the workloads got no renewed SVIDs after the kill: {:?}; logs:\n{}",
            seen.lock().unwrap(),
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The server comes back: the agents that preferred it return (within the fallback age of
    // 30 s plus a sync), the others stay.
    tokio::task::block_in_place(|| fleet.restart_server(victim));
    let back = Instant::now();
    let deadline = back + Duration::from_secs(90);
    loop {
        let p = placement(&fleet, &agents);
        if p == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server {victim} is back, but the agents did not return to their placement \
             {before:?}: {p:?} (a herd on the survivor); logs:\n{}",
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "server {victim} back: placement {before:?} restored after {:?}",
        back.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (states, failures) = tokio::task::block_in_place(|| sampler.join().unwrap());
    eprintln!("readiness seen during the test, per agent: {states:?}");
    let s = seen.lock().unwrap();
    eprintln!("stream messages per agent: {:?}", s.messages);
    assert!(s.problems.is_empty(), "workloads noticed: {:?}", s.problems);
    assert!(failures.is_empty(), "healthchecks failed: {failures:?}");
    for (i, st) in states.iter().enumerate() {
        assert!(
            st.iter()
                .all(|r| r == "serving" || r == "serving_from_cache"),
            "agent {i}: {st:?}"
        );
    }
    eprintln!("total {:?}", started.elapsed());
}

/// SPIRE Server closes every agent connection after 3 minutes (grpc-go `MaxConnectionAge`,
/// a constant in v1.13.3, ±10 % jitter, not configurable): spiffed connects again and no
/// workload notices (streams kept, every fetch answered, healthcheck passing, no sync error
/// logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_the_servers_close_every_3_minutes_are_reopened_unnoticed() {
    let (fleet, agents) = fleet_with_agents(1).await;
    let agent = &agents[0].agent;
    let seen = hold_streams(&agents).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_health(vec![agent.socket.clone()], Arc::clone(&stop));
    let connects = |agent: &spiffed_test_support::Agent| {
        agent
            .logs()
            .matches("connected to the SPIRE Server")
            .count()
    };
    let first = connects(agent);
    let start = Instant::now();
    let mut peers_seen = BTreeSet::new();
    // 3 min + 10 % jitter + a sync: at least one close by the server.
    while start.elapsed() < Duration::from_secs(215) {
        let p = spiffed_test_support::fleet::tcp_peers(agent.pid());
        peers_seen.extend(p.into_iter().filter(|a| fleet.server_index(*a).is_some()));
        let ids = crate::agent_mode::x509(&agent.socket).await;
        assert!(ids.is_ok(), "a fetch failed: {ids:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (states, failures) = tokio::task::block_in_place(|| sampler.join().unwrap());
    let reconnects = connects(agent) - first;
    eprintln!(
        "{reconnects} new connections in {:?}; readiness seen {states:?}; servers {peers_seen:?}",
        start.elapsed()
    );
    assert!(
        reconnects >= 1,
        "the server never closed the connection, or spiffed never reconnected:\n{}",
        tail(&agent.logs(), 40)
    );
    let s = seen.lock().unwrap();
    assert!(
        s.problems.is_empty(),
        "the workload noticed: {:?}",
        s.problems
    );
    assert!(failures.is_empty(), "healthchecks failed: {failures:?}");
    assert_eq!(states[0], BTreeSet::from(["serving".to_owned()]));
    let logs = agent.logs();
    for bad in ["WARN", "ERROR"] {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(bad)).collect();
        assert!(lines.is_empty(), "spiffed logged problems: {lines:#?}");
    }
    let (ok, j) = health(agent);
    assert!(ok, "{j}");
}
