//! The admin service (`spiffed.admin.v1.EntryAdmin`) on the privileged admin socket. Entries
//! are merged, checked and published by `spiffed_entries::EntrySources`; this module turns
//! requests into its calls and its answers and errors into responses.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffed_attest::CompositeAttestor;
use spiffed_core::{
    Attestor, Entry, EntryError, EntryId, Needs, PeerCred, Selector, Selectors, SpiffeId,
    TrustDomain,
};
use spiffed_entries::store::{EntrySpec, Filter, StoreError, StoredEntry};
use spiffed_entries::{EntrySources, Listed, Rules, SourceError};
use spiffed_proto::admin as pb;
use spiffed_proto::admin::entry_admin_server::{EntryAdmin, EntryAdminServer};
use tonic::{Request, Response, Status};

/// Default and largest page of `ListEntries`.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Most specs or ids in one batch call.
const MAX_BATCH: usize = 1000;

/// A handle for reloading the config file's entries while the agent runs.
#[derive(Clone)]
pub struct Reloader(pub(crate) EntrySources);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// Replaces the entries that came from the config file; stored entries stay.
    pub fn reload_config_entries(&self, entries: Vec<Entry>) -> Result<(), String> {
        if let Some(warning) =
            exe_selector_warning(entries.iter().flat_map(|e| e.selectors.iter().cloned()))
        {
            tracing::warn!("config entries reloaded: {warning}");
        }
        // Publishes only the difference; checked with the same rules as admin writes.
        self.0
            .reload_config(entries)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Reads and checks the files of `cfg`'s `[upstream_authority.disk]`, if any, and logs the
    /// outcome: after renewing them, `SIGHUP` tells whether the next CA rotation can use them.
    /// The running CAs are not touched (the files are read again when the next CA is made).
    pub fn check_upstream(&self, cfg: &crate::config::Config) {
        let Some(up) = &cfg.upstream_authority else {
            return;
        };
        match spiffed_authority::check_upstream(up, std::time::SystemTime::now()) {
            Ok(what) => tracing::info!(
                upstream = %what,
                "upstream authority files checked: the next CA will be signed by them"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "the upstream authority files cannot be used: the current CAs keep signing, but \
                 the next CA rotation fails until they are fixed"
            ),
        }
    }
}

/// The admin gRPC service.
pub(crate) struct AdminService {
    /// Every entry source; checks, stores and publishes each write.
    pub(crate) sources: EntrySources,
    pub(crate) attestor: Arc<CompositeAttestor>,
    pub(crate) td: TrustDomain,
    pub(crate) admin_uids: Vec<u32>,
    pub(crate) own_uid: u32,
    pub(crate) synthetic_ids: bool,
    /// What `spiffed status` reports.
    pub(crate) facts: Arc<crate::telemetry::Facts>,
}

impl AdminService {
    pub(crate) fn into_server(self) -> EntryAdminServer<Self> {
        EntryAdminServer::new(self).max_decoding_message_size(4 * 1024 * 1024)
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<PeerCred, Status> {
        authorize(req, self.own_uid, &self.admin_uids)
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&EntrySources) -> R + Send + 'static,
    ) -> Result<R, Status> {
        let sources = self.sources.clone();
        tokio::task::spawn_blocking(move || f(&sources))
            .await
            .map_err(|e| Status::internal(format!("admin task failed: {e}")))
    }
}

/// The caller of an admin call, if it may administer the agent: its uid is the agent's own
/// (`own_uid`) or in `admin_uids` (SO_PEERCRED, carried by the connection).
pub(crate) fn authorize<T>(
    req: &Request<T>,
    own_uid: u32,
    admin_uids: &[u32],
) -> Result<PeerCred, Status> {
    let cred = req
        .extensions()
        .get::<PeerCred>()
        .cloned()
        .ok_or_else(|| Status::internal("the connection carries no peer credentials"))?;
    if cred.uid == own_uid || admin_uids.contains(&cred.uid) {
        Ok(cred)
    } else {
        tracing::warn!(uid = cred.uid, pid = ?cred.pid, "admin call refused");
        Err(Status::permission_denied(format!(
            "uid {} may not administer spiffed; add it to admin_uids in the agent's config",
            cred.uid
        )))
    }
}

