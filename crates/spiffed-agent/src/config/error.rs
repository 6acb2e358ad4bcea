//! [`ConfigError`]: one problem in a configuration file, with where it is and how to fix it.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::keys::{self, Table};

/// What kind of problem a [`ConfigError`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read (the message carries the OS error).
    Read,
    /// The text is not valid TOML.
    Syntax,
    /// A key that this table does not have.
    UnknownKey,
    /// A value of the wrong TOML type (a number where a string is needed, say).
    WrongType,
    /// A required key is absent.
    Missing,
    /// A value of the right type that breaks a rule (a relative path, a zero TTL, ...).
    Invalid,
}

/// One problem in a configuration file: the file, the 1-based line and column of the offending
/// key or value, the dotted key (`entries[1].spiffe_id`, or `""` when no key applies), what is
/// wrong, and how to fix it.
///
/// Displays as
///
/// ```text
/// spiffed.toml:12:13: entries[1].spiffe_id: spiffe_id "spiffe://other.org/x" is outside the trust domain "example.org"
///   fix: use an ID of the form spiffe://example.org/...
/// ```
#[derive(Clone, Debug)]
pub struct ConfigError {
    /// What kind of problem this is.
    pub kind: ConfigErrorKind,
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line of the offending key or value (0 when the file could not be read).
    pub line: usize,
    /// 1-based column, in characters (0 when the file could not be read).
    pub column: usize,
    /// Dotted path of the offending key, e.g. `entries[1].spiffe_id`; empty for syntax errors.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

impl ConfigError {
    /// The file could not be read.
    pub(crate) fn read(file: &Path, err: &io::Error) -> Self {
        let fix = match err.kind() {
            io::ErrorKind::NotFound => {
                "check the path given to --config (an example config is in the documentation)"
            }
            io::ErrorKind::PermissionDenied => {
                "make the file readable by the user the agent runs as"
            }
            io::ErrorKind::InvalidData => "save the file as UTF-8 text",
            _ => "check that the path names a readable regular file",
        };
        Self {
            kind: ConfigErrorKind::Read,
            file: file.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the configuration file: {err}"),
            fix: fix.to_owned(),
        }
    }

    /// A problem at byte range `span` of `text`.
    pub(crate) fn at(
        kind: ConfigErrorKind,
        file: &Path,
        text: &str,
        span: &Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        let (line, column) = line_column(text, span.start);
        Self {
            kind,
            file: file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// Turns a TOML syntax error into a `ConfigError`.
    pub(crate) fn syntax(file: &Path, text: &str, err: &toml::de::Error) -> Self {
        let span = err.span().unwrap_or(0..0);
        let said = err.message().trim();
        let fix = if said.starts_with("duplicate key") {
            "each key may appear once per table; remove one of the two (a second entry needs \
             its own [[entries]] header)"
                .to_owned()
        } else if said.contains("must be quoted") {
            "put the value in double quotes, e.g. socket_path = \"/run/spiffed/public/api.sock\""
                .to_owned()
        } else if said.starts_with("invalid basic string")
            || said.starts_with("invalid literal string")
        {
            "close the string with the same quote it opened with, on the same line; inside \
             double quotes write \\\" and \\\\ for a quote and a backslash"
                .to_owned()
        } else if let Some((_, expected)) = said.split_once(", expected ") {
            format!(
                "TOML expected {expected} here; keys look like name = value, strings need double \
                 quotes, lists are [\"a\", \"b\"], entries start with [[entries]]"
            )
        } else {
            "keys look like name = value, strings need double quotes, lists are [\"a\", \"b\"], \
             entries start with [[entries]] (see https://toml.io)"
                .to_owned()
        };
        Self::at(
            ConfigErrorKind::Syntax,
            file,
            text,
            &span,
            "",
            format!("invalid TOML: {said}"),
            fix,
        )
    }

    /// Turns an error from deserializing the parsed document (unknown key, wrong type) into a
    /// `ConfigError`, finding the key at the error's position in `doc`.
    pub(crate) fn from_serde(
        file: &Path,
        text: &str,
        doc: &Spanned<DeTable<'_>>,
        err: &toml::de::Error,
    ) -> Self {
        let span = err.span().unwrap_or(0..0);
        let path = find_path(doc.get_ref(), span.start).unwrap_or_default();
        let key = render_path(&path);
        let said = err.message().trim();
        let table = table_of(&path);
        if let Some(unknown) = backticked(said, "unknown field `") {
            let fix = unknown_key_fix(unknown, table);
            return Self::at(
                ConfigErrorKind::UnknownKey,
                file,
                text,
                &span,
                key,
                format!("unknown key `{unknown}`"),
                fix,
            );
        }
        if let Some(missing) = backticked(said, "missing field `") {
            let example = table.and_then(|t| keys::example(t, missing));
            return Self::at(
                ConfigErrorKind::Missing,
                file,
                text,
                &span,
                key,
                format!("{missing} is required"),
                example.map_or_else(|| format!("add {missing}"), |e| format!("add {e}")),
            );
        }
        let leaf = path.iter().rev().find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        });
        let in_list = matches!(path.last(), Some(Seg::Index(_)));
        let example = match (leaf, table_of_leaf(&path)) {
            (Some(leaf), Some(t)) => keys::example(t, leaf),
            _ => None,
        };
        let fix = match example {
            Some(e) if in_list => format!("each item has the type shown here: {e}"),
            Some(e) => format!("write it like {e}"),
            None => "check the value's type (strings need double quotes)".to_owned(),
        };
        let message = match leaf {
            Some(leaf) => format!("{leaf}: {said}"),
            None => said.to_owned(),
        };
        Self::at(
            ConfigErrorKind::WrongType,
            file,
            text,
            &span,
            key,
            message,
            fix,
        )
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if self.line > 0 {
            write!(f, "{}:{}:", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, " {}:", self.key)?;
        }
        write!(f, " {}\n  fix: {}", self.message, self.fix)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column (in characters) of byte offset `pos` in `text`.
pub(crate) fn line_column(text: &str, pos: usize) -> (usize, usize) {
    let mut pos = pos.min(text.len());
    while !text.is_char_boundary(pos) {
        pos -= 1;
    }
    let before = text.get(..pos).unwrap_or_default();
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, column)
}

/// One step of a key path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The table that holds the last key of `path` (the key itself is the last segment).
fn table_of(path: &[Seg]) -> Option<Table> {
    match path {
        [] | [_] => Some(Table::Top),
        [Seg::Key(e), Seg::Index(_), _] if e == "entries" => Some(Table::Entry),
        [Seg::Key(t), _] if t == "sds" => Some(Table::Sds),
        [Seg::Key(u), Seg::Key(d), _] if u == "upstream_authority" && d == "disk" => {
            Some(Table::UpstreamDisk)
        }
        [Seg::Key(t), _] if t == "federation" => Some(Table::Federation),
        [Seg::Key(t), Seg::Key(b), _] if t == "federation" && b == "bundle_endpoint" => {
            Some(Table::BundleEndpoint)
        }
        [Seg::Key(t), Seg::Key(r), Seg::Index(_), _]
            if t == "federation" && r == "trust_domains" =>
        {
            Some(Table::Relationship)
        }
        _ => None,
    }
}

/// The table that holds the last named key of `path`, ignoring trailing list indexes.
fn table_of_leaf(path: &[Seg]) -> Option<Table> {
    let mut end = path.len();
    while let Some(Seg::Index(_)) = path.get(end.wrapping_sub(1)) {
        end -= 1;
    }
    table_of(path.get(..end).unwrap_or_default())
}

/// The deepest key whose name or value covers byte `pos`.
fn find_path(table: &DeTable<'_>, pos: usize) -> Option<Vec<Seg>> {
    for (k, v) in table.iter() {
        let here = vec![Seg::Key(k.get_ref().to_string())];
        if k.span().contains(&pos) {
            return Some(here);
        }
        if let Some(mut rest) = find_in_value(v, pos) {
            let mut path = here;
            path.append(&mut rest);
            return Some(path);
        }
        if v.span().contains(&pos) {
            return Some(here);
        }
    }
    None
}

fn find_in_value(v: &Spanned<DeValue<'_>>, pos: usize) -> Option<Vec<Seg>> {
    match v.get_ref() {
        DeValue::Table(t) => find_path(t, pos),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let mut path = vec![Seg::Index(i)];
            if let Some(mut rest) = find_in_value(item, pos) {
                path.append(&mut rest);
                Some(path)
            } else {
                item.span().contains(&pos).then_some(path)
            }
        }),
        _ => None,
    }
}

