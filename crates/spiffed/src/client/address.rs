//! Where the Workload API socket is: `--socket`, else `SPIFFE_ENDPOINT_SOCKET`, else the default
//! (CONFORMANCE §13, items 106-109).
//!
//! [`resolve`] is a pure function of the flag and the environment value, so tests never touch
//! the process environment; [`read_env`] is the one place that reads it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;

/// The environment variable a SPIFFE client falls back to.
pub(crate) const ENV_VAR: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The socket `spiffed run` serves by default.
pub(crate) const DEFAULT_SOCKET: &str = "/run/spiffed/public/api.sock";

/// Where a socket address came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The `--socket` flag.
    Flag,
    /// The `SPIFFE_ENDPOINT_SOCKET` environment variable.
    Env,
    /// Neither was given: [`DEFAULT_SOCKET`].
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Flag => "--socket",
            Self::Env => ENV_VAR,
            Self::Default => "the default",
        })
    }
}

/// A validated Workload API socket: an absolute path to a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketAddress {
    /// The socket's absolute path (percent-escapes of a `unix:` URI decoded).
    pub(crate) path: PathBuf,
    /// Where the address came from.
    pub(crate) origin: Origin,
}

/// Why a socket address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AddressError {
    /// The address is malformed.
    #[error(
        "invalid Workload API socket {value:?} (from {origin}): {reason}; give an absolute path \
         like {DEFAULT_SOCKET} or a URI like unix://{DEFAULT_SOCKET}"
    )]
    Invalid {
        /// The value as given.
        value: String,
        /// Where it came from.
        origin: Origin,
        /// What is wrong with it.
        reason: Reason,
    },

    /// A `tcp:` address: valid for the spec, but this CLI only speaks to Unix sockets.
    #[error(
        "Workload API socket {value:?} (from {origin}) is a tcp: address, which this CLI does \
         not support: spiffed serves a Unix socket; give its path, e.g. {DEFAULT_SOCKET}"
    )]
    TcpUnsupported {
        /// The value as given.
        value: String,
        /// Where it came from.
        origin: Origin,
    },

    /// `SPIFFE_ENDPOINT_SOCKET` is not valid UTF-8.
    #[error(
        "{ENV_VAR} is not valid UTF-8 ({value:?}); set it to a path or a unix:// URI, or pass \
         --socket"
    )]
    EnvNotUnicode {
        /// The value, lossily decoded.
        value: String,
    },
}

/// What is wrong with a malformed socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Reason {
    /// Nothing was given.
    #[error("it is empty")]
    Empty,
    /// A relative path, or an opaque `unix:` URI such as `unix:rel/path`.
    #[error("the path must be absolute")]
    Relative,
    /// `unix://HOST/...`: the authority must be empty.
    #[error("a unix: URI must not name a host or user (unix://HOST/...); use three slashes")]
    HasAuthority,
    /// `unix://` or `unix:///` with no path.
    #[error("a unix: URI must include the socket's path")]
    MissingPath,
    /// A `?query`.
    #[error("a unix: URI must not have a query (?...)")]
    HasQuery,
    /// A `#fragment`.
    #[error("a unix: URI must not have a fragment (#...)")]
    HasFragment,
    /// A `%` not followed by two hex digits, or an escaped NUL.
    #[error("a unix: URI has a bad percent-escape")]
    BadEscape,
    /// A scheme other than `unix:` (or `tcp:`).
    #[error("the scheme must be unix:")]
    UnsupportedScheme,
}

/// Reads `SPIFFE_ENDPOINT_SOCKET`. Unset and empty are the same: not given.
pub(crate) fn read_env() -> Result<Option<String>, AddressError> {
    match std::env::var_os(ENV_VAR) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .into_string()
            .map(Some)
            .map_err(|v| AddressError::EnvNotUnicode {
                value: v.to_string_lossy().into_owned(),
            }),
    }
}

/// Resolves the socket from the `--socket` flag, else the `SPIFFE_ENDPOINT_SOCKET` value, else
/// [`DEFAULT_SOCKET`], and validates it. An empty environment value counts as unset.
pub(crate) fn resolve(
    flag: Option<&str>,
    env: Option<&str>,
) -> Result<SocketAddress, AddressError> {
    let (value, origin) = match (flag, env) {
        (Some(flag), _) => (flag, Origin::Flag),
        (None, Some(env)) if !env.is_empty() => (env, Origin::Env),
        (None, _) => (DEFAULT_SOCKET, Origin::Default),
    };
    match parse(value) {
        Ok(path) => Ok(SocketAddress { path, origin }),
        Err(Parsed::Tcp) => Err(AddressError::TcpUnsupported {
            value: value.to_owned(),
            origin,
        }),
        Err(Parsed::Invalid(reason)) => Err(AddressError::Invalid {
            value: value.to_owned(),
            origin,
            reason,
        }),
    }
}

/// Why [`parse`] did not give a path.
enum Parsed {
    /// A `tcp:` address.
    Tcp,
    /// A malformed address.
    Invalid(Reason),
}

