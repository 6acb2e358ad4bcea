//! `Entry/SyncAuthorizedEntries`, as spire-agent runs it (SPIRE-AGENT.md §3,
//! `pkg/agent/client/client.go`), with `GetAuthorizedEntries` for servers without it.
//!
//! 1. Open the stream and send the output mask (it must ask for `revision_number`).
//! 2. The server answers either once with every entry in full (≤ one page), or with pages of
//!    `(id, revision_number, created_at)` revisions, `more` set on all but the last.
//! 3. An entry is fetched in full if it is not cached, its revision differs, or its
//!    `created_at` differs (an entry deleted and re-created with the same id; 0 from older
//!    servers means unknown and is not compared).
//! 4. The ids are requested in sorted chunks of the server's page size; each request is
//!    answered by entry pages, `more` set on all but the last.
//! 5. The agent half-closes the stream.

use std::collections::HashMap;

use spiffed_proto::spire::entry::entry_client::EntryClient;
use spiffed_proto::spire::entry::{
    GetAuthorizedEntriesRequest, SyncAuthorizedEntriesRequest, SyncAuthorizedEntriesResponse,
};
use spiffed_proto::spire::types;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::link::rpc::CallError;
use crate::server::{AuthorizedEntries, EntryVersion};

/// The largest message accepted from the entry API (10,000 entries in one
/// `GetAuthorizedEntries` answer fit well within it).
const MAX_MESSAGE: usize = 64 << 20;

/// The fields spire-agent asks for (`pkg/agent/client/client.go` `entryOutputMask`); the
/// server applies TTLs, DNS names and the parent itself when it signs.
pub(crate) fn output_mask() -> types::EntryMask {
    types::EntryMask {
        spiffe_id: true,
        selectors: true,
        federates_with: true,
        admin: true,
        downstream: true,
        revision_number: true,
        store_svid: true,
        hint: true,
        created_at: true,
        ..Default::default()
    }
}

fn stale(cached: Option<&EntryVersion>, revision: i64, created_at: i64) -> bool {
    match cached {
        None => true,
        Some(v) => v.revision != revision || (created_at != 0 && v.created_at != created_at),
    }
}

/// Judges a full list of entries against the cache.
fn from_full_list(
    entries: Vec<types::Entry>,
    cached: &HashMap<String, EntryVersion>,
) -> AuthorizedEntries {
    let mut out = AuthorizedEntries::default();
    for e in entries {
        if e.id.is_empty() {
            tracing::warn!("the SPIRE Server sent an entry without an id; ignored");
            continue;
        }
        out.authorized.push(e.id.clone());
        if stale(cached.get(&e.id), e.revision_number, e.created_at) {
            out.changed.push(e);
        }
    }
    out
}

async fn next(
    stream: &mut tonic::Streaming<SyncAuthorizedEntriesResponse>,
) -> Result<SyncAuthorizedEntriesResponse, CallError> {
    stream.message().await?.ok_or_else(|| {
        CallError::Invalid("the entry sync stream ended before the sync was complete".to_owned())
    })
}

/// `SyncAuthorizedEntries` over `channel`; `Unimplemented` is returned as a status for the
/// caller to fall back to [`get_authorized`].
pub(crate) async fn sync(
    channel: Channel,
    cached: &HashMap<String, EntryVersion>,
) -> Result<AuthorizedEntries, CallError> {
    let mut client = EntryClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let first = SyncAuthorizedEntriesRequest {
        output_mask: Some(output_mask()),
        ids: Vec::new(),
    };
    tx.send(first)
        .await
        .map_err(|_| CallError::Invalid("the entry sync stream closed".to_owned()))?;
    let mut stream = client
        .sync_authorized_entries(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut resp = next(&mut stream).await?;
    if resp.entry_revisions.is_empty() {
        return Ok(from_full_list(resp.entries, cached));
    }

    let page_size = resp.entry_revisions.len();
    let mut out = AuthorizedEntries::default();
    let mut needed = Vec::new();
    loop {
        if !resp.entries.is_empty() {
            return Err(CallError::Invalid(
                "entries in a page of entry revisions".to_owned(),
            ));
        }
        for rev in resp.entry_revisions {
            if rev.id.is_empty() || rev.revision_number < 0 {
                tracing::warn!(
                    id = %rev.id,
                    revision = rev.revision_number,
                    "the SPIRE Server sent a malformed entry revision; ignored"
                );
                continue;
            }
            if stale(cached.get(&rev.id), rev.revision_number, rev.created_at) {
                needed.push(rev.id.clone());
            }
            out.authorized.push(rev.id);
        }
        if !resp.more {
            break;
        }
        resp = next(&mut stream).await?;
    }

    needed.sort_unstable();
    needed.dedup();
    tracing::debug!(
        authorized = out.authorized.len(),
        page_size,
        fetching = needed.len(),
        "entry sync by revisions"
    );
    for ids in needed.chunks(page_size) {
        let req = SyncAuthorizedEntriesRequest {
            output_mask: None,
            ids: ids.to_vec(),
        };
        tx.send(req).await.map_err(|_| {
            CallError::Invalid("the server closed the entry sync stream".to_owned())
        })?;
        loop {
            let page = next(&mut stream).await?;
            if !page.entry_revisions.is_empty() {
                return Err(CallError::Invalid(
                    "entry revisions in an answer to a request for entries".to_owned(),
                ));
            }
            for e in page.entries {
                if e.id.is_empty() {
                    tracing::warn!("the SPIRE Server sent an entry without an id; ignored");
                    continue;
                }
                out.changed.push(e);
            }
            if !page.more {
                break;
            }
        }
    }
    // Half-close: the server takes the end of the stream as the end of the sync.
    drop(tx);
    Ok(out)
}

/// `GetAuthorizedEntries`: every entry in full, judged against the cache.
pub(crate) async fn get_authorized(
    channel: Channel,
    cached: &HashMap<String, EntryVersion>,
) -> Result<AuthorizedEntries, CallError> {
    let resp = EntryClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .get_authorized_entries(GetAuthorizedEntriesRequest {
            output_mask: Some(output_mask()),
        })
        .await?
        .into_inner();
    Ok(from_full_list(resp.entries, cached))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_follows_revision_and_creation() {
        let v = EntryVersion {
            revision: 3,
            created_at: 100,
        };
        assert!(stale(None, 3, 100));
        assert!(!stale(Some(&v), 3, 100));
        assert!(stale(Some(&v), 4, 100));
        // Deleted and re-created with the same id and revision.
        assert!(stale(Some(&v), 3, 101));
        // A server that does not send created_at.
        assert!(!stale(Some(&v), 3, 0));
    }

    #[test]
    fn the_mask_asks_for_revisions() {
        let m = output_mask();
        assert!(m.revision_number && m.created_at && m.spiffe_id && m.selectors);
        assert!(!m.parent_id && !m.x509_svid_ttl && !m.dns_names);
    }
}
