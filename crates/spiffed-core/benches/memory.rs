//! Memory and update cost of the entry index at 100,000 entries.
//!
//! `cargo bench -p spiffed-core --bench memory`
//!
//! Prints the resident-set growth (from `/proc/self/statm`) of an [`EntryPublisher`] holding
//! 100,000 entries of two selectors each (a uid shared by 100 entries, and a path of its own):
//! the entries themselves plus the index over them. The agent's budget is 64 MiB RSS in all.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "benchmark"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use spiffed_core::{Entry, EntryId, EntryIndex, EntryPublisher};

const N: u32 = 100_000;

fn entry(i: u32) -> Entry {
    let mut selectors = vec![
        format!("unix:uid:{}", 1000 + i % 1000).parse().unwrap(),
        format!("unix:path:/usr/bin/app{i}").parse().unwrap(),
    ];
    selectors.sort();
    Entry {
        id: EntryId::new(format!("entry-{i:032x}")),
        spiffe_id: format!("spiffe://example.org/app{i}").parse().unwrap(),
        selectors,
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    }
}

/// Resident set size in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    // What the agent holds: a publisher (index + entries) built from owned entries, as the
    // entry sources build it. Measured first, on a fresh heap.
    let before = rss();
    let start = Instant::now();
    let publisher = EntryPublisher::new((0..N).map(entry));
    let built = start.elapsed();
    let grown = rss().saturating_sub(before);
    println!(
        "{N} entries in an EntryPublisher: RSS grew by {:.1} MiB ({} bytes per entry), built \
         in {built:?}",
        grown as f64 / (1024.0 * 1024.0),
        grown / N as usize
    );

    // The same split into the entries alone (not interned) and the index over them.
    let before = rss();
    let entries: Vec<Arc<Entry>> = (0..N).map(|i| Arc::new(entry(i))).collect();
    let alone = rss().saturating_sub(before);
    let mut index = EntryIndex::new();
    let before_index = rss();
    for e in &entries {
        index.upsert(e.clone());
    }
    let index_only = rss().saturating_sub(before_index);
    println!(
        "split: the entries alone (selectors not shared) {} bytes per entry; the index over \
         them {} bytes per entry",
        alone / N as usize,
        index_only / N as usize
    );
    drop(index);
    drop(entries);
    println!(
        "size_of: Entry {} bytes (SpiffeId {}, Option<Duration> {}, Selector {}, EntryId {})",
        std::mem::size_of::<Entry>(),
        std::mem::size_of::<spiffed_core::SpiffeId>(),
        std::mem::size_of::<Option<std::time::Duration>>(),
        std::mem::size_of::<spiffed_core::Selector>(),
        std::mem::size_of::<EntryId>()
    );

    // One upsert and one removal at 100,000 entries, averaged.
    let rounds = 10_000u32;
    let start = Instant::now();
    for i in 0..rounds {
        black_box(publisher.apply([entry(N + i)], []));
    }
    let upsert = start.elapsed() / rounds;
    let start = Instant::now();
    for i in 0..rounds {
        black_box(publisher.apply([], [EntryId::new(format!("entry-{:032x}", N + i))]));
    }
    let remove = start.elapsed() / rounds;
    println!(
        "apply one upsert: {upsert:?}; apply one removal: {remove:?} (each includes parsing one \
         entry)"
    );
    black_box(publisher);
}
