//! `spiffed bundle show|list|set|delete`: trust bundles over the admin socket
//! (`spiffed.admin.v1.BundleAdmin`).
//!
//! `show` prints the agent's own trust domain's bundle: its X.509 authorities as PEM (for a
//! database server, a load balancer, `openssl verify -CAfile`), or the SPIFFE bundle (a JWKS
//! with X.509 and JWT authorities, for a federated peer or a JWT gateway). `set`, `list` and
//! `delete` manage federated bundles: other trust domains' bundles that the agent hands to
//! workloads whose entries federate with them (or to all, with `[federation] federate_all`).
//! The agent checks every document it is given (the SPIFFE bundle rules) and keeps it in its
//! store; the CLI only reads the file and prints.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use spiffed_core::spiffe_bundle::MAX_BUNDLE_BYTES;
use spiffed_proto::admin::{
    Bundle, DeleteFederatedBundleRequest, GetOwnBundleRequest, ListFederatedBundlesRequest,
    SetFederatedBundleRequest,
};

use super::{Admin, AdminArgs, AdminError, render};
use crate::cli_common::fail;
use crate::cli_common::output::{err, print};

/// `spiffed bundle ...`.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum BundleCommand {
    /// Print this agent's own trust domain's bundle: its X.509 authorities as PEM (default), or
    /// with --format spiffe the SPIFFE bundle (JWKS) with its X.509 and JWT authorities.
    Show(ShowArgs),
    /// List the federated bundles: trust domain, X.509 authorities, JWT keys, sequence, refresh
    /// hint, and where each came from.
    List,
    /// Add or replace a foreign trust domain's bundle (standalone mode). Workloads whose
    /// entries federate with it (federates_with), or every workload with federate_all = true
    /// in the federation table, receive it at once; it is kept across restarts.
    Set(SetArgs),
    /// Delete a foreign trust domain's bundle; workloads stop receiving it at once.
    Delete(DeleteArgs),
}

/// The two bundle formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// X.509 authorities as PEM CERTIFICATE blocks (no JWT authorities).
    Pem,
    /// The SPIFFE bundle format: a JWK Set with x509-svid and jwt-svid keys,
    /// spiffe_sequence and spiffe_refresh_hint.
    Spiffe,
}

/// `spiffed bundle show`.
#[derive(clap::Args, Debug)]
pub(crate) struct ShowArgs {
    /// The format to print.
    #[arg(long, value_enum, default_value = "pem")]
    format: Format,
}