/// The warning for an agent that cannot check every one of `selectors` for every caller (see
/// [`spiffed_attest::exe_access_warning`]), if any.
pub(crate) fn exe_selector_warning(
    selectors: impl IntoIterator<Item = Selector>,
) -> Option<String> {
    let needs: Needs = selectors.into_iter().map(|s| s.kind_key()).collect();
    spiffed_attest::exe_access_warning(&needs)
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

/// A TTL in whole seconds; 0 means "the agent's default". Its bounds are checked by
/// `Entry::checked` (through `EntrySources`), with every other rule.
fn ttl(secs: u64) -> Option<Duration> {
    (secs != 0).then(|| Duration::from_secs(secs))
}

/// Parses an operator's spec (SPIFFE ID syntax, selector shape, the reserved admin flag). Every
/// rule an entry must keep is checked by `Entry::checked` when `EntrySources` takes the spec;
/// its errors come back through [`entry_field_error`].
pub(crate) fn parse_spec(p: &pb::EntrySpec) -> Result<EntrySpec, FieldError> {
    if p.spiffe_id.is_empty() {
        return Err(field_err("spiffe_id", "is required, e.g. spiffe://TD/web"));
    }
    let spiffe_id = SpiffeId::new(&p.spiffe_id).map_err(|e| {
        field_err(
            "spiffe_id",
            format!("{:?} is not a valid SPIFFE ID: {e}", p.spiffe_id),
        )
    })?;
    let mut selectors = Vec::with_capacity(p.selectors.len());
    for (i, s) in p.selectors.iter().enumerate() {
        selectors.push(
            s.parse::<Selector>()
                .map_err(|e| field_err(format!("selectors[{i}]"), e.to_string()))?,
        );
    }
    if p.admin {
        return Err(field_err(
            "admin",
            "is reserved for a later release; leave it false",
        ));
    }
    let mut federates_with = Vec::with_capacity(p.federates_with.len());
    for (i, t) in p.federates_with.iter().enumerate() {
        let td = TrustDomain::new(t).map_err(|e| {
            field_err(
                format!("federates_with[{i}]"),
                format!(
                    "{:?} is not a valid trust domain: {e}; give a name such as partner.example",
                    spiffed_core::untrusted::clip(t)
                ),
            )
        })?;
        federates_with.push(td);
    }
    Ok(EntrySpec {
        spiffe_id,
        selectors,
        x509_svid_ttl: ttl(p.x509_svid_ttl_seconds),
        jwt_svid_ttl: ttl(p.jwt_svid_ttl_seconds),
        hint: (!p.hint.is_empty()).then(|| p.hint.clone()),
        dns_names: p.dns_names.clone(),
        admin: false,
        federates_with,
    })
}

/// Parses and checks a spec as `CreateEntries` and `UpdateEntry` would (the fuzz target's
/// entry point; the service itself lets `EntrySources` check).
pub(crate) fn validate_spec(p: &pb::EntrySpec, rules: &Rules) -> Result<EntrySpec, FieldError> {
    let spec = parse_spec(p)?;
    rules.check_spec(spec).map_err(|e| entry_field_error(&e, p))
}

/// The admin API's `{field, message}` for a rule an entry breaks: a selector is pointed at by
/// its position in the request (`selectors[1]`), since the entry's own selectors are sorted.
fn entry_field_error(e: &EntryError, p: &pb::EntrySpec) -> FieldError {
    let field = match (e.field(), e.item()) {
        ("selectors", Some(item)) => p
            .selectors
            .iter()
            .position(|s| s == item)
            .map_or_else(|| "selectors".to_owned(), |i| format!("selectors[{i}]")),
        ("federates_with", Some(item)) => {
            p.federates_with.iter().position(|t| t == item).map_or_else(
                || "federates_with".to_owned(),
                |i| format!("federates_with[{i}]"),
            )
        }
        (field, _) => field.to_owned(),
    };
    field_err(field, e.message())
}

/// The per-entry error of a batch result.
fn source_entry_error(e: &SourceError, p: Option<&pb::EntrySpec>) -> pb::EntryError {
    let (field, message) = match (e, p) {
        (SourceError::Invalid(err), Some(p)) => {
            let f = entry_field_error(err, p);
            (f.field, f.message)
        }
        (SourceError::Store(StoreError::Duplicate { .. }) | SourceError::DuplicateOf { .. }, _) => {
            ("spiffe_id".to_owned(), e.to_string())
        }
        (SourceError::NotWritable { .. }, _) => ("id".to_owned(), e.to_string()),
        _ => (String::new(), e.to_string()),
    };
    pb::EntryError { field, message }
}

/// The status for a failed call (a whole-batch failure, or `UpdateEntry`'s one entry).
fn source_status(e: &SourceError, p: Option<&pb::EntrySpec>) -> Status {
    match e {
        SourceError::Store(s) => store_status(s),
        SourceError::Invalid(err) => {
            let f = p.map_or_else(
                || field_err(err.field(), err.message()),
                |p| entry_field_error(err, p),
            );
            Status::invalid_argument(format!("{}: {}", f.field, f.message))
        }
        SourceError::NotWritable { .. } | SourceError::ReadOnly { .. } => {
            Status::failed_precondition(e.to_string())
        }
        SourceError::DuplicateOf { .. } => Status::already_exists(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
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
        federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
    }
}

/// An entry as listed, labelled by its source (`config`, `store`, ...).
fn listed_entry(l: &Listed) -> pb::Entry {
    match l.stored() {
        Some(s) => stored_entry(s),
        None => pb::Entry {
            id: l.id().to_string(),
            spec: Some(spec_of(l.entry(), false)),
            source: l.source().into(),
            revision: 0,
            created_at: 0,
            updated_at: 0,
        },
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
        // Parse each; the parsed ones go to the sources, which check every rule, store and
        // publish them in one event.
        let parsed: Vec<Result<EntrySpec, FieldError>> = specs.iter().map(parse_spec).collect();
        let valid: Vec<EntrySpec> = parsed
            .iter()
            .filter_map(|s| s.as_ref().ok().cloned())
            .collect();
        let created = self
            .blocking(move |sources| sources.create(valid))
            .await?
            .map_err(|e| source_status(&e, None))?;
        let mut created = created.into_iter();
        let results: Vec<pb::EntryResult> = parsed
            .into_iter()
            .zip(&specs)
            .map(|(slot, p)| match slot {
                Err(e) => pb::EntryResult {
                    entry: None,
                    error: Some(pb::EntryError {
                        field: e.field,
                        message: e.message,
                    }),
                },
                Ok(_) => match created.next() {
                    Some(Ok(s)) => pb::EntryResult {
                        entry: Some(stored_entry(&s)),
                        error: None,
                    },
                    Some(Err(e)) => pb::EntryResult {
                        entry: None,
                        error: Some(source_entry_error(&e, Some(p))),
                    },
                    None => pb::EntryResult {
                        entry: None,
                        error: Some(pb::EntryError {
                            field: String::new(),
                            message: SourceError::MissingResult.to_string(),
                        }),
                    },
                },
            })
            .collect();
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
        let spiffe_id = if req.spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::new(&req.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!(
                    "spiffe_id: {:?} is not a valid SPIFFE ID: {e}",
                    req.spiffe_id
                ))
            })?)
        };
        let page = match req.page_size as usize {
            0 => PAGE,
            n => n.min(MAX_PAGE),
        };
        let filter = Filter {
            spiffe_id,
            selector,
        };
        let after = (!req.page_token.is_empty()).then(|| EntryId::new(req.page_token));
        // One page through the store's index by key, merged with the in-memory sources.
        let found = self
            .blocking(move |sources| sources.list(after.as_ref(), page, &filter))
            .await?
            .map_err(|e| source_status(&e, None))?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: found.entries.iter().map(listed_entry).collect(),
            next_page_token: found.next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        let found = self
            .blocking(move |sources| sources.get(&EntryId::new(id)))
            .await?
            .map_err(|e| source_status(&e, None))?
            .as_ref()
            .map(listed_entry);
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
        let p = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let spec = parse_spec(&p)
            .map_err(|e| Status::invalid_argument(format!("{}: {}", e.field, e.message)))?;
        let id = EntryId::new(req.id);
        let expected = req.expected_revision;
        let updated = self
            .blocking(move |sources| sources.update(&id, expected, spec))
            .await?
            .map_err(|e| source_status(&e, Some(&p)))?;
        let updated = stored_entry(&updated);
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
        let entry_ids: Vec<EntryId> = ids.iter().cloned().map(EntryId::new).collect();
        let deleted = self
            .blocking(move |sources| sources.delete(&entry_ids))
            .await?
            .map_err(|e| source_status(&e, None))?;
        let results: Vec<pb::DeleteResult> = ids
            .into_iter()
            .zip(deleted)
            .map(|(id, r)| pb::DeleteResult {
                id,
                error: r.err().map(|e| source_entry_error(&e, None)),
            })
            .collect();
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
        let cred = tokio::task::spawn_blocking(move || spiffed_attest::peer_cred_of_pid(pid))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::not_found(format!(
                    "cannot inspect pid {pid}: {e} (is it running, and in this PID namespace?)"
                ))
            })?;
        let attested = self
            .attestor
            .attest(&cred, &Needs::everything())
            .await
            .map_err(|e| Status::unavailable(format!("attestation of pid {pid} failed: {e}")))?;
        let left_out = attested.left_out.iter().map(ToString::to_string).collect();
        let feed = self.sources.feed();
        // Read-locked briefly: no await below until the guard is dropped.
        let index = feed.read();
        let have: &Selectors = &attested.selectors;
        let mut verdicts = vec![];
        for e in index.iter() {
            let missing: Vec<String> = e
                .selectors
                .iter()
                .filter(|s| !have.contains(s))
                .map(ToString::to_string)
                .collect();
            let matched = missing.is_empty();
            if matched || missing.len() < e.selectors.len() {
                verdicts.push(pb::EntryVerdict {
                    entry: Some(live_entry(&self.sources, e)),
                    matched,
                    missing,
                });
            }
        }
        // The index iterates in slot order; show entries in id order, as before.
        verdicts.sort_by(|a, b| {
            let id = |v: &pb::EntryVerdict| v.entry.as_ref().map(|e| e.id.clone());
            id(a).cmp(&id(b))
        });
        let matching = index.matching(have);
        drop(index);
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

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authorize(&request)?;
        let facts = self.facts.clone();
        // The SVID caches are walked once: off the runtime's worker threads.
        let snap = tokio::task::spawn_blocking(move || facts.snapshot())
            .await
            .map_err(|e| Status::internal(format!("status task failed: {e}")))?;
        let at = |t: Option<SystemTime>| t.map_or(0, secs);
        let agent = snap.agent.clone().unwrap_or(crate::telemetry::AgentFacts {
            readiness: "",
            reason: String::new(),
            agent_id: None,
            last_sync: None,
            server_address: String::new(),
        });
        Ok(Response::new(pb::StatusResponse {
            version: crate::telemetry::VERSION.to_owned(),
            uptime_seconds: snap.uptime.as_secs(),
            started_at: secs(self.facts.started),
            mode: snap.mode.to_owned(),
            trust_domain: self.facts.trust_domain.to_string(),
            authority: snap.authority.kind.to_owned(),
            authority_not_before: at(snap.authority.not_before),
            authority_not_after: at(snap.authority.not_after),
            entries: snap.entries as u64,
            x509_svids_cached: snap.svids_cached as u64,
            x509_svid_earliest_expiry: at(snap.svid_earliest_expiry),
            connections: snap.connections as u64,
            streams: snap.streams as u64,
            x509_mints: snap.x509_mints,
            x509_rotations: snap.x509_rotations,
            last_rotation: at(snap.last_rotation),
            ready: snap.ready.ready,
            ready_reason: snap.ready.reason,
            readiness: agent.readiness.to_owned(),
            readiness_reason: agent.reason,
            last_sync: at(agent.last_sync),
            server_address: agent.server_address,
            agent_id: agent.agent_id.unwrap_or_default(),
            socket_path: self.facts.socket_path.display().to_string(),
        }))
    }
}

