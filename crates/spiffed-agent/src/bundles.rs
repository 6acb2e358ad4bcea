//! Trust bundles on the admin socket (`spiffed.admin.v1.BundleAdmin`): the own trust domain's
//! bundle, and federated bundles.
//!
//! Standalone mode keeps federated bundles in the entry store (`spiffed bundle set`): each is
//! checked by the shared SPIFFE bundle parser ([`spiffed_core::spiffe_bundle`]), stored (in the
//! SPIFFE format, re-written), then published into the CA's bundle set, so open streams get
//! it at once; [`load_stored`] publishes the stored ones at start. Which workloads receive a
//! federated bundle is the Workload API's business (`federates_with`, `federate_all`).
//!
//! In agent mode the SPIRE Server owns federated bundles: they can be listed, not set.

use std::time::SystemTime;

use spiffed_authority::CaAuthority;
use spiffed_core::spiffe_bundle::{BundleError, Parsed, SpiffeBundle};
use spiffed_core::{Issuer as _, TrustBundle, TrustDomain};
use spiffed_entries::EntrySources;
use spiffed_entries::store::{Store, StoredBundle};
use spiffed_proto::admin as pb;
use spiffed_proto::admin::bundle_admin_server::{BundleAdmin, BundleAdminServer};
use tonic::{Request, Response, Status};

use crate::agent::Backend;

/// The bundle service on the admin socket.
pub(crate) struct BundleService {
    pub(crate) sources: EntrySources,
    pub(crate) backend: Backend,
    pub(crate) td: TrustDomain,
    pub(crate) admin_uids: Vec<u32>,
    pub(crate) own_uid: u32,
    /// Held from store to publish by each set and delete, so that concurrent calls for one
    /// trust domain leave the store and the published set agreeing.
    pub(crate) writes: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl BundleService {
    pub(crate) fn into_server(self) -> BundleAdminServer<Self> {
        // A document is at most MAX_BUNDLE_BYTES; leave room for the other fields so that an
        // oversized one gets the parser's clear error, not a transport one.
        BundleAdminServer::new(self).max_decoding_message_size(
            spiffed_core::spiffe_bundle::MAX_BUNDLE_BYTES.saturating_mul(2),
        )
    }

    fn bundles(&self) -> tokio::sync::watch::Receiver<std::sync::Arc<spiffed_core::BundleSet>> {
        match &self.backend {
            Backend::Standalone(ca) => ca.bundles(),
            Backend::Agent { issuer, .. } => issuer.bundles(),
        }
    }

    /// The CA and the store, or why federated bundles cannot be changed here.
    fn standalone(&self) -> Result<(CaAuthority, EntrySources), Status> {
        match &self.backend {
            Backend::Standalone(ca) if self.sources.store().is_some() => {
                Ok((ca.clone(), self.sources.clone()))
            }
            _ => Err(Status::failed_precondition(
                "this agent is in agent mode: its federated bundles come from the SPIRE Server; \
                 set them there (`spire-server bundle set` or `federation create`)",
            )),
        }
    }
}

/// Publishes the federated bundles kept in `store` into the CA's bundle set (at start). A
/// stored bundle that no longer parses (written by hand?) is left out with a warning.
pub(crate) fn load_stored(store: &Store, ca: &CaAuthority) -> Result<usize, Status> {
    let stored = store
        .bundles()
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut n = 0;
    for s in stored {
        match SpiffeBundle::parse(&s.trust_domain, s.document.as_bytes()) {
            Ok(p) => match ca.set_federated(p.bundle.to_trust_bundle()) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(trust_domain = %s.trust_domain, "stored federated bundle not served: {e}")
                }
            },
            Err(e) => tracing::warn!(
                trust_domain = %s.trust_domain,
                "stored federated bundle not served: it {e}; set it again with `spiffed bundle \
                 set --trust-domain {}` or remove it with `spiffed bundle delete --trust-domain {}`",
                s.trust_domain, s.trust_domain
            ),
        }
    }
    Ok(n)
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The admin API's view of a bundle.
fn bundle_msg(b: &SpiffeBundle, source: &str, updated_at: i64) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        spiffe_json: b.to_json(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: u32::try_from(b.jwt_authorities.len()).unwrap_or(u32::MAX),
        sequence: b.sequence.unwrap_or(0),
        refresh_hint_seconds: b.refresh_hint.map_or(0, |d| d.as_secs()),
        source: source.to_owned(),
        updated_at,
    }
}