/// `spiffed bundle set`.
#[derive(clap::Args, Debug)]
pub(crate) struct SetArgs {
    /// The foreign trust domain the bundle belongs to, e.g. partner.example (not this agent's
    /// own).
    #[arg(long, value_name = "TRUST_DOMAIN")]
    trust_domain: String,
    /// The format of FILE: a SPIFFE bundle (e.g. from `spire-server bundle show -format
    /// spiffe` or `spiffed bundle show --format spiffe`), or PEM CA certificates (X.509 only).
    #[arg(long, value_enum, default_value = "spiffe")]
    format: Format,
    /// The bundle file, or - for standard input (at most 1 MiB).
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// `spiffed bundle delete`.
#[derive(clap::Args, Debug)]
pub(crate) struct DeleteArgs {
    /// The foreign trust domain whose bundle to delete.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    trust_domain: String,
}

/// `spiffed bundle ...`.
pub(crate) async fn run_bundle(args: &AdminArgs, cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    let result = match cmd {
        BundleCommand::Show(show) => run_show(args, show.format).await,
        BundleCommand::List => run_list(args).await,
        BundleCommand::Set(set) => run_set(args, set).await,
        BundleCommand::Delete(delete) => run_delete(args, &delete.trust_domain).await,
    };
    Ok(result.unwrap_or_else(|e| fail(&e)))
}

async fn run_show(args: &AdminArgs, format: Format) -> Result<ExitCode, AdminError> {
    let mut admin = Admin::open(args).await?;
    let bundle = match admin.bundles.get_own_bundle(GetOwnBundleRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(admin.status(&status)),
    };
    let (text, doc) = match format {
        Format::Pem => {
            let pem = pem_of(&bundle.x509_authorities);
            (pem.trim_end().to_owned(), Value::String(pem))
        }
        Format::Spiffe => {
            let doc: Value = serde_json::from_str(&bundle.spiffe_json)
                .map_err(|e| admin.malformed(&format!("the SPIFFE bundle is not JSON: {e}")))?;
            (pretty(&doc), doc)
        }
    };
    let mut json = summary_json(&bundle);
    if let Value::Object(m) = &mut json {
        m.insert(
            "format".into(),
            match format {
                Format::Pem => "pem",
                Format::Spiffe => "spiffe",
            }
            .into(),
        );
        m.insert("bundle".into(), doc);
    }
    print(args.output, &text, &json)?;
    Ok(ExitCode::SUCCESS)
}

async fn run_list(args: &AdminArgs) -> Result<ExitCode, AdminError> {
    let mut admin = Admin::open(args).await?;
    let bundles = match admin
        .bundles
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await
    {
        Ok(r) => r.into_inner().bundles,
        Err(status) => return Err(admin.status(&status)),
    };
    let json = Value::Array(bundles.iter().map(summary_json).collect());
    print(args.output, &list_table(&bundles), &json)?;
    Ok(ExitCode::SUCCESS)
}

async fn run_set(args: &AdminArgs, set: SetArgs) -> Result<ExitCode, AdminError> {
    let (document, source) = read_document(&set.file)?;
    let mut admin = Admin::open(args).await?;
    let request = SetFederatedBundleRequest {
        trust_domain: set.trust_domain.clone(),
        format: match set.format {
            Format::Pem => "pem",
            Format::Spiffe => "spiffe",
        }
        .into(),
        document,
        source,
    };
    let response = match admin.bundles.set_federated_bundle(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(admin.status(&status)),
    };
    let Some(bundle) = response.bundle else {
        return Err(admin.malformed("no bundle in the answer"));
    };
    for why in &response.skipped {
        err(format_args!("spiffed: warning: {}", render::clean(why)));
    }
    let text = format!(
        "Set the federated bundle of {}: {} X.509 authorit{}, {} JWT key{} (from {}).",
        render::clean(&bundle.trust_domain),
        bundle.x509_authorities.len(),
        if bundle.x509_authorities.len() == 1 {
            "y"
        } else {
            "ies"
        },
        bundle.jwt_authorities,
        if bundle.jwt_authorities == 1 { "" } else { "s" },
        render::clean(&bundle.source),
    );
    let mut json = summary_json(&bundle);
    if let Value::Object(m) = &mut json {
        m.insert("skipped".into(), json!(response.skipped));
    }
    print(args.output, &text, &json)?;
    Ok(ExitCode::SUCCESS)
}

async fn run_delete(args: &AdminArgs, trust_domain: &str) -> Result<ExitCode, AdminError> {
    let mut admin = Admin::open(args).await?;
    let request = DeleteFederatedBundleRequest {
        trust_domain: trust_domain.to_owned(),
    };
    if let Err(status) = admin.bundles.delete_federated_bundle(request).await {
        return Err(admin.status(&status));
    }
    print(
        args.output,
        &format!(
            "Deleted the federated bundle of {}.",
            render::clean(trust_domain)
        ),
        &json!({ "trust_domain": trust_domain, "deleted": true }),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Reads FILE (or stdin for `-`), at most [`MAX_BUNDLE_BYTES`], and names where it came from.
fn read_document(file: &Path) -> Result<(Vec<u8>, String), AdminError> {
    let limit = u64::try_from(MAX_BUNDLE_BYTES).unwrap_or(u64::MAX) + 1;
    let mut bytes = Vec::new();
    let source = if file == Path::new("-") {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(|e| AdminError::Usage(format!("cannot read the bundle from stdin: {e}")))?;
        "stdin".to_owned()
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .map_err(|e| AdminError::Usage(format!("cannot read {}: {e}", file.display())))?;
        std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .display()
            .to_string()
    };
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(AdminError::Usage(format!(
            "{source} is larger than {MAX_BUNDLE_BYTES} bytes, the most a bundle may have: is it \
             the right file?"
        )));
    }
    Ok((bytes, source))
}

/// DER certificates as PEM blocks.
fn pem_of(ders: &[Vec<u8>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// A JSON value indented for people.
fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn refresh_hint_text(seconds: u64) -> String {
    if seconds == 0 {
        "-".to_owned()
    } else {
        humantime::format_duration(Duration::from_secs(seconds)).to_string()
    }
}

/// One bundle's facts as a JSON object with stable field names: `trust_domain`,
/// `x509_authorities`, `jwt_authorities` (counts), `sequence`, `refresh_hint_seconds` (`null`
/// when unset), `source`, `updated_at` (RFC 3339 or `null`).
fn summary_json(b: &Bundle) -> Value {
    json!({
        "trust_domain": b.trust_domain,
        "x509_authorities": b.x509_authorities.len(),
        "jwt_authorities": b.jwt_authorities,
        "sequence": b.sequence,
        "refresh_hint_seconds": (b.refresh_hint_seconds != 0).then_some(b.refresh_hint_seconds),
        "source": b.source,
        "updated_at": render::rfc3339(b.updated_at),
    })
}

/// `bundle list` as a table. No trailing newline.
fn list_table(bundles: &[Bundle]) -> String {
    if bundles.is_empty() {
        return "No federated bundles. Add one with `spiffed bundle set --trust-domain TD FILE`."
            .to_owned();
    }
    let rows: Vec<Vec<String>> = bundles
        .iter()
        .map(|b| {
            vec![
                render::clean(&b.trust_domain),
                b.x509_authorities.len().to_string(),
                b.jwt_authorities.to_string(),
                b.sequence.to_string(),
                refresh_hint_text(b.refresh_hint_seconds),
                render::clean(&b.source),
                render::rfc3339(b.updated_at).unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    render::table(
        &[
            "TRUST DOMAIN",
            "X.509 AUTHORITIES",
            "JWT KEYS",
            "SEQUENCE",
            "REFRESH HINT",
            "SOURCE",
            "UPDATED",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        Bundle {
            trust_domain: "partner.example".into(),
            spiffe_json: r#"{"keys":[]}"#.into(),
            x509_authorities: vec![vec![1, 2, 3], vec![4]],
            jwt_authorities: 1,
            sequence: 7,
            refresh_hint_seconds: 300,
            source: "/etc/partner.json".into(),
            updated_at: 1_700_000_000,
        }
    }

    #[test]
    fn list_shows_counts_sequence_hint_and_source() {
        let t = list_table(&[bundle()]);
        let lines: Vec<&str> = t.lines().collect();
        for h in [
            "TRUST DOMAIN",
            "X.509 AUTHORITIES",
            "JWT KEYS",
            "SEQUENCE",
            "REFRESH HINT",
        ] {
            assert!(lines[0].contains(h), "{}", lines[0]);
        }
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "partner.example",
                "2",
                "1",
                "7",
                "5m",
                "/etc/partner.json",
                "2023-11-14T22:13:20Z"
            ]
        );
        assert!(list_table(&[]).starts_with("No federated bundles."));
        let j = summary_json(&bundle());
        assert_eq!(j["x509_authorities"], 2);
        assert_eq!(j["refresh_hint_seconds"], 300);
        let mut none = bundle();
        none.refresh_hint_seconds = 0;
        assert_eq!(summary_json(&none)["refresh_hint_seconds"], Value::Null);
    }

    #[test]
    fn pem_is_64_column_blocks() {
        let pem = pem_of(&[vec![0u8; 100]]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
    }

    #[test]
    fn an_oversized_or_missing_file_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_BUNDLE_BYTES + 1]).unwrap();
        let e = read_document(&big).unwrap_err().to_string();
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
        let e = read_document(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, vec![b' '; MAX_BUNDLE_BYTES]).unwrap();
        assert_eq!(read_document(&ok).unwrap().0.len(), MAX_BUNDLE_BYTES);
    }
}
