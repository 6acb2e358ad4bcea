//! Registration entries kept in a SQLite file, for entries created through the admin API.
//!
//! The file is opened in WAL mode with `synchronous=FULL`, so a write that has returned survives
//! `kill -9` and power loss. On open the store runs `PRAGMA quick_check` and refuses a damaged
//! file, a file that is not a SQLite database, or one written by a newer spiffed: it never starts
//! empty in their place. The schema is versioned with `PRAGMA user_version` (see `schema.rs`).
//!
//! Every call is synchronous and takes a lock on the one connection; async callers should use
//! `spawn_blocking`. The store checks only what it must to store an entry faithfully: callers
//! check entries first ([`EntrySources`](crate::EntrySources) runs every spec through
//! [`Entry::checked`]). Listing pages by key ([`Store::page`]), through an index for each
//! filter, so one page costs the same with 100 entries or 100,000.
//!
//! ```
//! use spiffed_entries::store::{EntrySpec, Store};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("spiffed-store-doc-{}", std::process::id()));
//! let store = Store::open(&dir.join("entries.db"))?;
//! let spec = EntrySpec {
//!     spiffe_id: "spiffe://example.org/web".parse()?,
//!     selectors: vec!["unix:uid:1000".parse()?],
//!     x509_svid_ttl: None,
//!     jwt_svid_ttl: None,
//!     hint: None,
//!     dns_names: vec![],
//!     admin: false,
//!     federates_with: vec![],
//! };
//! let created = store.create(vec![spec])?.remove(0)?;
//! assert_eq!(created.revision, 1);
//! assert_eq!(store.get(&created.entry.id)?, Some(created));
//! # drop(store);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

mod schema;

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use spiffed_core::{Entry, EntryId, Selector, SpiffeId, TrustDomain};

/// How long a call waits for another process's write lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns of `entries`, in the order [`decode`] reads them.
const COLUMNS: &str = "id, spiffe_id, selectors, x509_svid_ttl_ms, jwt_svid_ttl_ms, hint, \
                       dns_names, admin, created_at_ms, updated_at_ms, revision, federates_with";

/// [`COLUMNS`] of the table aliased `e`.
fn e_columns() -> String {
    COLUMNS
        .split(", ")
        .map(|c| format!("e.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which entries a [`Store::page`] returns (every entry when empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only entries granting this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with this selector among theirs.
    pub selector: Option<Selector>,
}

impl Filter {
    /// Whether `entry` passes (the same test the store's queries make).
    pub fn accepts(&self, entry: &Entry) -> bool {
        self.spiffe_id
            .as_ref()
            .is_none_or(|id| *id == entry.spiffe_id)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| entry.selectors.contains(s))
    }
}

/// One stored entry with its bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    /// The entry itself; its id starts with `entry-`.
    pub entry: Entry,
    /// Whether callers matching this entry may use the admin API.
    pub admin: bool,
    /// When the entry was created (millisecond precision).
    pub created_at: SystemTime,
    /// When the entry was last written (millisecond precision).
    pub updated_at: SystemTime,
    /// Starts at 1 and grows by one with every update; updates must name the revision they saw.
    pub revision: u64,
}

/// What an operator submits: an entry without its id or bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntrySpec {
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// The selectors a caller must all have; the store sorts them and removes duplicates.
    pub selectors: Vec<Selector>,
    /// Per-entry X.509-SVID lifetime, a whole number of milliseconds.
    pub x509_svid_ttl: Option<Duration>,
    /// Per-entry JWT-SVID lifetime, a whole number of milliseconds.
    pub jwt_svid_ttl: Option<Duration>,
    /// Optional hint sent with the SVID.
    pub hint: Option<String>,
    /// DNS names to put in the X.509-SVID's SAN.
    pub dns_names: Vec<String>,
    /// Whether callers matching this entry may use the admin API.
    pub admin: bool,
    /// Trust domains whose federated bundles the entry's workloads receive; the store sorts
    /// them and removes duplicates.
    pub federates_with: Vec<TrustDomain>,
}

/// A federated trust domain's bundle kept in the store (set with `spiffed bundle set`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBundle {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle in the SPIFFE bundle format (JWKS), as the agent wrote it after checking it.
    pub document: String,
    /// Where the operator took it from (a file path, or `stdin`), for `bundle list`.
    pub source: String,
    /// When the trust domain's bundle was first stored (millisecond precision).
    pub created_at: SystemTime,
    /// When it was last replaced (millisecond precision).
    pub updated_at: SystemTime,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file or its directory could not be created or opened.
    #[error(
        "cannot create entry store {}: {source}; check that the agent may write to its directory",
        .path.display()
    )]
    Create {
        /// The store file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not open or set up the file.
    #[error(
        "cannot open entry store {}: {source}; check the file's permissions, or restore it from \
         a backup",
        .path.display()
    )]
    Open {
        /// The store file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not a SQLite database, fails its integrity check, or holds a row that does
    /// not parse.
    #[error(
        "entry store {} is damaged: {why}; stop the agent and restore the file from a backup \
         (spiffed will not start with an empty store in its place)",
        .path.display()
    )]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What is wrong, naming the entry id when one row is at fault.
        why: String,
    },
    /// The file was written by a newer spiffed with a schema this code does not know.
    #[error(
        "entry store {} has schema version {found}, but this spiffed knows only up to version \
         {known}; run the newer spiffed that wrote it, or restore a backup made by this version",
        .path.display()
    )]
    TooNew {
        /// The store file.
        path: PathBuf,
        /// The file's schema version.
        found: i64,
        /// The newest version this code knows.
        known: i64,
    },
    /// Upgrading the schema failed; the file is left as it was.
    #[error(
        "cannot upgrade entry store {} to schema version {version}: {source}; the file is \
         unchanged, restore it from a backup if this persists",
        .path.display()
    )]
    Migrate {
        /// The store file.
        path: PathBuf,
        /// The version the failed migration leads to.
        version: i64,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file system does not support write-ahead logging.
    #[error(
        "entry store {} cannot use write-ahead logging (journal mode is {mode:?}); put it on a \
         local file system",
        .path.display()
    )]
    NoWal {
        /// The store file.
        path: PathBuf,
        /// The journal mode SQLite reported instead of `wal`.
        mode: String,
    },
    /// A database operation failed (e.g. the disk is full or another process holds the lock).
    #[error("cannot {op} in entry store {}: {source}", .path.display())]
    Db {
        /// The store file.
        path: PathBuf,
        /// What was being done, e.g. "create an entry".
        op: &'static str,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// An entry with the same SPIFFE ID and the same selectors already exists.
    #[error(
        "an entry for {spiffe_id} with the same selectors already exists: {existing}; change \
         that entry instead"
    )]
    Duplicate {
        /// The SPIFFE ID of both entries.
        spiffe_id: SpiffeId,
        /// The entry that is already there.
        existing: EntryId,
    },
    /// No entry has this id.
    #[error("entry {0} not found")]
    NotFound(EntryId),
    /// The entry changed since the caller read it.
    #[error(
        "entry {id} was changed by someone else (revision {current}, you had {expected}): show \
         it again and retry"
    )]
    Conflict {
        /// The entry.
        id: EntryId,
        /// The revision the caller named.
        expected: u64,
        /// The entry's revision now.
        current: u64,
    },
    /// A value of the submitted entry cannot be stored and read back unchanged.
    #[error("entry field {field} cannot be stored: {why}")]
    Unstorable {
        /// The field, e.g. `x509_svid_ttl`.
        field: &'static str,
        /// Why, e.g. "it must be a whole number of milliseconds".
        why: &'static str,
    },
    /// The system's random number generator failed while making an entry id.
    #[error("cannot generate a random entry id: the system random number generator failed")]
    Random,
}