/// A stored bundle as `ListFederatedBundles` reports it: without the document (`bundle show`
/// and `set` carry it), so that a list of many large bundles stays one small message.
fn stored_msg(s: &StoredBundle) -> pb::Bundle {
    let b = SpiffeBundle::parse(&s.trust_domain, s.document.as_bytes())
        .map_or_else(|_| SpiffeBundle::new(s.trust_domain.clone()), |p| p.bundle);
    pb::Bundle {
        spiffe_json: String::new(),
        ..bundle_msg(&b, &s.source, secs(s.updated_at))
    }
}

fn published_msg(b: &TrustBundle, source: &str) -> pb::Bundle {
    bundle_msg(&SpiffeBundle::from_trust_bundle(b, None), source, 0)
}

/// Checks a `SetFederatedBundle` request against `own` and parses its document.
pub(crate) fn parse_request(
    req: &pb::SetFederatedBundleRequest,
    own: &TrustDomain,
) -> Result<(TrustDomain, Parsed), Status> {
    if req.trust_domain.is_empty() {
        return Err(Status::invalid_argument(
            "the trust domain is required: pass --trust-domain, e.g. --trust-domain partner.example",
        ));
    }
    let td = TrustDomain::new(&req.trust_domain).map_err(|e| {
        Status::invalid_argument(format!(
            "{:?} is not a valid trust domain: {e}; pass a name such as partner.example",
            spiffed_core::untrusted::clip(&req.trust_domain)
        ))
    })?;
    if &td == own {
        return Err(Status::invalid_argument(format!(
            "{td} is this agent's own trust domain, whose bundle comes from its CA; a federated \
             bundle is another trust domain's (see `spiffed bundle show` for the own bundle)"
        )));
    }
    let source = spiffed_core::untrusted::clip(&req.source);
    let refused = |e: BundleError, fix: &str| {
        Status::invalid_argument(format!("the bundle from {source} {e}; {fix}"))
    };
    let parsed = match req.format.as_str() {
        "spiffe" | "" => SpiffeBundle::parse(&td, &req.document).map_err(|e| {
            refused(
                e,
                "pass the trust domain's SPIFFE bundle (e.g. `spire-server bundle show -format \
                 spiffe` or `spiffed bundle show --format spiffe` on its side), or use \
                 --format pem for a PEM file of CA certificates",
            )
        })?,
        "pem" => SpiffeBundle::parse_pem(&td, &req.document)
            .map(|bundle| Parsed {
                bundle,
                skipped: vec![],
            })
            .map_err(|e| {
                refused(
                    e,
                    "pass a PEM file of the trust domain's CA certificates, or use --format \
                     spiffe for a SPIFFE bundle (JWKS)",
                )
            })?,
        other => {
            return Err(Status::invalid_argument(format!(
                "format {:?} is not known; use spiffe or pem",
                spiffed_core::untrusted::clip(other)
            )));
        }
    };
    Ok((td, parsed))
}

#[tonic::async_trait]
impl BundleAdmin for BundleService {
    async fn get_own_bundle(
        &self,
        request: Request<pb::GetOwnBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        crate::admin::authorize(&request, self.own_uid, &self.admin_uids)?;
        let set = self.bundles().borrow().clone();
        let source = match self.backend {
            Backend::Standalone(_) => "ca",
            Backend::Agent { .. } => "spire_server",
        };
        Ok(Response::new(published_msg(set.own(), source)))
    }

    async fn list_federated_bundles(
        &self,
        request: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        crate::admin::authorize(&request, self.own_uid, &self.admin_uids)?;
        let bundles = match (&self.backend, self.sources.store()) {
            (Backend::Standalone(_), Some(_)) => {
                let sources = self.sources.clone();
                tokio::task::spawn_blocking(move || sources.store().map(Store::bundles).transpose())
                    .await
                    .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
                    .map_err(|e| Status::unavailable(e.to_string()))?
                    .unwrap_or_default()
                    .iter()
                    .map(stored_msg)
                    .collect()
            }
            _ => {
                let set = self.bundles().borrow().clone();
                set.federated()
                    .map(|b| published_msg(b, "spire_server"))
                    .collect()
            }
        };
        Ok(Response::new(pb::ListFederatedBundlesResponse { bundles }))
    }

