//! The admin service (`spiffed.admin.v1.EntryAdmin`) on the privileged admin socket, and the
//! entry directory that merges config-file entries with stored ones and publishes every change
//! to the Workload API streams at once.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use spiffed_attest::UnixAttestor;
use spiffed_core::{
    Attestor, Entry, EntryId, EntrySet, Facts, MAX_HINT_LEN, PeerCred, Selector, Selectors,
    SpiffeId, TrustDomain,
};
use spiffed_entries::EntryHandle;
use spiffed_entries::store::{EntrySpec, Store, StoreError, StoredEntry};
use spiffed_proto::admin as pb;
use spiffed_proto::admin::entry_admin_server::{EntryAdmin, EntryAdminServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Longest TTL an entry may ask for.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default and largest page of `ListEntries`.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Most specs or ids in one batch call.
const MAX_BATCH: usize = 1000;

/// Config-file entries plus stored ones; the one place that publishes the merged set.
pub(crate) struct Directory {
    store: Store,
    config: Mutex<Vec<Entry>>,
    handle: EntryHandle,
    attestor: Arc<UnixAttestor>,
    /// Serializes write + publish, so sets are published in commit order.
    write: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Directory {
    pub(crate) fn new(
        store: Store,
        config: Vec<Entry>,
        handle: EntryHandle,
        attestor: Arc<UnixAttestor>,
    ) -> Self {
        Self {
            store,
            config: Mutex::new(config),
            handle,
            attestor,
            write: Mutex::new(()),
        }
    }

    /// The merged entries: config-file ones first (ids `config-HEX`), then stored ones.
    pub(crate) fn merged(&self) -> Result<Vec<Entry>, StoreError> {
        let mut all = lock(&self.config).clone();
        all.extend(self.store.list()?.into_iter().map(|s| s.entry));
        Ok(all)
    }

    /// Publishes the merged set to every stream. Call with the write lock held.
    fn publish(&self) -> Result<(), StoreError> {
        let all = self.merged()?;
        // Indexed once, by the publish itself (None only while the agent shuts down); the
        // Workload API attests for the facts the published set needs.
        let _ = self.handle.replace(all);
        Ok(())
    }

    /// Replaces the config-file entries (SIGHUP) and publishes.
    pub(crate) fn set_config_entries(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
        if let Some(warning) =
            exe_selector_warning(entries.iter().flat_map(|e| e.selectors.iter().cloned()))
        {
            tracing::warn!("config entries reloaded: {warning}");
        }
        let _w = lock(&self.write);
        *lock(&self.config) = entries;
        self.publish()
    }

    fn config_entries(&self) -> Vec<Entry> {
        lock(&self.config).clone()
    }
}

/// A handle for reloading the config file's entries while the agent runs.
#[derive(Clone)]
pub struct Reloader(pub(crate) Arc<Directory>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// Replaces the entries that came from the config file; stored entries stay.
    pub fn reload_config_entries(&self, entries: Vec<Entry>) -> Result<(), String> {
        self.0
            .set_config_entries(entries)
            .map_err(|e| e.to_string())
    }
}

/// The admin gRPC service.
pub(crate) struct AdminService {
    pub(crate) dir: Arc<Directory>,
    pub(crate) td: TrustDomain,
    pub(crate) ca_ttl: Duration,
    pub(crate) admin_uids: Vec<u32>,
    pub(crate) own_uid: u32,
    pub(crate) current: watch::Receiver<Arc<EntrySet>>,
    pub(crate) synthetic_ids: bool,
    pub(crate) config_file: Option<String>,
    pub(crate) limits: EntryLimits,
}

/// Bounds an entry created or updated through the admin API must keep (the config file's
/// `max_selectors_per_entry`, `max_dns_names_per_entry` and `min_svid_ttl`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryLimits {
    pub(crate) max_selectors: usize,
    pub(crate) max_dns_names: usize,
    pub(crate) min_svid_ttl: Duration,
}

impl AdminService {
    pub(crate) fn into_server(self) -> EntryAdminServer<Self> {
        EntryAdminServer::new(self).max_decoding_message_size(4 * 1024 * 1024)
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<PeerCred, Status> {
        let cred = req
            .extensions()
            .get::<PeerCred>()
            .cloned()
            .ok_or_else(|| Status::internal("the connection carries no peer credentials"))?;
        if cred.uid == self.own_uid || self.admin_uids.contains(&cred.uid) {
            Ok(cred)
        } else {
            tracing::warn!(uid = cred.uid, pid = ?cred.pid, "admin call refused");
            Err(Status::permission_denied(format!(
                "uid {} may not administer spiffed; add it to admin_uids in the agent's config",
                cred.uid
            )))
        }
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Directory) -> R + Send + 'static,
    ) -> Result<R, Status> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || f(&dir))
            .await
            .map_err(|e| Status::internal(format!("admin task failed: {e}")))
    }
}