/// Registration entries in a SQLite file.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    rng: SystemRandom,
}

impl Store {
    /// Opens the store at `path`, creating it (mode 0600, and its directory with mode 0700) if
    /// missing, checking its integrity and upgrading its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        create_file(&path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(|e| open_err(&path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| open_err(&path, e))?;

        // Read-only checks first: a file we refuse is left exactly as it was.
        let mut problems = Vec::new();
        conn.pragma_query(None, "quick_check", |row| {
            problems.push(row.get::<_, String>(0)?);
            Ok(())
        })
        .map_err(|e| open_err(&path, e))?;
        if problems != ["ok"] {
            return Err(StoreError::Corrupt {
                why: format!("the integrity check failed: {}", problems.join("; ")),
                path,
            });
        }
        let found = user_version(&conn).map_err(|e| open_err(&path, e))?;
        if found > schema::VERSION {
            return Err(StoreError::TooNew {
                path,
                found,
                known: schema::VERSION,
            });
        }

        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| open_err(&path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| open_err(&path, e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| open_err(&path, e))?;
        migrate(&mut conn, &path)?;

        Ok(Self {
            conn: Mutex::new(conn),
            path,
            rng: SystemRandom::new(),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry, ordered by id, in one vector: for tests and tools. The agent loads with
    /// [`scan`](Self::scan) and lists with [`page`](Self::page), which never hold every entry.
    pub fn list(&self) -> Result<Vec<StoredEntry>, StoreError> {
        let conn = self.lock();
        let op = "list entries";
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM entries ORDER BY id"))
            .map_err(|e| self.db(op, e))?;
        let mut rows = stmt.query([]).map_err(|e| self.db(op, e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.db(op, e))? {
            out.push(self.decode(row)?);
        }
        Ok(out)
    }

    /// The entry with this id, if any.
    pub fn get(&self, id: &EntryId) -> Result<Option<StoredEntry>, StoreError> {
        let conn = self.lock();
        self.get_in(&conn, id, "read an entry")
    }

    /// Up to `limit` entries with ids after `after` (from the first when `None`), in id order,
    /// that pass `filter`. Pages through an index whatever the filter, so one page costs
    /// O(`limit`) rows read, not O(entries): callers list everything by passing the last id of
    /// each page as the next `after`.
    pub fn page(
        &self,
        after: Option<&EntryId>,
        limit: usize,
        filter: &Filter,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let op = "list entries";
        let after = after.map_or("", EntryId::as_str);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let spiffe_id = filter.spiffe_id.as_ref().map(ToString::to_string);
        let selector = filter.selector.as_ref().map(Selector::as_str);
        let conn = self.lock();
        let cols = e_columns();
        let (sql, params): (String, Vec<&dyn rusqlite::ToSql>) = match (&selector, &spiffe_id) {
            (Some(sel), _) => (
                format!(
                    "SELECT {cols} FROM entry_selectors s JOIN entries e ON e.id = s.entry_id \
                     WHERE s.selector = ?1 AND s.entry_id > ?2 AND (?3 IS NULL OR e.spiffe_id = ?3) \
                     ORDER BY s.entry_id LIMIT ?4"
                ),
                vec![sel, &after, &spiffe_id, &limit],
            ),
            (None, Some(id)) => (
                format!(
                    "SELECT {cols} FROM entries e INDEXED BY entries_by_spiffe_id \
                     WHERE e.spiffe_id = ?1 AND e.id > ?2 ORDER BY e.id LIMIT ?3"
                ),
                vec![id, &after, &limit],
            ),
            (None, None) => (
                format!("SELECT {cols} FROM entries e WHERE e.id > ?1 ORDER BY e.id LIMIT ?2"),
                vec![&after, &limit],
            ),
        };
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.db(op, e))?;
        let mut rows = stmt.query(params.as_slice()).map_err(|e| self.db(op, e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.db(op, e))? {
            out.push(self.decode(row)?);
        }
        Ok(out)
    }

    /// Calls `f` with every entry in id order, one row at a time (start-up loads the store
    /// through this without holding a second copy of every entry). Holds the connection for
    /// the whole scan.
    pub fn scan(&self, mut f: impl FnMut(StoredEntry)) -> Result<(), StoreError> {
        let op = "read entries";
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM entries ORDER BY id"))
            .map_err(|e| self.db(op, e))?;
        let mut rows = stmt.query([]).map_err(|e| self.db(op, e))?;
        while let Some(row) = rows.next().map_err(|e| self.db(op, e))? {
            f(self.decode(row)?);
        }
        Ok(())
    }

    /// Creates one entry per spec, each in its own transaction, and returns one result per
    /// spec in order. Each success is durably committed before this returns; a spec that
    /// duplicates an existing entry (same SPIFFE ID, same selectors) gets
    /// [`StoreError::Duplicate`] and does not stop the others. The outer error is reserved for
    /// failures that prevent the batch from starting; it is not returned once an entry may have
    /// been written.
    pub fn create(
        &self,
        specs: Vec<EntrySpec>,
    ) -> Result<Vec<Result<StoredEntry, StoreError>>, StoreError> {
        let mut conn = self.lock();
        Ok(specs
            .into_iter()
            .map(|spec| self.create_one(&mut conn, spec))
            .collect())
    }

    /// Replaces the entry `id` with `spec` if its revision is still `expected_revision`, bumping
    /// the revision and `updated_at` and keeping `created_at`.
    pub fn update(
        &self,
        id: &EntryId,
        expected_revision: u64,
        spec: EntrySpec,
    ) -> Result<StoredEntry, StoreError> {
        let op = "update an entry";
        let row = Encoded::new(&spec)?;
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.db(op, e))?;
        let current: Option<i64> = tx
            .prepare_cached("SELECT revision FROM entries WHERE id = ?1")
            .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
            .map_err(|e| self.db(op, e))?;
        let Some(current) = current else {
            return Err(StoreError::NotFound(id.clone()));
        };
        let current =
            u64::try_from(current).map_err(|_| self.corrupt_row(id, "negative revision"))?;
        if current != expected_revision {
            return Err(StoreError::Conflict {
                id: id.clone(),
                expected: expected_revision,
                current,
            });
        }
        self.check_duplicate(&tx, &spec.spiffe_id, &row, Some(id), op)?;
        let revision = current
            .checked_add(1)
            .and_then(|r| i64::try_from(r).ok())
            .ok_or_else(|| self.corrupt_row(id, "revision out of range"))?;
        tx.prepare_cached(
            "UPDATE entries SET spiffe_id = ?2, selectors = ?3, x509_svid_ttl_ms = ?4, \
             jwt_svid_ttl_ms = ?5, hint = ?6, dns_names = ?7, admin = ?8, updated_at_ms = ?9, \
             revision = ?10, federates_with = ?11 WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                id.as_str(),
                row.spiffe_id,
                row.selectors,
                row.x509_svid_ttl_ms,
                row.jwt_svid_ttl_ms,
                spec.hint,
                row.dns_names,
                spec.admin,
                now_ms(),
                revision,
                row.federates_with,
            ])
        })
        .map_err(|e| self.db(op, e))?;
        self.write_selectors(&tx, id, &row, op)?;
        // Read back inside the transaction: what we return is what the file holds.
        let stored = self
            .get_in(&tx, id, op)?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        tx.commit().map_err(|e| self.db(op, e))?;
        Ok(stored)
    }

