//! What the admin commands print: readable text for people, JSON for scripts.
//!
//! Every function here is pure. Text output passes strings from the agent through [`clean`],
//! so an entry's hint or selector cannot send escape sequences to a terminal. JSON field names
//! are stable (they are the CLI's public interface): `id`, `spiffe_id`, `selectors`,
//! `x509_svid_ttl_seconds`, `jwt_svid_ttl_seconds`, `hint`, `dns_names`, `federates_with`,
//! `source`, `revision`,
//! `created_at`, `updated_at`. A TTL of "agent default" is `null`, no hint is `null`, and the
//! times are RFC 3339 (`null` for config-file entries, which have none).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use spiffed_proto::admin::{
    DeleteResult, Entry, EntryError, EntryResult, EntrySpec, ExplainResponse, StatusResponse,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Replaces control characters with their escapes, for terminal output.
pub(crate) fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Unix seconds as RFC 3339 (UTC); `None` for 0 (no time) or a time out of range.
pub(crate) fn rfc3339(unix_seconds: i64) -> Option<String> {
    if unix_seconds == 0 {
        return None;
    }
    OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// A TTL for people: `10m`, or `agent default` for 0.
fn ttl_text(seconds: u64) -> String {
    if seconds == 0 {
        "agent default".to_owned()
    } else {
        humantime::format_duration(Duration::from_secs(seconds)).to_string()
    }
}

/// A TTL for scripts: seconds, or `null` for the agent default.
fn ttl_json(seconds: u64) -> Value {
    if seconds == 0 {
        Value::Null
    } else {
        Value::from(seconds)
    }
}

/// An entry's spec, or an empty one if the agent sent none.
fn spec_of(entry: &Entry) -> EntrySpec {
    entry.spec.clone().unwrap_or_default()
}

/// One entry as a JSON object with the stable field names.
pub(crate) fn entry_json(entry: &Entry) -> Value {
    let spec = spec_of(entry);
    json!({
        "id": entry.id,
        "spiffe_id": spec.spiffe_id,
        "selectors": spec.selectors,
        "x509_svid_ttl_seconds": ttl_json(spec.x509_svid_ttl_seconds),
        "jwt_svid_ttl_seconds": ttl_json(spec.jwt_svid_ttl_seconds),
        "hint": (!spec.hint.is_empty()).then_some(spec.hint),
        "dns_names": spec.dns_names,
        "federates_with": spec.federates_with,
        "source": entry.source,
        "revision": entry.revision,
        "created_at": rfc3339(entry.created_at),
        "updated_at": rfc3339(entry.updated_at),
    })
}

/// A list of entries as a JSON array.
pub(crate) fn entries_json(entries: &[Entry]) -> Value {
    Value::Array(entries.iter().map(entry_json).collect())
}

/// One entry, every field, one per line (`entry show`, and what `create`/`update` made). No
/// trailing newline.
pub(crate) fn entry_text(entry: &Entry) -> String {
    let spec = spec_of(entry);
    let mut out = String::new();
    let _ = writeln!(out, "ID:              {}", clean(&entry.id));
    let _ = writeln!(out, "SPIFFE ID:       {}", clean(&spec.spiffe_id));
    push_list(&mut out, "Selectors:       ", &spec.selectors);
    let _ = writeln!(
        out,
        "X.509-SVID TTL:  {}",
        ttl_text(spec.x509_svid_ttl_seconds)
    );
    let _ = writeln!(
        out,
        "JWT-SVID TTL:    {}",
        ttl_text(spec.jwt_svid_ttl_seconds)
    );
    let hint = if spec.hint.is_empty() {
        "(none)".to_owned()
    } else {
        clean(&spec.hint)
    };
    let _ = writeln!(out, "Hint:            {hint}");
    push_list(&mut out, "DNS names:       ", &spec.dns_names);
    push_list(&mut out, "Federates with:  ", &spec.federates_with);
    let _ = writeln!(out, "Source:          {}", clean(&entry.source));
    let _ = writeln!(out, "Revision:        {}", entry.revision);
    let created = rfc3339(entry.created_at).unwrap_or_else(|| "-".to_owned());
    let updated = rfc3339(entry.updated_at).unwrap_or_else(|| "-".to_owned());
    let _ = writeln!(out, "Created:         {created}");
    let _ = write!(out, "Updated:         {updated}");
    out
}

/// `label` and the first item on one line, the others aligned under it; `(none)` if empty.
fn push_list(out: &mut String, label: &str, items: &[String]) {
    let indent = " ".repeat(label.chars().count());
    if items.is_empty() {
        let _ = writeln!(out, "{label}(none)");
    }
    for (i, item) in items.iter().enumerate() {
        let lead = if i == 0 { label } else { indent.as_str() };
        let _ = writeln!(out, "{lead}{}", clean(item));
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded. No
/// trailing newline.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            if i + 1 < widths.len() {
                let pad = width.saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.trim_end().to_owned()
    };
    let mut lines = vec![line(&mut headers.iter().copied())];
    for row in rows {
        lines.push(line(&mut row.iter().map(String::as_str)));
    }
    lines.join("\n")
}

/// `entry list` as a table: ID, SPIFFE ID, SELECTORS (comma-separated), SOURCE, REVISION. No
/// trailing newline.
pub(crate) fn list_table(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "No entries.".to_owned();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| {
            let spec = spec_of(entry);
            vec![
                clean(&entry.id),
                clean(&spec.spiffe_id),
                clean(&spec.selectors.join(",")),
                clean(&entry.source),
                entry.revision.to_string(),
            ]
        })
        .collect();
    table(
        &["ID", "SPIFFE ID", "SELECTORS", "SOURCE", "REVISION"],
        &rows,
    )
}