/// The warning for an agent that cannot check every one of `selectors` for every caller (see
/// [`spiffed_attest::exe_access_warning`]), if any.
pub(crate) fn exe_selector_warning(
    selectors: impl IntoIterator<Item = Selector>,
) -> Option<String> {
    let facts = selectors
        .into_iter()
        .fold(Facts::NONE, |f, s| f | Facts::for_kind_key(&s.kind_key()));
    spiffed_attest::exe_access_warning(facts)
}

/// A field-level validation error.
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) message: String,
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn ttl(
    secs: u64,
    field: &str,
    ca_ttl: Duration,
    min: Duration,
) -> Result<Option<Duration>, FieldError> {
    if secs == 0 {
        return Ok(None);
    }
    let d = Duration::from_secs(secs);
    if d > MAX_TTL {
        return Err(field_err(field, "is longer than 10 years; use e.g. 1h"));
    }
    if d < min {
        return Err(field_err(
            field,
            format!(
                "is shorter than the agent's min_svid_ttl ({}s): SVIDs are re-minted at half \
                 their lifetime; use at least {}s",
                min.as_secs(),
                min.as_secs()
            ),
        ));
    }
    if d > ca_ttl {
        return Err(field_err(
            field,
            format!(
                "is longer than the CA lifetime ({}s): an SVID never outlives its CA (or, for \
                 JWT-SVIDs, its signing key)",
                ca_ttl.as_secs()
            ),
        ));
    }
    Ok(Some(d))
}

/// Checks an operator's spec: SPIFFE ID syntax and trust domain, known selectors, TTL bounds,
/// hint length, DNS names.
pub(crate) fn validate_spec(
    p: &pb::EntrySpec,
    td: &TrustDomain,
    ca_ttl: Duration,
    limits: &EntryLimits,
) -> Result<EntrySpec, FieldError> {
    if p.spiffe_id.is_empty() {
        return Err(field_err("spiffe_id", "is required, e.g. spiffe://TD/web"));
    }
    let spiffe_id = SpiffeId::new(&p.spiffe_id).map_err(|e| {
        field_err(
            "spiffe_id",
            format!("{:?} is not a valid SPIFFE ID: {e}", p.spiffe_id),
        )
    })?;
    if p.selectors.is_empty() {
        return Err(field_err(
            "selectors",
            "at least one selector is required, e.g. unix:uid:1000",
        ));
    }
    if p.selectors.len() > limits.max_selectors {
        return Err(field_err(
            "selectors",
            format!(
                "has {} items; the agent's limit is {} (max_selectors_per_entry)",
                p.selectors.len(),
                limits.max_selectors
            ),
        ));
    }
    if p.dns_names.len() > limits.max_dns_names {
        return Err(field_err(
            "dns_names",
            format!(
                "has {} items; the agent's limit is {} (max_dns_names_per_entry)",
                p.dns_names.len(),
                limits.max_dns_names
            ),
        ));
    }
    let mut selectors = Vec::with_capacity(p.selectors.len());
    for (i, s) in p.selectors.iter().enumerate() {
        selectors.push(
            s.parse::<Selector>()
                .map_err(|e| field_err(format!("selectors[{i}]"), e.to_string()))?,
        );
    }
    selectors.sort();
    selectors.dedup();
    if p.admin {
        return Err(field_err(
            "admin",
            "is reserved for a later release; leave it false",
        ));
    }
    let spec = EntrySpec {
        spiffe_id,
        selectors,
        x509_svid_ttl: ttl(
            p.x509_svid_ttl_seconds,
            "x509_svid_ttl",
            ca_ttl,
            limits.min_svid_ttl,
        )?,
        jwt_svid_ttl: ttl(
            p.jwt_svid_ttl_seconds,
            "jwt_svid_ttl",
            ca_ttl,
            limits.min_svid_ttl,
        )?,
        hint: (!p.hint.is_empty()).then(|| p.hint.clone()),
        dns_names: p.dns_names.clone(),
        admin: false,
    };
    if spec.hint.as_ref().is_some_and(|h| h.len() > MAX_HINT_LEN) {
        return Err(field_err("hint", "is longer than 1024 bytes"));
    }
    let probe = Entry {
        id: EntryId::new("new"),
        spiffe_id: spec.spiffe_id.clone(),
        selectors: spec.selectors.clone(),
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        hint: spec.hint.clone(),
        dns_names: spec.dns_names.clone(),
    };
    probe.validate(td).map_err(|e| {
        let field = match &e {
            spiffed_core::EntryError::DnsName(_) => "dns_names",
            spiffed_core::EntryError::HintTooLong(_) | spiffed_core::EntryError::HintControl(_) => {
                "hint"
            }
            spiffed_core::EntryError::NoSelectors => "selectors",
            spiffed_core::EntryError::ZeroTtl(f) => f,
            _ => "spiffe_id",
        };
        field_err(field, e.to_string())
    })?;
    Ok(spec)
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub(crate) fn spec_of(e: &Entry, admin: bool) -> pb::EntrySpec {
    pb::EntrySpec {
        spiffe_id: e.spiffe_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl_seconds: e.x509_svid_ttl.map_or(0, |d| d.as_secs()),
        jwt_svid_ttl_seconds: e.jwt_svid_ttl.map_or(0, |d| d.as_secs()),
        hint: e.hint.clone().unwrap_or_default(),
        dns_names: e.dns_names.clone(),
        admin,
    }
}

fn config_entry(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spec: Some(spec_of(e, false)),
        source: "config".into(),
        revision: 0,
        created_at: 0,
        updated_at: 0,
    }
}