    /// Deletes each entry, returning one result per id in order ([`StoreError::NotFound`] for
    /// an id with no entry). Each deletion is durably committed before this returns.
    pub fn delete(&self, ids: &[EntryId]) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let conn = self.lock();
        Ok(ids
            .iter()
            .map(|id| {
                let n = conn
                    .prepare_cached("DELETE FROM entries WHERE id = ?1")
                    .and_then(|mut s| s.execute([id.as_str()]))
                    .map_err(|e| self.db("delete an entry", e))?;
                if n == 0 {
                    Err(StoreError::NotFound(id.clone()))
                } else {
                    Ok(())
                }
            })
            .collect())
    }

    /// Every stored federated bundle, ordered by trust domain.
    pub fn bundles(&self) -> Result<Vec<StoredBundle>, StoreError> {
        let op = "list federated bundles";
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT trust_domain, document, source, created_at_ms, updated_at_ms \
                 FROM federated_bundles ORDER BY trust_domain",
            )
            .map_err(|e| self.db(op, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(|e| self.db(op, e))?;
        let mut out = Vec::new();
        for row in rows {
            let (td, document, source, created, updated) = row.map_err(|e| self.db(op, e))?;
            let trust_domain = TrustDomain::new(&td).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                why: format!("a federated bundle's trust domain {td:?} is not valid: {e}"),
            })?;
            out.push(StoredBundle {
                trust_domain,
                document,
                source,
                created_at: ms_time(created),
                updated_at: ms_time(updated),
            });
        }
        Ok(out)
    }

    /// Stores (adds or replaces) the federated bundle of `trust_domain`, durably committed
    /// before this returns; a replacement keeps `created_at`.
    pub fn put_bundle(
        &self,
        trust_domain: &TrustDomain,
        document: &str,
        source: &str,
    ) -> Result<StoredBundle, StoreError> {
        let op = "store a federated bundle";
        let now = now_ms();
        let conn = self.lock();
        conn.prepare_cached(
            "INSERT INTO federated_bundles \
             (trust_domain, document, source, created_at_ms, updated_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?4) \
             ON CONFLICT (trust_domain) DO UPDATE SET document = excluded.document, \
             source = excluded.source, updated_at_ms = excluded.updated_at_ms",
        )
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                trust_domain.as_str(),
                document,
                source,
                now
            ])
        })
        .map_err(|e| self.db(op, e))?;
        let created: i64 = conn
            .prepare_cached("SELECT created_at_ms FROM federated_bundles WHERE trust_domain = ?1")
            .and_then(|mut s| s.query_row([trust_domain.as_str()], |r| r.get(0)))
            .map_err(|e| self.db(op, e))?;
        Ok(StoredBundle {
            trust_domain: trust_domain.clone(),
            document: document.to_owned(),
            source: source.to_owned(),
            created_at: ms_time(created),
            updated_at: ms_time(now),
        })
    }

    /// Deletes the federated bundle of `trust_domain`; false when there was none.
    pub fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .prepare_cached("DELETE FROM federated_bundles WHERE trust_domain = ?1")
            .and_then(|mut s| s.execute([trust_domain.as_str()]))
            .map_err(|e| self.db("delete a federated bundle", e))?;
        Ok(n > 0)
    }

    fn create_one(
        &self,
        conn: &mut Connection,
        spec: EntrySpec,
    ) -> Result<StoredEntry, StoreError> {
        let op = "create an entry";
        let row = Encoded::new(&spec)?;
        let id = self.new_id()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.db(op, e))?;
        self.check_duplicate(&tx, &spec.spiffe_id, &row, None, op)?;
        let now = now_ms();
        tx.prepare_cached(&format!(
            "INSERT INTO entries ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        ))
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                id.as_str(),
                row.spiffe_id,
                row.selectors,
                row.x509_svid_ttl_ms,
                row.jwt_svid_ttl_ms,
                spec.hint,
                row.dns_names,
                spec.admin,
                now,
                now,
                1_i64,
                row.federates_with,
            ])
        })
        .map_err(|e| self.db(op, e))?;
        self.write_selectors(&tx, &id, &row, op)?;
        let stored = self
            .get_in(&tx, &id, op)?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        tx.commit().map_err(|e| self.db(op, e))?;
        Ok(stored)
    }

    /// Makes the `entry_selectors` rows of `id` its selectors in `row` (inside the caller's
    /// transaction).
    fn write_selectors(
        &self,
        conn: &Connection,
        id: &EntryId,
        row: &Encoded,
        op: &'static str,
    ) -> Result<(), StoreError> {
        conn.prepare_cached("DELETE FROM entry_selectors WHERE entry_id = ?1")
            .and_then(|mut s| s.execute([id.as_str()]))
            .map_err(|e| self.db(op, e))?;
        let mut insert = conn
            .prepare_cached("INSERT INTO entry_selectors (selector, entry_id) VALUES (?1, ?2)")
            .map_err(|e| self.db(op, e))?;
        for selector in &row.selector_list {
            insert
                .execute([selector.as_str(), id.as_str()])
                .map_err(|e| self.db(op, e))?;
        }
        Ok(())
    }

    /// Refuses `spec` if another entry (other than `except`) has its SPIFFE ID and selectors.
    fn check_duplicate(
        &self,
        conn: &Connection,
        spiffe_id: &SpiffeId,
        row: &Encoded,
        except: Option<&EntryId>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        let existing: Option<String> = conn
            .prepare_cached(
                "SELECT id FROM entries WHERE spiffe_id = ?1 AND selectors = ?2 \
                 AND (?3 IS NULL OR id <> ?3) LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(
                    rusqlite::params![row.spiffe_id, row.selectors, except.map(EntryId::as_str)],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(|e| self.db(op, e))?;
        match existing {
            Some(existing) => Err(StoreError::Duplicate {
                spiffe_id: spiffe_id.clone(),
                existing: EntryId::new(existing),
            }),
            None => Ok(()),
        }
    }

    fn get_in(
        &self,
        conn: &Connection,
        id: &EntryId,
        op: &'static str,
    ) -> Result<Option<StoredEntry>, StoreError> {
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM entries WHERE id = ?1"))
            .map_err(|e| self.db(op, e))?;
        let mut rows = stmt.query([id.as_str()]).map_err(|e| self.db(op, e))?;
        match rows.next().map_err(|e| self.db(op, e))? {
            Some(row) => self.decode(row).map(Some),
            None => Ok(None),
        }
    }

    /// A new id: `entry-` and 32 lowercase hex digits (128 random bits).
    fn new_id(&self) -> Result<EntryId, StoreError> {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes).map_err(|_| StoreError::Random)?;
        let mut id = String::with_capacity(6 + 32);
        id.push_str("entry-");
        for b in bytes {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Ok(EntryId::new(id))
    }

    /// The connection. A panic while it was held rolled back any open transaction (the
    /// transaction's drop does that), so a poisoned lock still guards a usable connection.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn decode(&self, row: &Row<'_>) -> Result<StoredEntry, StoreError> {
        decode(row).map_err(|why| StoreError::Corrupt {
            path: self.path.clone(),
            why,
        })
    }

    fn corrupt_row(&self, id: &EntryId, what: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            why: format!("entry {id:?} has a {what}"),
        }
    }

    fn db(&self, op: &'static str, source: rusqlite::Error) -> StoreError {
        match source.sqlite_error_code() {
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt {
                path: self.path.clone(),
                why: source.to_string(),
            },
            _ => StoreError::Db {
                path: self.path.clone(),
                op,
                source,
            },
        }
    }
}

