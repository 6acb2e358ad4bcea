//! A manual check of the server link against a real SPIRE Server.
//!
//! ```sh
//! cargo run -p spiffed-spire --example server_link -- \
//!     --address 127.0.0.1:18081 --trust-domain example.org --data-dir /tmp/agent \
//!     --bootstrap /tmp/bootstrap.pem (or --insecure) \
//!     --join-token TOKEN (or --x509pop CERT KEY) [--minutes N]
//! ```
//!
//! It attests (or loads the stored agent SVID), then every 20 s for `--minutes` (default 0:
//! once) calls `GetBundle`, the entry sync, `BatchNewX509SVID` for every entry (a fresh key and
//! CSR each) and `NewJWTSVID` for the first, printing what came back, while the link rotates
//! the agent SVID in the background.
#![allow(clippy::print_stdout, reason = "a manual check prints what it sees")]

use std::collections::HashMap;
use std::time::Duration;

use spiffe::TrustDomain;
use spiffed_proto::spire::svid::NewX509svidParams;
use spiffed_spire::config::{
    Bootstrap, BundleFormat, DEFAULT_SYNC_INTERVAL, JoinToken, NodeAttestation, SpireConfig,
};
use spiffed_spire::server::{EntryVersion, ServerApi};
use spiffed_spire::status::StatusHandle;
use spiffed_spire::{ServerLink, link::LinkError};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().collect();
    let need = |n: &str| arg(&args, n).ok_or_else(|| format!("{n} is required"));
    let bootstrap = if args.iter().any(|a| a == "--insecure") {
        Bootstrap::Insecure
    } else {
        Bootstrap::Bundle {
            path: need("--bootstrap")?.into(),
            format: if args.iter().any(|a| a == "--spiffe") {
                BundleFormat::Spiffe
            } else {
                BundleFormat::Pem
            },
        }
    };
    let attestation = if let Some(i) = args.iter().position(|a| a == "--x509pop") {
        NodeAttestation::X509Pop {
            certificate_path: args.get(i + 1).ok_or("--x509pop CERT KEY")?.into(),
            private_key_path: args.get(i + 2).ok_or("--x509pop CERT KEY")?.into(),
            intermediates_path: None,
        }
    } else {
        NodeAttestation::JoinToken(arg(&args, "--join-token").map(JoinToken::new))
    };
    let cfg = SpireConfig {
        address: need("--address")?.parse()?,
        bootstrap,
        attestation,
        sync_interval: DEFAULT_SYNC_INTERVAL,
    };
    let td = TrustDomain::new(need("--trust-domain")?)?;
    let minutes: u64 = arg(&args, "--minutes").map_or(Ok(0), |m| m.parse())?;
    let (status, mut status_rx) = StatusHandle::new();
    let link = ServerLink::new(cfg, td, need("--data-dir")?.into(), status)
        .map_err(|e: LinkError| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(link.clone().run(stop_rx));
    tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            let s = status_rx.borrow().clone();
            println!("status: {s:?}");
        }
    });
    link.attested().await;
    println!("attested as {:?}", link.agent_id());

    let mut cached: HashMap<String, EntryVersion> = HashMap::new();
    let rounds = 1 + minutes * 3;
    for round in 0..rounds {
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        println!(
            "--- round {round}, agent {:?}, banned {}",
            link.agent_id(),
            link.is_banned()
        );
        match link.get_bundle().await {
            Ok(b) => {
                println!(
                    "GetBundle: td {} x509 {} jwt {} seq {}",
                    b.trust_domain,
                    b.x509_authorities.len(),
                    b.jwt_authorities.len(),
                    b.sequence_number
                );
                if let Err(e) = link.set_bundle(&b) {
                    println!("set_bundle: {e}");
                }
            }
            Err(e) => println!("GetBundle failed: {e}"),
        }
        let entries = match link.authorized_entries(&cached).await {
            Ok(e) => e,
            Err(e) => {
                println!("entries failed: {e}");
                continue;
            }
        };
        println!(
            "entries: {} authorized, {} changed",
            entries.authorized.len(),
            entries.changed.len()
        );
        for (i, e) in entries.changed.iter().enumerate() {
            if i < 3 {
                println!(
                    "  entry {} {:?} selectors {:?} rev {} created {}",
                    e.id,
                    e.spiffe_id.as_ref().map(|s| s.path.clone()),
                    e.selectors
                        .iter()
                        .map(|s| format!("{}:{}", s.r#type, s.value))
                        .collect::<Vec<_>>(),
                    e.revision_number,
                    e.created_at
                );
            }
            cached.insert(e.id.clone(), EntryVersion::of(e));
        }
        cached.retain(|id, _| entries.authorized.contains(id));
        let mut params = Vec::new();
        for id in cached.keys() {
            let key = rcgen::KeyPair::generate()?;
            let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
            params.push(NewX509svidParams {
                entry_id: id.clone(),
                csr: csr.der().to_vec(),
            });
        }
        // At most 500 CSRs per call (the server's per-IP signing burst).
        let (mut ok, mut failed) = (0, 0);
        while !params.is_empty() {
            let rest = params.split_off(params.len().min(500));
            match link
                .batch_new_x509_svid(std::mem::replace(&mut params, rest))
                .await
            {
                Ok(results) => {
                    for r in results {
                        let st = r.status.unwrap_or_default();
                        let svid = r.svid.unwrap_or_default();
                        if st.code == 0 {
                            if ok < 3 {
                                println!(
                                    "  BatchNewX509SVID: id {:?} chain {} expires {}",
                                    svid.id.map(|i| i.path),
                                    svid.cert_chain.len(),
                                    svid.expires_at
                                );
                            }
                            ok += 1;
                        } else {
                            println!("  BatchNewX509SVID: status {} {:?}", st.code, st.message);
                            failed += 1;
                        }
                    }
                }
                Err(e) => println!("BatchNewX509SVID failed: {e}"),
            }
        }
        if ok + failed > 0 {
            println!("  BatchNewX509SVID: {ok} minted, {failed} refused");
        }
        if let Some(id) = cached.keys().next() {
            match link.new_jwt_svid(id, &["aud1".to_owned()]).await {
                Ok(j) => println!(
                    "  NewJWTSVID: {:?} expires {} token {}...",
                    j.id.map(|i| i.path),
                    j.expires_at,
                    &j.token[..20.min(j.token.len())]
                ),
                Err(e) => println!("NewJWTSVID failed: {e}"),
            }
        }
        match link.get_federated_bundle("partner.org").await {
            Ok(b) => println!("GetFederatedBundle(partner.org): {}", b.is_some()),
            Err(e) => println!("GetFederatedBundle failed: {e}"),
        }
    }
    let _ = stop_tx.send(true);
    let _ = runner.await;
    Ok(())
}
