//! The entry sources at 100,000 stored entries: start-up load, one admin create, one list page.
//!
//! `cargo bench -p spiffed-entries --bench sources`
//!
//! Fills a store with 100,000 entries (written straight into SQLite in one transaction: the
//! admin path commits each entry with an fsync), then measures what an operator would notice.
//! Prints figures; asserts nothing about time.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "benchmark"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffed_core::{EntryLimits, Selector, SelectorCheck, SelectorError};
use spiffed_entries::store::{EntrySpec, Filter, Store};
use spiffed_entries::{ConfigEntries, EntrySources, Rules};

const N: u32 = 100_000;

struct AnySelector;
impl SelectorCheck for AnySelector {
    fn check(&self, _: &Selector) -> Result<(), SelectorError> {
        Ok(())
    }
}

fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn fill(path: &std::path::Path) {
    drop(Store::open(path).unwrap());
    let mut conn = rusqlite::Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut entry = tx
            .prepare("INSERT INTO entries VALUES (?1, ?2, ?3, NULL, NULL, NULL, '', 0, 0, 0, 1)")
            .unwrap();
        let mut sel = tx
            .prepare("INSERT INTO entry_selectors VALUES (?1, ?2)")
            .unwrap();
        for i in 0..N {
            let id = format!("entry-{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15);
            let path = format!("unix:path:/usr/bin/app{i}");
            let uid = format!("unix:uid:{}", 1000 + i % 1000);
            let selectors = format!("{path}\n{uid}");
            entry
                .execute(rusqlite::params![
                    id,
                    format!("spiffe://example.org/app{i}"),
                    selectors
                ])
                .unwrap();
            sel.execute([&path, &id]).unwrap();
            sel.execute([&uid, &id]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.db");
    fill(&path);

    let before = rss();
    let start = Instant::now();
    let store = Store::open(&path).unwrap();
    let rules = Rules {
        trust_domain: spiffed_core::TrustDomain::new("example.org").unwrap(),
        limits: EntryLimits::default(),
        selectors: Arc::new(AnySelector),
    };
    let (sources, loaded) = EntrySources::open(store, ConfigEntries::default(), rules).unwrap();
    let load = start.elapsed();
    let grown = rss().saturating_sub(before);
    println!(
        "start-up: {} entries loaded in {load:?}; RSS grew by {:.1} MiB",
        loaded.entries,
        grown as f64 / (1024.0 * 1024.0)
    );

    let mut creates = Vec::new();
    for i in 0..20 {
        let spec = EntrySpec {
            spiffe_id: format!("spiffe://example.org/new{i}").parse().unwrap(),
            selectors: vec![format!("unix:uid:{}", 5000 + i).parse().unwrap()],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            admin: false,
            federates_with: vec![],
        };
        let start = Instant::now();
        sources.create(vec![spec]).unwrap().remove(0).unwrap();
        creates.push(start.elapsed());
    }
    creates.sort();
    println!(
        "one more entry create (store commit with fsync + publish): p50 {:?}",
        creates[creates.len() / 2]
    );

    let page = |filter: &Filter| {
        let mut times: Vec<Duration> = Vec::new();
        let mut after = None;
        for _ in 0..50 {
            let start = Instant::now();
            let p = sources.list(after.as_ref(), 100, filter).unwrap();
            times.push(start.elapsed());
            after = p.next;
        }
        times.sort();
        times[times.len() / 2]
    };
    println!("list page of 100: p50 {:?}", page(&Filter::default()));
    let by_uid = Filter {
        selector: Some("unix:uid:1004".parse().unwrap()),
        ..Filter::default()
    };
    println!("list page filtered by selector: p50 {:?}", page(&by_uid));
    let start = Instant::now();
    let mut after = None;
    let mut listed = 0;
    loop {
        let p = sources
            .list(after.as_ref(), 1000, &Filter::default())
            .unwrap();
        listed += p.entries.len();
        match p.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    println!("list all {listed} in pages of 1000: {:?}", start.elapsed());
}