/// Takes out of `table` the key whose name or value covers byte `pos` (the deepest one, as
/// [`find_path`] finds it): a key inside a list's table is taken out of that table, and a bad
/// item of a list takes out the whole list (items cannot be taken out without renumbering the
/// ones after it, which the problems found later name). False when nothing covers `pos`.
pub(crate) fn prune(table: &mut DeTable<'_>, pos: usize) -> bool {
    let Some(mut path) = find_path(table, pos) else {
        return false;
    };
    while let Some(Seg::Index(_)) = path.last() {
        path.pop();
    }
    remove_at(table, &path)
}

fn remove_at(table: &mut DeTable<'_>, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k.as_str()).is_some(),
        [Seg::Key(k), rest @ ..] => table
            .get_mut(k.as_str())
            .is_some_and(|v| remove_in_value(v.get_mut(), rest)),
        _ => false,
    }
}

fn remove_in_value(value: &mut DeValue<'_>, path: &[Seg]) -> bool {
    match (value, path) {
        (DeValue::Table(t), _) => remove_at(t, path),
        (DeValue::Array(items), [Seg::Index(i), rest @ ..]) => items
            .get_mut(*i)
            .is_some_and(|item| remove_in_value(item.get_mut(), rest)),
        _ => false,
    }
}

/// The text between `prefix` and the next backtick, if `msg` starts with `prefix`.
fn backticked<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    msg.strip_prefix(prefix)?.split('`').next()
}

fn unknown_key_fix(unknown: &str, table: Option<Table>) -> String {
    let Some(table) = table else {
        return "remove this key".to_owned();
    };
    let known = keys::names(table);
    let list = known.join(", ");
    if table == Table::Entry && keys::names(Table::Top).contains(&unknown) {
        return format!(
            "`{unknown}` is a top-level key, but it follows an [[entries]] header, so TOML puts it \
             in that entry; move it above the first [[entries]] (entry keys: {list})"
        );
    }
    let near = known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .filter(|&(d, k)| d <= 2.max(k.len() / 4))
        .min_by_key(|&(d, _)| d);
    let what = match table {
        Table::Top => "top-level keys",
        Table::Entry => "keys of [[entries]]",
        Table::Sds => "keys of [sds]",
        Table::UpstreamDisk => "keys of [upstream_authority.disk]",
        Table::Federation => "keys of [federation]",
        Table::BundleEndpoint => "keys of [federation.bundle_endpoint]",
        Table::Relationship => "keys of [[federation.trust_domains]]",
    };
    match near {
        Some((_, k)) => format!("did you mean `{k}`? {what}: {list}"),
        None => format!("remove it; {what}: {list}"),
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != *cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.get(j).copied().unwrap_or(0) + 1;
            cur.push(sub.min(del).min(ins));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}