fn stored_entry(s: &StoredEntry) -> pb::Entry {
    pb::Entry {
        id: s.entry.id.to_string(),
        spec: Some(spec_of(&s.entry, s.admin)),
        source: "store".into(),
        revision: s.revision,
        created_at: secs(s.created_at),
        updated_at: secs(s.updated_at),
    }
}

fn store_status(e: &StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Conflict { .. } => Status::failed_precondition(msg),
        StoreError::Duplicate { .. } => Status::already_exists(msg),
        _ => Status::unavailable(msg),
    }
}

fn error_of(e: &StoreError) -> pb::EntryError {
    let field = match e {
        StoreError::Duplicate { .. } => "spiffe_id",
        _ => "",
    };
    pb::EntryError {
        field: field.into(),
        message: e.to_string(),
    }
}

/// An exact duplicate of a config-file entry (same SPIFFE ID and selectors)?
fn duplicate_of_config(spec: &EntrySpec, config: &[Entry]) -> Option<EntryId> {
    config
        .iter()
        .find(|c| c.spiffe_id == spec.spiffe_id && c.selectors == spec.selectors)
        .map(|c| c.id.clone())
}

fn config_refusal(id: &str, file: Option<&str>) -> Status {
    Status::failed_precondition(format!(
        "entry {id} comes from the config file{}; edit the file and send SIGHUP to the agent",
        file.map(|f| format!(" {f}")).unwrap_or_default()
    ))
}