/// Creates the file (mode 0600) and its directory (mode 0700) if missing, before SQLite would
/// create it with its default, wider mode.
fn create_file(path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    Ok(())
}

fn open_err(path: &Path, source: rusqlite::Error) -> StoreError {
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "it is not a SQLite database".to_owned(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            why: source.to_string(),
        },
        _ => StoreError::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Applies the migrations the file lacks, all in one transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| open_err(path, e))?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let found = user_version(&tx).map_err(|e| open_err(path, e))?;
    if found > schema::VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known: schema::VERSION,
        });
    }
    if found == schema::VERSION {
        return Ok(());
    }
    for (version, sql) in (1..)
        .zip(schema::MIGRATIONS)
        .skip_while(|(v, _)| *v <= found)
    {
        let fail = |source| StoreError::Migrate {
            path: path.to_path_buf(),
            version,
            source,
        };
        tx.execute_batch(sql).map_err(fail)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(fail)?;
    }
    tx.commit().map_err(|source| StoreError::Migrate {
        path: path.to_path_buf(),
        version: schema::VERSION,
        source,
    })
}

/// The columns of a spec that need encoding.
struct Encoded {
    spiffe_id: String,
    /// Canonical: sorted, without duplicates.
    selector_list: Vec<String>,
    selectors: String,
    x509_svid_ttl_ms: Option<i64>,
    jwt_svid_ttl_ms: Option<i64>,
    dns_names: String,
    /// Canonical: sorted, without duplicates, `'\n'`-joined.
    federates_with: String,
}