    async fn set_federated_bundle(
        &self,
        request: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::SetFederatedBundleResponse>, Status> {
        let who = crate::admin::authorize(&request, self.own_uid, &self.admin_uids)?;
        let (ca, sources) = self.standalone()?;
        let req = request.into_inner();
        let (td, parsed) = parse_request(&req, &self.td).inspect_err(|e| {
            tracing::info!(uid = who.uid, reason = %e.message(), "federated bundle refused");
        })?;
        let document = parsed.bundle.to_json();
        let _write = self.writes.lock().await;
        let source = if req.source.is_empty() {
            "admin API".to_owned()
        } else {
            spiffed_core::untrusted::clip(&req.source)
        };
        let stored = {
            let (td, source) = (td.clone(), source.clone());
            tokio::task::spawn_blocking(move || {
                sources
                    .store()
                    .map(|s| s.put_bundle(&td, &document, &source))
            })
            .await
            .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
            .transpose()
            .map_err(|e| Status::unavailable(e.to_string()))?
        };
        // Stored first: what workloads receive survives a restart.
        ca.set_federated(parsed.bundle.to_trust_bundle())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(
            uid = who.uid,
            trust_domain = %td,
            x509_authorities = parsed.bundle.x509_authorities.len(),
            jwt_authorities = parsed.bundle.jwt_authorities.len(),
            source = %source,
            "federated bundle set"
        );
        for why in &parsed.skipped {
            tracing::warn!(trust_domain = %td, "federated bundle: {why}");
        }
        let updated_at = stored.as_ref().map_or(0, |s| secs(s.updated_at));
        Ok(Response::new(pb::SetFederatedBundleResponse {
            bundle: Some(bundle_msg(&parsed.bundle, &source, updated_at)),
            skipped: parsed.skipped,
        }))
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        let who = crate::admin::authorize(&request, self.own_uid, &self.admin_uids)?;
        let (ca, sources) = self.standalone()?;
        let name = request.into_inner().trust_domain;
        let td = TrustDomain::new(&name).map_err(|e| {
            Status::invalid_argument(format!(
                "{:?} is not a valid trust domain: {e}",
                spiffed_core::untrusted::clip(&name)
            ))
        })?;
        let _write = self.writes.lock().await;
        let deleted = {
            let td = td.clone();
            tokio::task::spawn_blocking(move || sources.store().map(|s| s.delete_bundle(&td)))
                .await
                .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
                .transpose()
                .map_err(|e| Status::unavailable(e.to_string()))?
                .unwrap_or(false)
        };
        if !deleted {
            return Err(Status::not_found(format!(
                "there is no federated bundle for {td}; see `spiffed bundle list`"
            )));
        }
        ca.remove_federated(&td);
        tracing::info!(uid = who.uid, trust_domain = %td, "federated bundle deleted");
        Ok(Response::new(pb::DeleteFederatedBundleResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(td: &str, format: &str, doc: &str) -> pb::SetFederatedBundleRequest {
        pb::SetFederatedBundleRequest {
            trust_domain: td.into(),
            format: format.into(),
            document: doc.as_bytes().to_vec(),
            source: "b.json".into(),
        }
    }

    #[test]
    fn requests_are_checked_naming_the_problem_and_the_fix() {
        let own = TrustDomain::new("example.org").unwrap();
        let msg = |r: pb::SetFederatedBundleRequest| {
            parse_request(&r, &own).unwrap_err().message().to_owned()
        };
        assert!(msg(req("", "spiffe", "{}")).contains("--trust-domain"));
        assert!(msg(req("Not A TD", "spiffe", "{}")).contains("not a valid trust domain"));
        let m = msg(req("example.org", "spiffe", r#"{"keys":[]}"#));
        assert!(m.contains("own trust domain"), "{m}");
        let m = msg(req("other.org", "spiffe", "garbage"));
        assert!(
            m.starts_with("the bundle from b.json is not a SPIFFE bundle"),
            "{m}"
        );
        assert!(m.contains("--format pem"), "{m}");
        let m = msg(req("other.org", "pem", "garbage"));
        assert!(m.contains("holds no PEM certificate"), "{m}");
        assert!(msg(req("other.org", "der", "")).contains("use spiffe or pem"));
        let (td, p) = parse_request(&req("other.org", "spiffe", r#"{"keys":[]}"#), &own).unwrap();
        assert_eq!(td.as_str(), "other.org");
        assert!(p.bundle.x509_authorities.is_empty());
    }
}