/// An entry of the live index, labelled by the source that owns its id.
fn live_entry(sources: &EntrySources, e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spec: Some(spec_of(e, false)),
        source: sources.source_of(&e.id).unwrap_or_default().into(),
        revision: 0,
        created_at: 0,
        updated_at: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::EntryLimits;

    fn rules() -> Rules {
        Rules {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            limits: EntryLimits {
                max_selectors: 64,
                max_dns_names: 64,
                min_svid_ttl: Duration::from_secs(10),
                ca_ttl: Duration::from_secs(3600),
            },
            selectors: Arc::new(spiffed_attest::builtin()),
        }
    }

    fn spec(id: &str, sels: &[&str]) -> pb::EntrySpec {
        pb::EntrySpec {
            spiffe_id: id.into(),
            selectors: sels.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        let rules = rules();
        assert!(validate_spec(&spec("spiffe://example.org/web", &["unix:uid:1"]), &rules).is_ok());
        let f = |p: pb::EntrySpec| {
            validate_spec(&p, &rules)
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
        let mut fed = spec("spiffe://example.org/web", &["unix:uid:1"]);
        fed.federates_with = vec!["other.org".into(), "Not A TD".into()];
        assert_eq!(f(fed.clone()), "federates_with[1]");
        fed.federates_with = vec!["other.org".into(), "example.org".into()];
        assert_eq!(f(fed.clone()), "federates_with[1]");
        fed.federates_with = vec!["other.org".into()];
        assert!(validate_spec(&fed, &rules).is_ok());
    }

    #[test]
    fn bounds_on_selectors_dns_names_ttls_and_hints() {
        let rules = rules();
        let check = |p: pb::EntrySpec| validate_spec(&p, &rules).err();
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
        let e = check(long).unwrap();
        assert_eq!(e.field, "jwt_svid_ttl");
        assert!(
            e.message
                .starts_with("is longer than the CA lifetime (3600s)"),
            "{}",
            e.message
        );
    }
}