/// A per-entry error as `field: message` (just the message when no field is named).
pub(crate) fn entry_error_text(error: &EntryError) -> String {
    if error.field.is_empty() {
        clean(&error.message)
    } else {
        format!("{}: {}", clean(&error.field), clean(&error.message))
    }
}

/// A per-entry error as `{"field": ..., "message": ...}` (`field` null when none is named).
fn entry_error_json(error: &EntryError) -> Value {
    json!({
        "field": (!error.field.is_empty()).then_some(error.field.as_str()),
        "message": error.message,
    })
}

/// One line for a batch create result: `created  ID  SPIFFE_ID` or `failed   #N SPIFFE_ID
/// field: message`, where N counts specs from 1 and the SPIFFE ID is the one requested.
pub(crate) fn create_result_line(
    index: usize,
    requested: Option<&EntrySpec>,
    result: &EntryResult,
) -> String {
    let requested_id = requested.map_or("", |s| s.spiffe_id.as_str());
    match (&result.entry, &result.error) {
        (_, Some(error)) => format!(
            "failed   #{} {}  {}",
            index + 1,
            clean(requested_id),
            entry_error_text(error)
        ),
        (Some(entry), None) => format!(
            "created  {}  {}",
            clean(&entry.id),
            clean(&spec_of(entry).spiffe_id)
        ),
        (None, None) => format!(
            "failed   #{} {}  the agent answered with neither an entry nor an error",
            index + 1,
            clean(requested_id)
        ),
    }
}

/// One create result as `{"entry": {...} | null, "error": {...} | null}`.
pub(crate) fn create_result_json(result: &EntryResult) -> Value {
    json!({
        "entry": result.entry.as_ref().map(entry_json),
        "error": result.error.as_ref().map(entry_error_json),
    })
}

/// One line for a delete result: `deleted  ID` or `failed   ID  field: message`.
pub(crate) fn delete_result_line(result: &DeleteResult) -> String {
    match &result.error {
        None => format!("deleted  {}", clean(&result.id)),
        Some(error) => format!(
            "failed   {}  {}",
            clean(&result.id),
            entry_error_text(error)
        ),
    }
}