#[tonic::async_trait]
impl EntryAdmin for AdminService {
    async fn create_entries(
        &self,
        request: Request<pb::CreateEntriesRequest>,
    ) -> Result<Response<pb::CreateEntriesResponse>, Status> {
        let who = self.authorize(&request)?;
        let specs = request.into_inner().entries;
        if specs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} entries per call"
            )));
        }
        let (td, ca_ttl, limits) = (self.td.clone(), self.ca_ttl, self.limits);
        let results = self
            .blocking(move |dir| {
                let _w = lock(&dir.write);
                let config = dir.config_entries();
                // Validate each; only the valid ones go to the store, in order.
                let mut slots: Vec<Result<EntrySpec, pb::EntryError>> = specs
                    .iter()
                    .map(|p| {
                        let spec = validate_spec(p, &td, ca_ttl, &limits).map_err(|e| pb::EntryError {
                            field: e.field,
                            message: e.message,
                        })?;
                        if let Some(id) = duplicate_of_config(&spec, &config) {
                            return Err(pb::EntryError {
                                field: "spiffe_id".into(),
                                message: format!("an entry with this SPIFFE ID and these selectors already exists ({id}, from the config file)"),
                            });
                        }
                        Ok(spec)
                    })
                    .collect();
                let valid: Vec<EntrySpec> = slots.iter().filter_map(|s| s.as_ref().ok().cloned()).collect();
                let stored = dir.store.create(valid)?;
                let mut stored = stored.into_iter();
                let mut out = Vec::with_capacity(slots.len());
                for slot in slots.drain(..) {
                    out.push(match slot {
                        Err(error) => pb::EntryResult { entry: None, error: Some(error) },
                        Ok(_) => match stored.next() {
                            Some(Ok(s)) => pb::EntryResult { entry: Some(stored_entry(&s)), error: None },
                            Some(Err(e)) => pb::EntryResult { entry: None, error: Some(error_of(&e)) },
                            None => pb::EntryResult {
                                entry: None,
                                error: Some(pb::EntryError { field: String::new(), message: "the store returned fewer results than asked".into() }),
                            },
                        },
                    });
                }
                if out.iter().any(|r| r.entry.is_some()) {
                    dir.publish()?;
                }
                Ok::<_, StoreError>(out)
            })
            .await?
            .map_err(|e| store_status(&e))?;
        for r in &results {
            match (&r.entry, &r.error) {
                (Some(e), _) => {
                    tracing::info!(uid = who.uid, entry = %e.id, spiffe_id = %e.spec.as_ref().map(|s| s.spiffe_id.as_str()).unwrap_or(""), "entry created")
                }
                (None, Some(err)) => {
                    tracing::info!(uid = who.uid, field = %err.field, reason = %err.message, "entry refused")
                }
                _ => {}
            }
        }
        let created = results
            .iter()
            .filter_map(|r| r.entry.as_ref()?.spec.as_ref())
            .flat_map(|spec| &spec.selectors)
            .filter_map(|s| s.parse::<Selector>().ok());
        let warnings: Vec<String> = exe_selector_warning(created).into_iter().collect();
        for warning in &warnings {
            tracing::warn!(uid = who.uid, "entry created: {warning}");
        }
        Ok(Response::new(pb::CreateEntriesResponse {
            results,
            warnings,
        }))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let selector = if req.selector.is_empty() {
            None
        } else {
            Some(
                req.selector
                    .parse::<Selector>()
                    .map_err(|e| Status::invalid_argument(format!("selector: {e}")))?,
            )
        };
        let page = match req.page_size as usize {
            0 => PAGE,
            n => n.min(MAX_PAGE),
        };
        let (config, stored) = self
            .blocking(|dir| Ok::<_, StoreError>((dir.config_entries(), dir.store.list()?)))
            .await?
            .map_err(|e| store_status(&e))?;
        let mut all: Vec<pb::Entry> = config
            .iter()
            .map(config_entry)
            .chain(stored.iter().map(stored_entry))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let keep = |e: &pb::Entry| {
            let Some(spec) = &e.spec else { return false };
            (req.spiffe_id.is_empty() || spec.spiffe_id == req.spiffe_id)
                && selector
                    .as_ref()
                    .is_none_or(|s| spec.selectors.contains(&s.to_string()))
                && (req.page_token.is_empty() || e.id > req.page_token)
        };
        let mut entries: Vec<pb::Entry> = all.into_iter().filter(keep).take(page + 1).collect();
        let next_page_token = if entries.len() > page {
            entries.truncate(page);
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries,
            next_page_token,
        }))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        let found = self
            .blocking(move |dir| {
                if let Some(c) = dir.config_entries().iter().find(|c| c.id.as_str() == id) {
                    return Ok::<_, StoreError>(Some(config_entry(c)));
                }
                Ok(dir.store.get(&EntryId::new(id))?.as_ref().map(stored_entry))
            })
            .await?
            .map_err(|e| store_status(&e))?;
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no entry with that id; see `spiffed entry list`"))
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let who = self.authorize(&request)?;
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let spec = validate_spec(&spec, &self.td, self.ca_ttl, &self.limits)
            .map_err(|e| Status::invalid_argument(format!("{}: {}", e.field, e.message)))?;
        let file = self.config_file.clone();
        let id = req.id.clone();
        let updated = self
            .blocking(move |dir| {
                let _w = lock(&dir.write);
                let config = dir.config_entries();
                if config.iter().any(|c| c.id.as_str() == id) {
                    return Err(config_refusal(&id, file.as_deref()));
                }
                if let Some(dup) = duplicate_of_config(&spec, &config) {
                    return Err(Status::already_exists(format!("an entry with this SPIFFE ID and these selectors already exists ({dup}, from the config file)")));
                }
                let s = dir
                    .store
                    .update(&EntryId::new(id), req.expected_revision, spec)
                    .map_err(|e| store_status(&e))?;
                dir.publish().map_err(|e| store_status(&e))?;
                Ok(stored_entry(&s))
            })
            .await??;
        tracing::info!(uid = who.uid, entry = %updated.id, revision = updated.revision, "entry updated");
        let selectors = updated.spec.iter().flat_map(|spec| &spec.selectors);
        if let Some(warning) = exe_selector_warning(selectors.filter_map(|s| s.parse().ok())) {
            tracing::warn!(uid = who.uid, entry = %updated.id, "entry updated: {warning}");
        }
        Ok(Response::new(updated))
    }

    async fn delete_entries(
        &self,
        request: Request<pb::DeleteEntriesRequest>,
    ) -> Result<Response<pb::DeleteEntriesResponse>, Status> {
        let who = self.authorize(&request)?;
        let ids = request.into_inner().ids;
        if ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} ids per call"
            )));
        }
        let file = self.config_file.clone();
        let results = self
            .blocking(move |dir| {
                let _w = lock(&dir.write);
                let config = dir.config_entries();
                let mut out: Vec<pb::DeleteResult> = Vec::with_capacity(ids.len());
                let mut to_delete = vec![];
                for id in &ids {
                    if config.iter().any(|c| c.id.as_str() == id) {
                        out.push(pb::DeleteResult {
                            id: id.clone(),
                            error: Some(pb::EntryError {
                                field: "id".into(),
                                message: config_refusal(id, file.as_deref()).message().to_owned(),
                            }),
                        });
                    } else {
                        to_delete.push(EntryId::new(id.clone()));
                        out.push(pb::DeleteResult {
                            id: id.clone(),
                            error: None,
                        });
                    }
                }
                let results = dir.store.delete(&to_delete)?;
                let mut results = results.into_iter();
                for r in out.iter_mut().filter(|r| r.error.is_none()) {
                    if let Some(Err(e)) = results.next() {
                        r.error = Some(error_of(&e));
                    }
                }
                if out.iter().any(|r| r.error.is_none()) {
                    dir.publish()?;
                }
                Ok::<_, StoreError>(out)
            })
            .await?
            .map_err(|e| store_status(&e))?;
        for r in results.iter().filter(|r| r.error.is_none()) {
            tracing::info!(uid = who.uid, entry = %r.id, "entry deleted");
        }
        Ok(Response::new(pb::DeleteEntriesResponse { results }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        self.authorize(&request)?;
        let pid = request.into_inner().pid;
        let dir = self.dir.clone();
        let attested = tokio::task::spawn_blocking(move || {
            let cred = spiffed_attest::peer_cred_of_pid(pid).map_err(|e| {
                Status::not_found(format!(
                    "cannot inspect pid {pid}: {e} (is it running, and in this PID namespace?)"
                ))
            })?;
            let attested = dir.attestor.attest(&cred, Facts::ALL).map_err(|e| {
                Status::unavailable(format!("attestation of pid {pid} failed: {e}"))
            })?;
            Ok::<_, Status>((cred, attested))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let (cred, attested) = attested;
        let left_out = attested.left_out.iter().map(ToString::to_string).collect();
        let set = self.current.borrow().clone();
        let have: &Selectors = &attested.selectors;
        let mut verdicts = vec![];
        for e in set.entries() {
            let missing: Vec<String> = e
                .selectors
                .iter()
                .filter(|s| !have.contains(s))
                .map(ToString::to_string)
                .collect();
            let matched = missing.is_empty();
            if matched || missing.len() < e.selectors.len() {
                verdicts.push(pb::EntryVerdict {
                    entry: Some(config_or_stored(e)),
                    matched,
                    missing,
                });
            }
        }
        let matching = set.matching(have);
        let mut synthetic = false;
        let mut identities: Vec<String> =
            matching.iter().map(|e| e.spiffe_id.to_string()).collect();
        if identities.is_empty()
            && self.synthetic_ids
            && let Some(e) = spiffed_workload_api::synthetic_entry(&self.td, &attested)
        {
            identities.push(e.spiffe_id.to_string());
            synthetic = true;
        }
        Ok(Response::new(pb::ExplainResponse {
            pid,
            uid: cred.uid,
            gid: cred.gid,
            exe: attested
                .exe
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            selectors: have.iter().map(ToString::to_string).collect(),
            entries: verdicts,
            identities,
            synthetic,
            left_out,
        }))
    }
}

/// An entry from the published set, labelled by where it came from.
fn config_or_stored(e: &Entry) -> pb::Entry {
    let mut p = config_entry(e);
    if !e.id.as_str().starts_with("config-") {
        p.source = "store".into();
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: EntryLimits = EntryLimits {
        max_selectors: 64,
        max_dns_names: 64,
        min_svid_ttl: Duration::from_secs(10),
    };

    fn spec(id: &str, sels: &[&str]) -> pb::EntrySpec {
        pb::EntrySpec {
            spiffe_id: id.into(),
            selectors: sels.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Duration::from_secs(3600);
        let limits = LIMITS;
        assert!(
            validate_spec(
                &spec("spiffe://example.org/web", &["unix:uid:1"]),
                &td,
                ca,
                &limits
            )
            .is_ok()
        );
        let f = |p: pb::EntrySpec| {
            validate_spec(&p, &td, ca, &limits)
                .err()
                .map(|e| e.field)
                .unwrap_or_default()
        };
        assert_eq!(f(spec("", &["unix:uid:1"])), "spiffe_id");
        assert_eq!(
            f(spec("spiffe://example.org/web/", &["unix:uid:1"])),
            "spiffe_id"
        );
        assert_eq!(
            f(spec("spiffe://other.org/web", &["unix:uid:1"])),
            "spiffe_id"
        );
        assert_eq!(f(spec("spiffe://example.org/web", &[])), "selectors");
        assert_eq!(
            f(spec(
                "spiffe://example.org/web",
                &["unix:uid:1", "k8s:ns:x"]
            )),
            "selectors[1]"
        );
        let mut long = spec("spiffe://example.org/web", &["unix:uid:1"]);
        long.hint = "h".repeat(1025);
        assert_eq!(f(long), "hint");
        let mut ttl = spec("spiffe://example.org/web", &["unix:uid:1"]);
        ttl.x509_svid_ttl_seconds = 7200;
        assert_eq!(f(ttl), "x509_svid_ttl");
        let mut dns = spec("spiffe://example.org/web", &["unix:uid:1"]);
        dns.dns_names = vec!["bad name".into()];
        assert_eq!(f(dns), "dns_names");
        let mut admin = spec("spiffe://example.org/web", &["unix:uid:1"]);
        admin.admin = true;
        assert_eq!(f(admin), "admin");
    }

    #[test]
    fn bounds_on_selectors_dns_names_ttls_and_hints() {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Duration::from_secs(3600);
        let check = |p: pb::EntrySpec| validate_spec(&p, &td, ca, &LIMITS).err();
        let base = || spec("spiffe://example.org/web", &["unix:uid:1"]);
        // 100,000 selectors (all valid and distinct) are refused, 64 are fine.
        let mut many = base();
        many.selectors = (0..100_000).map(|i| format!("unix:gid:{i}")).collect();
        let e = check(many).unwrap();
        assert_eq!(e.field, "selectors");
        assert!(
            e.message.contains("max_selectors_per_entry"),
            "{}",
            e.message
        );
        let mut ok = base();
        ok.selectors = (0..64).map(|i| format!("unix:gid:{i}")).collect();
        assert!(check(ok).is_none());
        let mut dns = base();
        dns.dns_names = (0..100_000).map(|i| format!("h{i}.internal")).collect();
        let e = check(dns).unwrap();
        assert_eq!(e.field, "dns_names");
        assert!(
            e.message.contains("max_dns_names_per_entry"),
            "{}",
            e.message
        );
        // Hints with control characters.
        for bad in ["a\nb", "\u{1b}[31mred", "tab\there"] {
            let mut h = base();
            h.hint = bad.into();
            assert_eq!(
                check(h).map(|e| e.field).as_deref(),
                Some("hint"),
                "{bad:?}"
            );
        }
        // TTLs: below min_svid_ttl, and a JWT-SVID outliving the CA.
        let mut short = base();
        short.x509_svid_ttl_seconds = 1;
        assert_eq!(check(short).unwrap().field, "x509_svid_ttl");
        let mut short = base();
        short.jwt_svid_ttl_seconds = 1;
        assert_eq!(check(short).unwrap().field, "jwt_svid_ttl");
        let mut long = base();
        long.jwt_svid_ttl_seconds = 7200;
        assert_eq!(check(long).unwrap().field, "jwt_svid_ttl");
    }
}