/// Parses a bare absolute path or a `unix:` URI (`unix:///abs` or `unix:/abs`) into a path.
fn parse(value: &str) -> Result<PathBuf, Parsed> {
    if value.is_empty() {
        return Err(Parsed::Invalid(Reason::Empty));
    }
    // A bare absolute path is taken literally: it is a path, not a URI.
    if value.starts_with('/') {
        return Ok(PathBuf::from(value));
    }
    let Some((scheme, rest)) = split_scheme(value) else {
        return Err(Parsed::Invalid(Reason::Relative));
    };
    if scheme.eq_ignore_ascii_case("tcp") {
        return Err(Parsed::Tcp);
    }
    if !scheme.eq_ignore_ascii_case("unix") {
        return Err(Parsed::Invalid(Reason::UnsupportedScheme));
    }
    // RFC 3986: the fragment starts at the first '#', the query at the first '?' before it.
    if rest.contains('#') {
        return Err(Parsed::Invalid(Reason::HasFragment));
    }
    if rest.contains('?') {
        return Err(Parsed::Invalid(Reason::HasQuery));
    }
    let path = match rest.strip_prefix("//") {
        // unix://AUTHORITY/PATH: the authority runs to the next '/' and must be empty.
        Some(after) => {
            let authority_end = after.find('/').unwrap_or(after.len());
            if authority_end > 0 {
                return Err(Parsed::Invalid(Reason::HasAuthority));
            }
            after
        }
        None if rest.starts_with('/') => rest,
        None if rest.is_empty() => return Err(Parsed::Invalid(Reason::MissingPath)),
        // unix:rel/path is an opaque URI: no absolute path.
        None => return Err(Parsed::Invalid(Reason::Relative)),
    };
    if path.is_empty() || path.trim_start_matches('/').is_empty() {
        return Err(Parsed::Invalid(Reason::MissingPath));
    }
    let bytes = percent_decode(path).ok_or(Parsed::Invalid(Reason::BadEscape))?;
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

/// Splits `scheme:rest` when `value` starts with an RFC 3986 scheme.
fn split_scheme(value: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = value.split_once(':')?;
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then_some((scheme, rest))
}

/// Decodes `%XX` escapes. `None` for a malformed escape or an escaped NUL (a path cannot hold
/// one).
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            let decoded = (hi << 4) | lo;
            if decoded == 0 {
                return None;
            }
            out.push(decoded);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// The value of one hex digit.
fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(flag: &str) -> PathBuf {
        resolve(Some(flag), None).unwrap().path
    }

    fn reason_of(flag: &str) -> Reason {
        match resolve(Some(flag), None) {
            Err(AddressError::Invalid { reason, .. }) => reason,
            other => panic!("{flag:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn flag_wins_over_env_and_env_over_default() {
        let both = resolve(Some("/flag.sock"), Some("unix:///env.sock")).unwrap();
        assert_eq!(both.path, PathBuf::from("/flag.sock"));
        assert_eq!(both.origin, Origin::Flag);

        let env = resolve(None, Some("unix:///env.sock")).unwrap();
        assert_eq!(env.path, PathBuf::from("/env.sock"));
        assert_eq!(env.origin, Origin::Env);

        let default = resolve(None, None).unwrap();
        assert_eq!(default.path, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(default.origin, Origin::Default);
    }

    #[test]
    fn empty_env_counts_as_unset_but_empty_flag_is_an_error() {
        assert_eq!(resolve(None, Some("")).unwrap().origin, Origin::Default);
        assert_eq!(reason_of(""), Reason::Empty);
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(path_of("/run/a.sock"), PathBuf::from("/run/a.sock"));
        assert_eq!(path_of("unix:///run/a.sock"), PathBuf::from("/run/a.sock"));
        assert_eq!(path_of("unix:/run/a.sock"), PathBuf::from("/run/a.sock"));
        assert_eq!(path_of("UNIX:///run/a.sock"), PathBuf::from("/run/a.sock"));
        // Percent-escapes in a URI are decoded; a bare path is literal.
        assert_eq!(
            path_of("unix:///tmp/a%20b.sock"),
            PathBuf::from("/tmp/a b.sock")
        );
        assert_eq!(path_of("/tmp/a%20b.sock"), PathBuf::from("/tmp/a%20b.sock"));
        assert_eq!(path_of("/tmp/a?b#c"), PathBuf::from("/tmp/a?b#c"));
    }

    #[test]
    fn rejected_forms_follow_item_108() {
        assert_eq!(reason_of("unix:rel/path.sock"), Reason::Relative);
        assert_eq!(reason_of("rel/path.sock"), Reason::Relative);
        assert_eq!(reason_of("./api.sock"), Reason::Relative);
        assert_eq!(reason_of("unix://host/run/a.sock"), Reason::HasAuthority);
        assert_eq!(reason_of("unix://user@/run/a.sock"), Reason::HasAuthority);
        assert_eq!(reason_of("unix:///run/a.sock?q=1"), Reason::HasQuery);
        assert_eq!(reason_of("unix:///run/a.sock#f"), Reason::HasFragment);
        assert_eq!(reason_of("unix://"), Reason::MissingPath);
        assert_eq!(reason_of("unix:///"), Reason::MissingPath);
        assert_eq!(reason_of("unix:"), Reason::MissingPath);
        assert_eq!(reason_of("unix:///a%2"), Reason::BadEscape);
        assert_eq!(reason_of("unix:///a%zz"), Reason::BadEscape);
        assert_eq!(reason_of("unix:///a%00b"), Reason::BadEscape);
        assert_eq!(
            reason_of("http://localhost/a.sock"),
            Reason::UnsupportedScheme
        );
    }

    #[test]
    fn tcp_is_named_as_unsupported() {
        for value in ["tcp://127.0.0.1:8000", "tcp:127.0.0.1:8000"] {
            let err = resolve(None, Some(value)).unwrap_err();
            assert_eq!(
                err,
                AddressError::TcpUnsupported {
                    value: value.to_owned(),
                    origin: Origin::Env
                }
            );
            assert!(err.to_string().contains("tcp: address"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_value_its_origin_and_an_example() {
        let msg = resolve(None, Some("unix://host/p"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"unix://host/p\""), "{msg}");
        assert!(msg.contains(ENV_VAR), "{msg}");
        assert!(msg.contains("unix:///run/spiffed/public/api.sock"), "{msg}");
    }
}