/// One delete result as `{"id": ..., "deleted": bool, "error": {...} | null}`.
pub(crate) fn delete_result_json(result: &DeleteResult) -> Value {
    json!({
        "id": result.id,
        "deleted": result.error.is_none(),
        "error": result.error.as_ref().map(entry_error_json),
    })
}

/// `explain` for people: the process, its selectors, each entry's verdict, the identities. No
/// trailing newline.
pub(crate) fn explain_text(r: &ExplainResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "PID:  {}", r.pid);
    let _ = writeln!(out, "UID:  {}", r.uid);
    let _ = writeln!(out, "GID:  {}", r.gid);
    let exe = if r.exe.is_empty() {
        "(unknown)".to_owned()
    } else {
        clean(&r.exe)
    };
    let _ = writeln!(out, "Exe:  {exe}");
    out.push('\n');
    if r.selectors.is_empty() {
        out.push_str("Selectors: none\n");
    } else {
        let _ = writeln!(out, "Selectors ({}):", r.selectors.len());
        for selector in &r.selectors {
            let _ = writeln!(out, "  {}", clean(selector));
        }
    }
    if !r.left_out.is_empty() {
        out.push_str("Left out (entries that need these do not match):\n");
        for left_out in &r.left_out {
            let _ = writeln!(out, "  {}", clean(left_out));
        }
    }
    out.push('\n');
    if r.entries.is_empty() {
        out.push_str("Entries: none matches or shares a selector with this process\n");
    } else {
        out.push_str("Entries:\n");
        let rows: Vec<(String, String, String)> = r
            .entries
            .iter()
            .map(|verdict| {
                let entry = verdict.entry.clone().unwrap_or_default();
                let verdict_word = if verdict.matched { "MATCH" } else { "MISS" };
                let mut tail = clean(&spec_of(&entry).spiffe_id);
                if !verdict.matched {
                    let missing: Vec<String> = verdict.missing.iter().map(|s| clean(s)).collect();
                    let _ = write!(tail, "  missing: {}", missing.join(", "));
                }
                (verdict_word.to_owned(), clean(&entry.id), tail)
            })
            .collect();
        let id_width = rows
            .iter()
            .map(|(_, id, _)| id.chars().count())
            .max()
            .unwrap_or(0);
        for (word, id, tail) in rows {
            let pad = id_width.saturating_sub(id.chars().count());
            let _ = writeln!(out, "{word:<6} {id}{} {tail}", " ".repeat(pad));
        }
    }
    out.push('\n');
    if r.identities.is_empty() {
        out.push_str("No identity would be issued: no entry matches");
    } else {
        if r.synthetic {
            out.push_str(
                "Identities (synthetic: no entry matches, and the agent issues synthetic IDs):",
            );
        } else {
            out.push_str("Identities:");
        }
        for (i, id) in r.identities.iter().enumerate() {
            let _ = write!(
                out,
                "\n  {}{}",
                clean(id),
                if i == 0 && r.identities.len() > 1 {
                    "  (default)"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// `explain` for scripts: the response, with entries in the stable entry form.
pub(crate) fn explain_json(r: &ExplainResponse) -> Value {
    let entries: Vec<Value> = r
        .entries
        .iter()
        .map(|verdict| {
            json!({
                "entry": verdict.entry.as_ref().map(entry_json),
                "matched": verdict.matched,
                "missing": verdict.missing,
            })
        })
        .collect();
    json!({
        "pid": r.pid,
        "uid": r.uid,
        "gid": r.gid,
        "exe": (!r.exe.is_empty()).then_some(r.exe.as_str()),
        "selectors": r.selectors,
        "entries": entries,
        "identities": r.identities,
        "synthetic": r.synthetic,
        "left_out": r.left_out,
    })
}

/// A time for people: `2026-12-02T10:00:00Z (in 40m)` or `(... ago)`, relative to `now`
/// (Unix seconds); `never` for 0.
fn when(unix_seconds: i64, now: i64) -> String {
    let Some(at) = rfc3339(unix_seconds) else {
        return "never".to_owned();
    };
    let delta = unix_seconds - now;
    let span = humantime::format_duration(Duration::from_secs(delta.unsigned_abs()));
    if delta >= 0 {
        format!("{at} (in {span})")
    } else {
        format!("{at} ({span} ago)")
    }
}

/// `spiffed status` for people; `now` is Unix seconds.
pub(crate) fn status_text(s: &StatusResponse, now: i64) -> String {
    let mut out = String::new();
    let row = |out: &mut String, label: &str, value: &str| {
        let _ = writeln!(out, "{:<16}{}", format!("{label}:"), value);
    };
    row(&mut out, "version", &clean(&s.version));
    let uptime = humantime::format_duration(Duration::from_secs(s.uptime_seconds));
    row(
        &mut out,
        "uptime",
        &format!(
            "{uptime} (since {})",
            rfc3339(s.started_at).unwrap_or_else(|| "?".into())
        ),
    );
    row(&mut out, "mode", &clean(&s.mode));
    row(&mut out, "trust domain", &clean(&s.trust_domain));
    row(&mut out, "socket", &clean(&s.socket_path));
    let ready = if s.ready { "yes" } else { "NO" };
    row(
        &mut out,
        "ready",
        &format!("{ready}: {}", clean(&s.ready_reason)),
    );
    let what = if s.authority == "agent_svid" {
        "agent SVID"
    } else {
        "CA"
    };
    let validity = match (s.authority_not_before, s.authority_not_after) {
        (_, 0) => "none".to_owned(),
        (0, after) => format!("expires {}", when(after, now)),
        (before, after) => format!(
            "valid from {} to {}",
            rfc3339(before).unwrap_or_default(),
            when(after, now)
        ),
    };
    row(&mut out, what, &validity);
    if s.mode == "agent" {
        row(&mut out, "SPIRE Server", &clean(&s.server_address));
        if !s.agent_id.is_empty() {
            row(&mut out, "agent ID", &clean(&s.agent_id));
        }
        let mut readiness = clean(&s.readiness);
        if !s.readiness_reason.is_empty() {
            readiness = format!("{readiness}: {}", clean(&s.readiness_reason));
        }
        row(&mut out, "link", &readiness);
        row(&mut out, "last sync", &when(s.last_sync, now));
    }
    row(&mut out, "entries", &s.entries.to_string());
    let earliest = if s.x509_svids_cached == 0 {
        String::new()
    } else {
        format!(
            ", the first expires {}",
            when(s.x509_svid_earliest_expiry, now)
        )
    };
    row(
        &mut out,
        "X.509-SVIDs",
        &format!(
            "{} cached{earliest}; {} minted since start",
            s.x509_svids_cached, s.x509_mints
        ),
    );
    row(
        &mut out,
        "last rotation",
        &format!(
            "{} ({} rotated since start)",
            when(s.last_rotation, now),
            s.x509_rotations
        ),
    );
    row(
        &mut out,
        "open",
        &format!("{} connections, {} streams", s.connections, s.streams),
    );
    out
}

/// `spiffed status --output json`: times as RFC 3339 (`null`: unknown or never).
pub(crate) fn status_json(s: &StatusResponse) -> Value {
    let t = |secs: i64| rfc3339(secs).map_or(Value::Null, Value::from);
    let agent = (s.mode == "agent").then(|| {
        json!({
            "server_address": s.server_address,
            "agent_id": if s.agent_id.is_empty() { Value::Null } else { s.agent_id.clone().into() },
            "readiness": s.readiness,
            "reason": if s.readiness_reason.is_empty() { Value::Null } else { s.readiness_reason.clone().into() },
            "last_sync": t(s.last_sync),
        })
    });
    json!({
        "version": s.version,
        "uptime_seconds": s.uptime_seconds,
        "started_at": t(s.started_at),
        "mode": s.mode,
        "trust_domain": s.trust_domain,
        "socket_path": s.socket_path,
        "ready": s.ready,
        "ready_reason": s.ready_reason,
        "authority": {
            "kind": s.authority,
            "not_before": t(s.authority_not_before),
            "not_after": t(s.authority_not_after),
        },
        "entries": s.entries,
        "x509_svids": {
            "cached": s.x509_svids_cached,
            "earliest_expiry": t(s.x509_svid_earliest_expiry),
            "minted": s.x509_mints,
            "rotated": s.x509_rotations,
            "last_rotation": t(s.last_rotation),
        },
        "connections": s.connections,
        "streams": s.streams,
        "agent": agent,
    })
}

#[cfg(test)]
mod tests {
    use spiffed_proto::admin::EntryVerdict;

    use super::*;

    fn web() -> Entry {
        Entry {
            id: "0f2c9a".to_owned(),
            spec: Some(EntrySpec {
                spiffe_id: "spiffe://example.org/web".to_owned(),
                selectors: vec![
                    "unix:uid:1000".to_owned(),
                    "unix:path:/usr/bin/web".to_owned(),
                ],
                x509_svid_ttl_seconds: 600,
                jwt_svid_ttl_seconds: 0,
                hint: "internal".to_owned(),
                dns_names: vec!["web.internal".to_owned()],
                admin: false,
                federates_with: vec!["partner.example".to_owned()],
            }),
            source: "store".to_owned(),
            revision: 3,
            created_at: 1_700_000_000,
            updated_at: 1_700_000_600,
        }
    }

    fn config_db() -> Entry {
        Entry {
            id: "config-0000".to_owned(),
            spec: Some(EntrySpec {
                spiffe_id: "spiffe://example.org/db".to_owned(),
                selectors: vec!["unix:uid:5432".to_owned()],
                ..EntrySpec::default()
            }),
            source: "config".to_owned(),
            revision: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn table_pads_all_but_the_last_column() {
        let text = table(
            &["A", "LONG HEADER", "Z"],
            &[
                vec!["xyz".to_owned(), "1".to_owned(), "last".to_owned()],
                vec!["é".to_owned(), String::new(), String::new()],
            ],
        );
        assert_eq!(text, "A    LONG HEADER  Z\nxyz  1            last\né");
    }

    #[test]
    fn list_table_has_the_five_columns() {
        let text = list_table(&[web(), config_db()]);
        let expected = "\
ID           SPIFFE ID                 SELECTORS                             SOURCE  REVISION
0f2c9a       spiffe://example.org/web  unix:uid:1000,unix:path:/usr/bin/web  store   3
config-0000  spiffe://example.org/db   unix:uid:5432                         config  1";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_list_says_so() {
        assert_eq!(list_table(&[]), "No entries.");
    }

    #[test]
    fn entry_text_shows_every_field() {
        let expected = "\
ID:              0f2c9a
SPIFFE ID:       spiffe://example.org/web
Selectors:       unix:uid:1000
                 unix:path:/usr/bin/web
X.509-SVID TTL:  10m
JWT-SVID TTL:    agent default
Hint:            internal
DNS names:       web.internal
Federates with:  partner.example
Source:          store
Revision:        3
Created:         2023-11-14T22:13:20Z
Updated:         2023-11-14T22:23:20Z";
        assert_eq!(entry_text(&web()), expected);
    }

    #[test]
    fn entry_text_for_a_config_entry() {
        let text = entry_text(&config_db());
        assert!(text.contains("Hint:            (none)\n"), "{text}");
        assert!(text.contains("DNS names:       (none)\n"), "{text}");
        assert!(text.contains("Source:          config\n"), "{text}");
        assert!(
            text.ends_with("Created:         -\nUpdated:         -"),
            "{text}"
        );
    }

    #[test]
    fn entry_json_has_the_stable_fields() {
        assert_eq!(
            entry_json(&web()),
            json!({
                "id": "0f2c9a",
                "spiffe_id": "spiffe://example.org/web",
                "selectors": ["unix:uid:1000", "unix:path:/usr/bin/web"],
                "x509_svid_ttl_seconds": 600,
                "jwt_svid_ttl_seconds": null,
                "hint": "internal",
                "dns_names": ["web.internal"],
                "federates_with": ["partner.example"],
                "source": "store",
                "revision": 3,
                "created_at": "2023-11-14T22:13:20Z",
                "updated_at": "2023-11-14T22:23:20Z",
            })
        );
        let db = entry_json(&config_db());
        assert_eq!(db["hint"], Value::Null);
        assert_eq!(db["created_at"], Value::Null);
        assert_eq!(db["dns_names"], json!([]));
    }

    #[test]
    fn text_escapes_control_characters() {
        let mut entry = web();
        if let Some(spec) = entry.spec.as_mut() {
            spec.hint = "a\u{1b}[31mb\n".to_owned();
        }
        let text = entry_text(&entry);
        assert!(
            text.contains("Hint:            a\\u{1b}[31mb\\n\n"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn result_lines() {
        let spec = web().spec.unwrap_or_default();
        let ok = EntryResult {
            entry: Some(web()),
            error: None,
        };
        assert_eq!(
            create_result_line(0, Some(&spec), &ok),
            "created  0f2c9a  spiffe://example.org/web"
        );
        let bad = EntryResult {
            entry: None,
            error: Some(EntryError {
                field: "selectors[1]".to_owned(),
                message: "unknown selector type \"k8s\"".to_owned(),
            }),
        };
        assert_eq!(
            create_result_line(1, Some(&spec), &bad),
            "failed   #2 spiffe://example.org/web  selectors[1]: unknown selector type \"k8s\""
        );
        assert_eq!(
            create_result_json(&bad),
            json!({"entry": null, "error": {"field": "selectors[1]", "message": "unknown selector type \"k8s\""}})
        );
        let gone = DeleteResult {
            id: "x1".to_owned(),
            error: Some(EntryError {
                field: String::new(),
                message: "no entry x1".to_owned(),
            }),
        };
        assert_eq!(delete_result_line(&gone), "failed   x1  no entry x1");
        assert_eq!(
            delete_result_json(&gone),
            json!({"id": "x1", "deleted": false, "error": {"field": null, "message": "no entry x1"}})
        );
        let done = DeleteResult {
            id: "x2".to_owned(),
            error: None,
        };
        assert_eq!(delete_result_line(&done), "deleted  x2");
    }

    fn explained() -> ExplainResponse {
        ExplainResponse {
            pid: 4242,
            uid: 1000,
            gid: 100,
            exe: "/usr/bin/web".to_owned(),
            selectors: vec!["unix:uid:1000".to_owned(), "unix:gid:100".to_owned()],
            entries: vec![
                EntryVerdict {
                    entry: Some(web()),
                    matched: false,
                    missing: vec!["unix:path:/usr/bin/web".to_owned()],
                },
                EntryVerdict {
                    entry: Some(config_db()),
                    matched: true,
                    missing: vec![],
                },
            ],
            identities: vec!["spiffe://example.org/db".to_owned()],
            synthetic: false,
            left_out: vec![],
        }
    }

    #[test]
    fn explain_text_lists_verdicts_and_identities() {
        let expected = "\
PID:  4242
UID:  1000
GID:  100
Exe:  /usr/bin/web

Selectors (2):
  unix:uid:1000
  unix:gid:100

Entries:
MISS   0f2c9a      spiffe://example.org/web  missing: unix:path:/usr/bin/web
MATCH  config-0000 spiffe://example.org/db

Identities:
  spiffe://example.org/db";
        assert_eq!(explain_text(&explained()), expected);
    }

    #[test]
    fn explain_text_without_identity_or_synthetic() {
        let mut r = explained();
        r.entries.clear();
        r.identities.clear();
        let text = explain_text(&r);
        assert!(text.contains("Entries: none matches"), "{text}");
        assert!(
            text.ends_with("No identity would be issued: no entry matches"),
            "{text}"
        );
        r.synthetic = true;
        r.identities = vec!["spiffe://dev.local/uid-1000/web".to_owned()];
        let text = explain_text(&r);
        assert!(
            text.ends_with("(synthetic: no entry matches, and the agent issues synthetic IDs):\n  spiffe://dev.local/uid-1000/web"),
            "{text}"
        );
    }

    #[test]
    fn explain_json_shape() {
        let value = explain_json(&explained());
        assert_eq!(value["pid"], 4242);
        assert_eq!(value["exe"], "/usr/bin/web");
        assert_eq!(value["entries"][0]["matched"], false);
        assert_eq!(
            value["entries"][0]["missing"],
            json!(["unix:path:/usr/bin/web"])
        );
        assert_eq!(value["entries"][0]["entry"]["id"], "0f2c9a");
        assert_eq!(value["entries"][1]["entry"]["source"], "config");
        assert_eq!(value["identities"], json!(["spiffe://example.org/db"]));
        assert_eq!(value["synthetic"], false);
        assert_eq!(value["left_out"], json!([]));
    }

    #[test]
    fn explain_text_says_what_was_left_out() {
        let mut r = explained();
        r.left_out = vec!["unix:path: /usr/bin/web is not the file the process runs".to_owned()];
        let text = explain_text(&r);
        assert!(
            text.contains(
                "  unix:gid:100\nLeft out (entries that need these do not match):\n  unix:path: \
                 /usr/bin/web is not the file the process runs\n\nEntries:"
            ),
            "{text}"
        );
        assert_eq!(explain_json(&r)["left_out"][0], json!(r.left_out[0]));
    }

    #[test]
    fn status_text_and_json_show_what_an_operator_asks() {
        let s = StatusResponse {
            version: "0.1.0".into(),
            uptime_seconds: 3700,
            started_at: 1_800_000_000,
            mode: "standalone".into(),
            trust_domain: "example.org".into(),
            authority: "ca".into(),
            authority_not_before: 1_800_000_000,
            authority_not_after: 1_800_086_400,
            entries: 3,
            x509_svids_cached: 2,
            x509_svid_earliest_expiry: 1_800_005_400,
            connections: 4,
            streams: 5,
            x509_mints: 6,
            x509_rotations: 1,
            last_rotation: 1_800_003_600,
            ready: true,
            ready_reason: "serving".into(),
            socket_path: "/run/spiffed/public/api.sock".into(),
            ..Default::default()
        };
        let text = status_text(&s, 1_800_003_700);
        assert!(text.contains("mode:           standalone"), "{text}");
        assert!(
            text.contains("CA:             valid from 2027-01-15T08:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains(
                "X.509-SVIDs:    2 cached, the first expires 2027-01-15T09:30:00Z (in 28m 20s)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "last rotation:  2027-01-15T09:00:00Z (1m 40s ago) (1 rotated since start)"
            ),
            "{text}"
        );
        assert!(
            text.contains("open:           4 connections, 5 streams"),
            "{text}"
        );
        assert!(!text.contains("SPIRE Server"), "{text}");
        let j = status_json(&s);
        assert_eq!(j["x509_svids"]["last_rotation"], "2027-01-15T09:00:00Z");
        assert_eq!(j["authority"]["kind"], "ca");
        assert_eq!(j["agent"], Value::Null);
        assert_eq!(j["streams"], 5);
    }
}
