//! The store's schema, versioned with `PRAGMA user_version`.
//!
//! `MIGRATIONS[i]` takes the database from version `i` to version `i + 1`. Version 0 is an empty
//! file. A released migration is never edited: a later schema appends a new one.

/// Version 1, the first schema.
///
/// `selectors` holds the entry's selectors in canonical form (sorted, without duplicates,
/// joined with `'\n'`, which no selector may contain), so `UNIQUE(spiffe_id, selectors)` lets
/// the database itself refuse an exact duplicate. `dns_names` is `'\n'`-joined too. Durations
/// and times are whole milliseconds (times since the Unix epoch).
const MIGRATION_1: &str = "
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

/// Every migration, in order; the schema version this code writes is its length.
pub(super) const MIGRATIONS: &[&str] = &[MIGRATION_1];

/// The newest schema version this code knows.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;
