//! The store's schema, versioned with `PRAGMA user_version`.
//!
//! `MIGRATIONS[i]` takes the database from version `i` to version `i + 1`. Version 0 is an empty
//! file. A released migration is never edited: a later schema appends a new one.

/// Version 1, the first schema (spiffed 0.1).
///
/// `selectors` holds the entry's selectors in canonical form (sorted, without duplicates,
/// joined with `'\n'`, which no selector may contain), so `UNIQUE(spiffe_id, selectors)` lets
/// the database itself refuse an exact duplicate. `dns_names` is `'\n'`-joined too. Durations
/// and times are whole milliseconds (times since the Unix epoch).
pub(super) const MIGRATION_1: &str = "
CREATE TABLE entries (
    id TEXT PRIMARY KEY NOT NULL,
    spiffe_id TEXT NOT NULL,
    selectors TEXT NOT NULL,
    x509_svid_ttl_ms INTEGER NULL,
    jwt_svid_ttl_ms INTEGER NULL,
    hint TEXT NULL,
    dns_names TEXT NOT NULL,
    admin INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    UNIQUE (spiffe_id, selectors)
);
";

/// Version 2: one row per (selector, entry), so that listing by selector pages through an index
/// (`WHERE selector = ? AND entry_id > ? ORDER BY entry_id LIMIT ?`) instead of scanning every
/// entry. The store writes these rows with the entry, in the same transaction; deleting an entry
/// deletes its rows (`ON DELETE CASCADE`; the store turns `foreign_keys` on). Listing by SPIFFE ID
/// pages through `entries_by_spiffe_id` in id order the same way. Existing entries
/// get their rows here, by splitting their canonical `'\n'`-joined selectors.
const MIGRATION_2: &str = "
CREATE TABLE entry_selectors (
    selector TEXT NOT NULL,
    entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    PRIMARY KEY (selector, entry_id)
) WITHOUT ROWID;
CREATE INDEX entry_selectors_by_entry ON entry_selectors (entry_id);
CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id, id);
INSERT INTO entry_selectors (selector, entry_id)
WITH RECURSIVE split (entry_id, selector, rest) AS (
    SELECT id, '', selectors || char(10) FROM entries
    UNION ALL
    SELECT entry_id,
           substr(rest, 1, instr(rest, char(10)) - 1),
           substr(rest, instr(rest, char(10)) + 1)
    FROM split WHERE rest <> ''
)
SELECT DISTINCT selector, entry_id FROM split WHERE selector <> '';
";

/// Version 3: entries' `federates_with` (trust domain names, `'\n'`-joined, sorted, without
/// duplicates; empty for none), and the federated trust bundles set through the admin API
/// (`spiffed bundle set`): one row per foreign trust domain, its document in the SPIFFE bundle
/// format as the agent re-wrote it after checking it, and where the operator took it from.
const MIGRATION_3: &str = "
ALTER TABLE entries ADD COLUMN federates_with TEXT NOT NULL DEFAULT '';
CREATE TABLE federated_bundles (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    document TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
";

/// Every migration, in order; the schema version this code writes is its length.
pub(super) const MIGRATIONS: &[&str] = &[MIGRATION_1, MIGRATION_2, MIGRATION_3];

/// The newest schema version this code knows.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;
