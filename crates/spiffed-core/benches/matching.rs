//! Selector matching over 10,000 entries, and one published change at 100,000.
//!
//! `cargo bench -p spiffed-core --bench matching`
#![allow(missing_docs, clippy::unwrap_used, reason = "benchmark")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use spiffed_core::{Entry, EntryId, EntryIndex, EntryPublisher, Selectors};

fn set(n: u32) -> EntryIndex {
    let entries: Vec<Arc<Entry>> = (0..n)
        .map(|i| {
            // Realistic shape: every entry keys on a uid (1,000 distinct) and half add a path.
            let mut selectors = vec![format!("unix:uid:{}", 1000 + i % 1000).parse().unwrap()];
            if i % 2 == 0 {
                selectors.push(format!("unix:path:/usr/bin/app{i}").parse().unwrap());
            }
            selectors.sort();
            Arc::new(Entry {
                id: EntryId::new(format!("entry-{i:08}")),
                spiffe_id: format!("spiffe://example.org/app{i}").parse().unwrap(),
                selectors,
                x509_svid_ttl: None,
                jwt_svid_ttl: None,
                hint: None,
                dns_names: vec![],
                federates_with: Vec::new(),
                admin: false,
                downstream: false,
            })
        })
        .collect();
    let mut index = EntryIndex::new();
    for e in entries {
        index.upsert(e);
    }
    index
}

fn caller(uid: u32, path: &str) -> Selectors {
    [
        format!("unix:uid:{uid}"),
        format!("unix:gid:{uid}"),
        format!("unix:user:u{uid}"),
        format!("unix:path:{path}"),
        "unix:supplementary_gid:27".to_owned(),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn bench(c: &mut Criterion) {
    let set = set(10_000);
    let hit = caller(1004, "/usr/bin/app4");
    let miss = caller(99_999, "/bin/none");
    c.bench_function("match_10k_entries_hit", |b| {
        b.iter(|| black_box(set.matching(black_box(&hit))));
    });
    c.bench_function("match_10k_entries_miss", |b| {
        b.iter(|| black_box(set.matching(black_box(&miss))));
    });
    c.bench_function("index_10k_entries", |b| {
        let entries: Vec<_> = set.iter().cloned().collect();
        b.iter(|| {
            let mut index = EntryIndex::new();
            for e in &entries {
                index.upsert(e.clone());
            }
            black_box(index)
        });
    });
    c.bench_function("update_one_of_10k_entries", |b| {
        let mut index = self::set(10_000);
        let e = index.iter().next().cloned().unwrap();
        b.iter(|| black_box(index.upsert(e.clone())));
    });
}

/// `EntryPublisher::apply` of one entry (an admin create, then its delete) with 100,000 entries
/// live: must cost microseconds, not a rebuild.
fn apply_at_100k(c: &mut Criterion) {
    let publisher = EntryPublisher::new(set(100_000).iter().map(|e| (**e).clone()));
    let extra = Entry {
        id: EntryId::new("entry-ffffffffffffffffffffffffffffffff"),
        spiffe_id: "spiffe://example.org/extra".parse().unwrap(),
        selectors: vec![
            "unix:path:/usr/bin/extra".parse().unwrap(),
            "unix:uid:1004".parse().unwrap(),
        ],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        hint: None,
        dns_names: vec![],
        federates_with: Vec::new(),
        admin: false,
        downstream: false,
    };
    c.bench_function("apply_create_then_delete_one_at_100k_entries", |b| {
        b.iter(|| {
            black_box(publisher.apply([extra.clone()], []));
            black_box(publisher.apply([], [extra.id.clone()]));
        });
    });
}

criterion_group!(benches, bench, apply_at_100k);
criterion_main!(benches);