impl Encoded {
    fn new(spec: &EntrySpec) -> Result<Self, StoreError> {
        let mut selectors: Vec<String> = spec.selectors.iter().map(ToString::to_string).collect();
        selectors.sort_unstable();
        selectors.dedup();
        for name in &spec.dns_names {
            if name.is_empty() || name.contains('\n') {
                return Err(StoreError::Unstorable {
                    field: "dns_names",
                    why: "a name is empty or contains a line break",
                });
            }
        }
        Ok(Self {
            spiffe_id: spec.spiffe_id.to_string(),
            selectors: selectors.join("\n"),
            selector_list: selectors,
            x509_svid_ttl_ms: ttl_ms(spec.x509_svid_ttl, "x509_svid_ttl")?,
            jwt_svid_ttl_ms: ttl_ms(spec.jwt_svid_ttl, "jwt_svid_ttl")?,
            dns_names: spec.dns_names.join("\n"),
            federates_with: {
                let mut tds: Vec<&str> = spec
                    .federates_with
                    .iter()
                    .map(TrustDomain::as_str)
                    .collect();
                tds.sort_unstable();
                tds.dedup();
                tds.join("\n")
            },
        })
    }
}

fn ttl_ms(ttl: Option<Duration>, field: &'static str) -> Result<Option<i64>, StoreError> {
    let Some(ttl) = ttl else {
        return Ok(None);
    };
    if ttl.subsec_nanos() % 1_000_000 != 0 {
        return Err(StoreError::Unstorable {
            field,
            why: "it must be a whole number of milliseconds",
        });
    }
    i64::try_from(ttl.as_millis())
        .map(Some)
        .map_err(|_| StoreError::Unstorable {
            field,
            why: "it is too long",
        })
}

/// A time stored as milliseconds since the Unix epoch (the epoch for a negative one).
fn ms_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Milliseconds since the Unix epoch (0 for a clock set before 1970).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Reads one row of `entries` (selected as [`COLUMNS`]); never panics, whatever the bytes.
fn decode(row: &Row<'_>) -> Result<StoredEntry, String> {
    let id = match row.get_ref(0) {
        Ok(ValueRef::Text(b)) => match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(_) => {
                return Err(format!(
                    "an entry id is not valid UTF-8: {:?}",
                    String::from_utf8_lossy(b)
                ));
            }
        },
        Ok(other) => {
            return Err(format!(
                "an entry id is not text but {:?}",
                other.data_type()
            ));
        }
        Err(e) => return Err(format!("cannot read an entry id: {e}")),
    };
    let bad = |field: &str, why: &dyn std::fmt::Display| format!("entry {id:?}: {field} {why}");
    let value = |i: usize, field: &str| row.get_ref(i).map_err(|e| bad(field, &e));
    let text = |i: usize, field: &str| match value(i, field)? {
        ValueRef::Text(b) => std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| bad(field, &"is not valid UTF-8")),
        other => Err(bad(
            field,
            &format_args!("is {:?}, not text", other.data_type()),
        )),
    };
    let int = |i: usize, field: &str| match value(i, field)? {
        ValueRef::Integer(n) => Ok(Some(n)),
        ValueRef::Null => Ok(None),
        other => Err(bad(
            field,
            &format_args!("is {:?}, not an integer", other.data_type()),
        )),
    };
    let required = |i: usize, field: &str| int(i, field)?.ok_or_else(|| bad(field, &"is missing"));
    let ttl = |i: usize, field: &str| {
        int(i, field)?
            .map(|ms| {
                u64::try_from(ms)
                    .map(Duration::from_millis)
                    .map_err(|_| bad(field, &"is negative"))
            })
            .transpose()
    };
    let time = |i: usize, field: &str| {
        let ms = required(i, field)?;
        u64::try_from(ms)
            .ok()
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            .ok_or_else(|| bad(field, &"is out of range"))
    };

    let spiffe_id: SpiffeId = text(1, "spiffe_id")?
        .parse()
        .map_err(|e| bad("spiffe_id", &e))?;
    let selectors_text = text(2, "selectors")?;
    let selectors = if selectors_text.is_empty() {
        Vec::new()
    } else {
        selectors_text
            .split('\n')
            .map(|s| s.parse::<Selector>().map_err(|e| bad("selectors", &e)))
            .collect::<Result<Vec<_>, _>>()?
    };
    let hint = match value(5, "hint")? {
        ValueRef::Null => None,
        _ => Some(text(5, "hint")?),
    };
    let dns_text = text(6, "dns_names")?;
    let dns_names = if dns_text.is_empty() {
        Vec::new()
    } else {
        dns_text.split('\n').map(str::to_owned).collect()
    };
    let admin = match required(7, "admin")? {
        0 => false,
        1 => true,
        _ => return Err(bad("admin", &"is neither 0 nor 1")),
    };
    let revision =
        u64::try_from(required(10, "revision")?).map_err(|_| bad("revision", &"is negative"))?;
    let federates_text = text(11, "federates_with")?;
    let federates_with = if federates_text.is_empty() {
        Vec::new()
    } else {
        federates_text
            .split('\n')
            .map(|t| TrustDomain::new(t).map_err(|e| bad("federates_with", &e)))
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(StoredEntry {
        entry: Entry {
            spiffe_id,
            selectors,
            x509_svid_ttl: ttl(3, "x509_svid_ttl_ms")?,
            jwt_svid_ttl: ttl(4, "jwt_svid_ttl_ms")?,
            hint,
            dns_names,
            id: EntryId::new(id.clone()),
            federates_with,
            admin: false,
            downstream: false,
        },
        admin,
        created_at: time(8, "created_at_ms")?,
        updated_at: time(9, "updated_at_ms")?,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(id: &str, sels: &[&str]) -> EntrySpec {
        EntrySpec {
            spiffe_id: id.parse().unwrap(),
            selectors: sels.iter().map(|s| s.parse().unwrap()).collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            hint: None,
            dns_names: vec![],
            admin: false,
            federates_with: vec![],
        }
    }

    fn temp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("entries.db");
        (dir, path)
    }

    fn created(store: &Store, s: EntrySpec) -> StoredEntry {
        store.create(vec![s]).unwrap().remove(0).unwrap()
    }

    #[test]
    fn round_trips_every_field() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let s = EntrySpec {
            spiffe_id: "spiffe://example.org/web".parse().unwrap(),
            // Unsorted with a duplicate: the store stores the canonical set.
            selectors: vec![
                "unix:uid:1000".parse().unwrap(),
                "systemd:id:web.service".parse().unwrap(),
                "unix:uid:1000".parse().unwrap(),
                "unix:path:/usr/bin/web".parse().unwrap(),
            ],
            x509_svid_ttl: Some(Duration::from_secs(600)),
            jwt_svid_ttl: Some(Duration::from_millis(1500)),
            // Hostile bytes survive unchanged (validation is the caller's job).
            hint: Some("internal\0\u{1b}[31m\n\u{202e}ü".to_owned()),
            dns_names: vec!["web.internal".to_owned(), "*.svc.local".to_owned()],
            admin: true,
            federates_with: vec![
                TrustDomain::new("z.org").unwrap(),
                TrustDomain::new("a.org").unwrap(),
                TrustDomain::new("z.org").unwrap(),
            ],
        };
        let before = SystemTime::now();
        let got = created(&store, s.clone());
        assert!(got.entry.id.as_str().starts_with("entry-"));
        let hex = &got.entry.id.as_str()["entry-".len()..];
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(got.entry.spiffe_id, s.spiffe_id);
        let sels: Vec<String> = got.entry.selectors.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            sels,
            [
                "systemd:id:web.service",
                "unix:path:/usr/bin/web",
                "unix:uid:1000"
            ]
        );
        assert_eq!(got.entry.x509_svid_ttl, s.x509_svid_ttl);
        assert_eq!(got.entry.jwt_svid_ttl, s.jwt_svid_ttl);
        assert_eq!(got.entry.hint, s.hint);
        assert_eq!(got.entry.dns_names, s.dns_names);
        let tds: Vec<&str> = got
            .entry
            .federates_with
            .iter()
            .map(|t| t.as_str())
            .collect();
        assert_eq!(tds, ["a.org", "z.org"]);
        assert!(got.admin);
        assert_eq!(got.revision, 1);
        assert_eq!(got.created_at, got.updated_at);
        let ms = Duration::from_millis(1);
        assert!(got.created_at + ms >= before && got.created_at <= SystemTime::now());
        assert_eq!(store.get(&got.entry.id).unwrap(), Some(got.clone()));
        assert_eq!(store.list().unwrap(), vec![got]);
        assert_eq!(store.get(&EntryId::new("entry-none")).unwrap(), None);
        assert_eq!(store.path(), path);
    }

    #[test]
    fn federated_bundles_are_stored_replaced_and_deleted() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let b = TrustDomain::new("b.org").unwrap();
        let a = TrustDomain::new("a.org").unwrap();
        assert_eq!(store.bundles().unwrap(), vec![]);
        let first = store
            .put_bundle(&b, r#"{"keys":[]}"#, "/tmp/b.json")
            .unwrap();
        store.put_bundle(&a, r#"{"keys":[1]}"#, "stdin").unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let replaced = store.put_bundle(&b, r#"{"keys":[2]}"#, "stdin").unwrap();
        assert_eq!(replaced.created_at, first.created_at);
        assert!(replaced.updated_at > first.updated_at);
        drop(store);
        // Survives a reopen, ordered by trust domain.
        let store = Store::open(&path).unwrap();
        let all = store.bundles().unwrap();
        let got: Vec<(&str, &str, &str)> = all
            .iter()
            .map(|s| {
                (
                    s.trust_domain.as_str(),
                    s.document.as_str(),
                    s.source.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a.org", r#"{"keys":[1]}"#, "stdin"),
                ("b.org", r#"{"keys":[2]}"#, "stdin")
            ]
        );
        assert!(store.delete_bundle(&a).unwrap());
        assert!(!store.delete_bundle(&a).unwrap());
        assert_eq!(store.bundles().unwrap().len(), 1);
    }

    #[test]
    fn unstorable_values_are_refused() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let mut s = spec("spiffe://td/a", &["unix:uid:1"]);
        s.x509_svid_ttl = Some(Duration::from_micros(1500));
        let mut t = spec("spiffe://td/b", &["unix:uid:1"]);
        t.dns_names = vec!["a\nb".to_owned()];
        let mut u = spec("spiffe://td/c", &["unix:uid:1"]);
        u.jwt_svid_ttl = Some(Duration::MAX);
        let got = store.create(vec![s, t, u]).unwrap();
        assert!(
            got.iter()
                .all(|r| matches!(r, Err(StoreError::Unstorable { .. })))
        );
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn file_is_private_and_in_wal_mode() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        created(&store, spec("spiffe://td/a", &["unix:uid:1"]));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let wal = path.with_file_name("entries.db-wal");
        assert_eq!(
            std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let conn = store.lock();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        assert_eq!(user_version(&conn).unwrap(), schema::VERSION);
    }

    #[test]
    fn reopen_keeps_entries() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let a = created(&store, spec("spiffe://td/a", &["unix:uid:1"]));
        let b = created(&store, spec("spiffe://td/b", &["unix:uid:2"]));
        drop(store);
        let store = Store::open(&path).unwrap();
        let mut want = vec![a, b];
        want.sort_by(|x, y| x.entry.id.cmp(&y.entry.id));
        assert_eq!(store.list().unwrap(), want);
    }

    #[test]
    fn duplicate_is_refused_per_entry() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let first = created(&store, spec("spiffe://td/a", &["unix:uid:1", "unix:gid:1"]));
        let got = store
            .create(vec![
                spec("spiffe://td/b", &["unix:uid:1"]),
                // Same set in another order.
                spec("spiffe://td/a", &["unix:gid:1", "unix:uid:1"]),
                // Same ID, other selectors: fine.
                spec("spiffe://td/a", &["unix:uid:1"]),
            ])
            .unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok());
        match &got[1] {
            Err(StoreError::Duplicate {
                spiffe_id,
                existing,
            }) => {
                assert_eq!(spiffe_id.to_string(), "spiffe://td/a");
                assert_eq!(existing, &first.entry.id);
            }
            other => panic!("want Duplicate, got {other:?}"),
        }
        assert!(got[2].is_ok());
        assert_eq!(store.list().unwrap().len(), 3);

        // The database refuses it too, without the store's own check.
        let conn = store.lock();
        let err = conn
            .execute(
                "INSERT INTO entries SELECT 'entry-x', spiffe_id, selectors, x509_svid_ttl_ms, \
                 jwt_svid_ttl_ms, hint, dns_names, admin, created_at_ms, updated_at_ms, \
                 revision, federates_with FROM entries WHERE id = ?1",
                [first.entry.id.as_str()],
            )
            .unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(ErrorCode::ConstraintViolation)
        );
    }

    #[test]
    fn update_checks_revision() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let a = created(&store, spec("spiffe://td/a", &["unix:uid:1"]));
        let id = a.entry.id.clone();
        std::thread::sleep(Duration::from_millis(5));

        let mut s = spec("spiffe://td/a2", &["unix:uid:2"]);
        s.hint = Some("h".to_owned());
        s.admin = true;
        let err = store.update(&id, 7, s.clone()).unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Conflict { id: i, expected: 7, current: 1 } if *i == id
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("changed by someone else"));
        assert_eq!(store.get(&id).unwrap(), Some(a.clone()));

        let b = store.update(&id, 1, s).unwrap();
        assert_eq!(b.revision, 2);
        assert_eq!(b.created_at, a.created_at);
        assert!(b.updated_at > a.updated_at);
        assert_eq!(b.entry.spiffe_id.to_string(), "spiffe://td/a2");
        assert_eq!(b.entry.hint.as_deref(), Some("h"));
        assert!(b.admin);
        assert_eq!(store.get(&id).unwrap(), Some(b));

        // The old revision is now stale.
        let err = store
            .update(&id, 1, spec("spiffe://td/a", &["unix:uid:1"]))
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { current: 2, .. }));

        // Writing the same values again is not a duplicate of itself.
        let c = store
            .update(&id, 2, spec("spiffe://td/a2", &["unix:uid:2"]))
            .unwrap();
        assert_eq!(c.revision, 3);

        // But it may not become a duplicate of another entry.
        let other = created(&store, spec("spiffe://td/o", &["unix:uid:3"]));
        let err = store
            .update(&id, 3, spec("spiffe://td/o", &["unix:uid:3"]))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Duplicate { existing, .. } if *existing == other.entry.id)
        );

        let missing = EntryId::new("entry-missing");
        assert!(matches!(
            store.update(&missing, 1, spec("spiffe://td/x", &["unix:uid:9"])),
            Err(StoreError::NotFound(i)) if i == missing
        ));
    }

    #[test]
    fn delete_reports_missing_ids() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let a = created(&store, spec("spiffe://td/a", &["unix:uid:1"]));
        let b = created(&store, spec("spiffe://td/b", &["unix:uid:2"]));
        let missing = EntryId::new("entry-missing");
        let got = store
            .delete(&[a.entry.id.clone(), missing.clone(), a.entry.id.clone()])
            .unwrap();
        assert!(got[0].is_ok());
        assert!(matches!(&got[1], Err(StoreError::NotFound(i)) if *i == missing));
        assert!(matches!(&got[2], Err(StoreError::NotFound(i)) if *i == a.entry.id));
        assert_eq!(store.list().unwrap(), vec![b]);
    }

    #[test]
    fn garbage_file_is_corrupt() {
        let (_dir, path) = temp();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut junk = vec![0u8; 8192];
        SystemRandom::new().fill(&mut junk).unwrap();
        std::fs::write(&path, &junk).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { path: p, .. } if *p == path),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("restore"), "{msg}");
        // Refusing left the file alone.
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }

    #[test]
    fn newer_schema_is_refused() {
        let (_dir, path) = temp();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
                .unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::TooNew { path: p, found: 99, known: 3 } if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer spiffed"));
        // Not switched to WAL or otherwise touched.
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }

    #[test]
    fn unparsable_row_is_corrupt_naming_the_entry() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let a = created(&store, spec("spiffe://td/a", &["unix:uid:1"]));
        let bad = [
            (
                "spiffe_id",
                rusqlite::types::Value::Text("not an id".into()),
            ),
            (
                "selectors",
                // Not of the TYPE:KEY:VALUE shape. (A well-shaped selector of a type no attestor
                // serves reads back fine: `EntrySources` refuses it when it loads.)
                rusqlite::types::Value::Text("uid:1".into()),
            ),
            ("selectors", rusqlite::types::Value::Blob(vec![0xff, 0xfe])),
            ("hint", rusqlite::types::Value::Blob(vec![0xff])),
            ("x509_svid_ttl_ms", rusqlite::types::Value::Integer(-5)),
            ("admin", rusqlite::types::Value::Integer(7)),
            ("created_at_ms", rusqlite::types::Value::Integer(-1)),
            ("revision", rusqlite::types::Value::Real(1.5)),
            (
                "federates_with",
                rusqlite::types::Value::Text("not a td!".into()),
            ),
        ];
        for (column, value) in bad {
            // Restore the row, then damage one column.
            store.delete(std::slice::from_ref(&a.entry.id)).unwrap();
            {
                let conn = store.lock();
                conn.execute(
                    &format!(
                        "INSERT INTO entries ({COLUMNS}) VALUES (?1, 'spiffe://td/a', \
                         'unix:uid:1', NULL, NULL, NULL, '', 0, 0, 0, 1, '')"
                    ),
                    [a.entry.id.as_str()],
                )
                .unwrap();
                conn.execute(
                    &format!("UPDATE entries SET {column} = ?1 WHERE id = ?2"),
                    rusqlite::params![value, a.entry.id.as_str()],
                )
                .unwrap();
            }
            let err = store.get(&a.entry.id).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{column}: {msg}");
            assert!(msg.contains(a.entry.id.as_str()), "{column}: {msg}");
            assert!(store.list().is_err());
        }
    }

    #[test]
    fn committed_entries_survive_an_unclean_stop() {
        let (dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let mut want: Vec<StoredEntry> = (0..5)
            .map(|i| created(&store, spec(&format!("spiffe://td/w{i}"), &["unix:uid:1"])))
            .collect();
        want.sort_by(|x, y| x.entry.id.cmp(&y.entry.id));

        // Copy the files as they are on disk while the store is still open (what a kill -9
        // leaves: no checkpoint, no clean close), then open the copy.
        let copy = dir.path().join("copy").join("entries.db");
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&path, &copy).unwrap();
        std::fs::copy(
            path.with_file_name("entries.db-wal"),
            copy.with_file_name("entries.db-wal"),
        )
        .unwrap();
        assert_eq!(Store::open(&copy).unwrap().list().unwrap(), want);

        // Never close the original; a new store on the same file sees everything.
        std::mem::forget(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.list().unwrap(), want);
    }

    #[test]
    fn ids_sort_after_config_entries() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let a = created(&store, spec("spiffe://td/a", &["unix:uid:1"]));
        assert!(EntryId::new("config-0000") < a.entry.id);
        assert!(EntryId::new("config-9999") < a.entry.id);
    }

    /// A file written by the first release (schema version 1) opens, gains the selector table
    /// for its existing entries, and pages by selector and SPIFFE ID.
    #[test]
    fn version_1_file_is_migrated_and_pages_by_selector() {
        let (_dir, path) = temp();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(schema::MIGRATION_1).unwrap();
            conn.execute_batch(
                "INSERT INTO entries VALUES ('entry-b', 'spiffe://td/web', \
                 'unix:gid:5\nunix:uid:1', NULL, NULL, NULL, '', 0, 0, 0, 1); \
                 INSERT INTO entries VALUES ('entry-a', 'spiffe://td/db', 'unix:uid:1', \
                 600000, NULL, 'h', 'db.internal', 0, 0, 0, 3); \
                 INSERT INTO entries VALUES ('entry-c', 'spiffe://td/web', 'unix:uid:2', \
                 NULL, NULL, NULL, '', 0, 0, 0, 1); \
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(user_version(&store.lock()).unwrap(), schema::VERSION);
        let ids = |v: Vec<StoredEntry>| -> Vec<String> {
            v.into_iter().map(|s| s.entry.id.to_string()).collect()
        };
        let by_sel = |s: &str| Filter {
            selector: Some(s.parse().unwrap()),
            ..Filter::default()
        };
        assert_eq!(
            ids(store.page(None, 10, &by_sel("unix:uid:1")).unwrap()),
            ["entry-a", "entry-b"]
        );
        assert_eq!(
            ids(store.page(None, 10, &by_sel("unix:gid:5")).unwrap()),
            ["entry-b"]
        );
        let web = Filter {
            spiffe_id: Some("spiffe://td/web".parse().unwrap()),
            ..Filter::default()
        };
        assert_eq!(
            ids(store.page(None, 10, &web).unwrap()),
            ["entry-b", "entry-c"]
        );
        let after_b = EntryId::new("entry-b");
        assert_eq!(
            ids(store.page(Some(&after_b), 10, &web).unwrap()),
            ["entry-c"]
        );
        // Rows written before the upgrade read back whole.
        let a = store.get(&EntryId::new("entry-a")).unwrap().unwrap();
        assert_eq!(a.revision, 3);
        assert_eq!(a.entry.dns_names, ["db.internal"]);
        // New writes keep the selector table in step: update moves, delete removes.
        let b = store
            .update(&after_b, 1, spec("spiffe://td/web", &["unix:uid:3"]))
            .unwrap();
        assert_eq!(b.revision, 2);
        assert!(ids(store.page(None, 10, &by_sel("unix:gid:5")).unwrap()).is_empty());
        assert_eq!(
            ids(store.page(None, 10, &by_sel("unix:uid:3")).unwrap()),
            ["entry-b"]
        );
        store.delete(std::slice::from_ref(&after_b)).unwrap();
        assert!(ids(store.page(None, 10, &by_sel("unix:uid:3")).unwrap()).is_empty());
        let rows: i64 = store
            .lock()
            .query_row("SELECT count(*) FROM entry_selectors", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2, "entry-a's and entry-c's selectors are left");
    }

    #[test]
    fn pages_by_key_return_every_entry_once() {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        let mut all: Vec<String> = (0..57)
            .map(|i| {
                let gid = format!("unix:gid:{}", i % 3);
                created(
                    &store,
                    spec(&format!("spiffe://td/w{i}"), &["unix:uid:1", &gid]),
                )
                .entry
                .id
                .to_string()
            })
            .collect();
        all.sort();
        for (filter, want) in [
            (Filter::default(), all.len()),
            (
                Filter {
                    selector: Some("unix:gid:1".parse().unwrap()),
                    ..Filter::default()
                },
                19,
            ),
        ] {
            let mut seen = Vec::new();
            let mut after: Option<EntryId> = None;
            loop {
                let page = store.page(after.as_ref(), 10, &filter).unwrap();
                assert!(page.len() <= 10);
                let Some(last) = page.last() else { break };
                after = Some(last.entry.id.clone());
                seen.extend(page.into_iter().map(|s| {
                    assert!(filter.accepts(&s.entry));
                    s.entry.id.to_string()
                }));
            }
            assert_eq!(seen.len(), want);
            let mut sorted = seen.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(seen, sorted, "in id order, each once");
        }
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }
}
