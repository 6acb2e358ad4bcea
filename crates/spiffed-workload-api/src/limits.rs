//! What one request may ask for, and how often a denial is logged.
//!
//! Every caller, with or without an identity, chooses the audiences and tokens it sends, and
//! every refusal is a log line: without bounds, a caller sets the agent's memory and log
//! volume. [`RequestLimits`] bounds what a request may carry (each excess is an
//! `InvalidArgument` naming the limit), and [`Throttle`] bounds how many denial lines of one
//! kind are written per second (the rest are counted and summarized).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::ApiError;

/// Default for [`RequestLimits::max_jwt_audiences`]. Real clients send one audience, rarely a
/// few; SPIRE and go-spiffe set no limit.
pub const DEFAULT_MAX_JWT_AUDIENCES: usize = 16;
/// Default for [`RequestLimits::max_jwt_audience_length`], in bytes: audiences are service
/// names or URLs, far shorter.
pub const DEFAULT_MAX_JWT_AUDIENCE_LENGTH: usize = 1024;
/// Default for [`RequestLimits::max_jwt_token_length`], in bytes: four times HTTP servers'
/// usual 8 KiB header limit, and room for every token the agent mints with the default
/// audience limits.
pub const DEFAULT_MAX_JWT_TOKEN_LENGTH: usize = 32 * 1024;
/// Default for [`RequestLimits::denial_log_lines_per_second`].
pub const DEFAULT_DENIAL_LOG_LINES_PER_SECOND: u32 = 10;

/// Bounds on what a Workload API request may carry, and on denial logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most audiences in one FetchJWTSVID request.
    pub max_jwt_audiences: usize,
    /// Longest audience, in bytes (FetchJWTSVID and ValidateJWTSVID).
    pub max_jwt_audience_length: usize,
    /// Longest token ValidateJWTSVID accepts, in bytes; FetchJWTSVID refuses audiences that
    /// would make a longer token, so every minted token can be validated.
    pub max_jwt_token_length: usize,
    /// Most log lines per second for each kind of denial; the rest are counted and reported
    /// in one "suppressed" line.
    pub denial_log_lines_per_second: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_jwt_audiences: DEFAULT_MAX_JWT_AUDIENCES,
            max_jwt_audience_length: DEFAULT_MAX_JWT_AUDIENCE_LENGTH,
            max_jwt_token_length: DEFAULT_MAX_JWT_TOKEN_LENGTH,
            denial_log_lines_per_second: DEFAULT_DENIAL_LOG_LINES_PER_SECOND,
        }
    }
}

/// Longest SPIFFE ID, in bytes ([ID §2.3]), for the token size estimate.
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// A minted token's parts besides the audiences: header, other claims, signature (base64),
/// with room to spare.
const TOKEN_FIXED_PART: usize = 512;

impl RequestLimits {
    /// Checks FetchJWTSVID's audiences: present, none empty, at most `max_jwt_audiences`, each
    /// at most `max_jwt_audience_length` bytes, and together small enough that the token fits
    /// `max_jwt_token_length`.
    pub(crate) fn check_fetch_audiences(&self, audience: &[String]) -> Result<(), ApiError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(ApiError::BadRequest("audience must be specified".into()));
        }
        if audience.len() > self.max_jwt_audiences {
            return Err(ApiError::BadRequest(format!(
                "too many audiences: {} (the limit is max_jwt_audiences = {})",
                audience.len(),
                self.max_jwt_audiences
            )));
        }
        for a in audience {
            self.check_audience_length(a)?;
        }
        // The token carries the audiences as JSON (escaped) in base64 (4/3).
        let json = serde_json::to_string(audience).map_or(usize::MAX, |s| s.len());
        let estimate = (json.saturating_add(MAX_SPIFFE_ID_LEN) / 3 + 1)
            .saturating_mul(4)
            .saturating_add(TOKEN_FIXED_PART);
        if estimate > self.max_jwt_token_length {
            return Err(ApiError::BadRequest(format!(
                "the audiences would make a JWT-SVID of up to {estimate} bytes (the limit is \
                 max_jwt_token_length = {})",
                self.max_jwt_token_length
            )));
        }
        Ok(())
    }

    /// Checks ValidateJWTSVID's token and audience sizes, before anything is parsed.
    pub(crate) fn check_validate(&self, token: &str, audience: &str) -> Result<(), ApiError> {
        if token.len() > self.max_jwt_token_length {
            return Err(ApiError::BadRequest(format!(
                "the svid is {} bytes long (the limit is max_jwt_token_length = {})",
                token.len(),
                self.max_jwt_token_length
            )));
        }
        self.check_audience_length(audience)
    }

    fn check_audience_length(&self, a: &str) -> Result<(), ApiError> {
        if a.len() > self.max_jwt_audience_length {
            return Err(ApiError::BadRequest(format!(
                "an audience is {} bytes long (the limit is max_jwt_audience_length = {})",
                a.len(),
                self.max_jwt_audience_length
            )));
        }
        Ok(())
    }
}

/// Kinds of denial, each throttled on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Denial {
    /// The caller matches no entry.
    NoIdentity,
    /// The caller asked for a SPIFFE ID it does not hold.
    NotEntitled,
    /// A token failed validation.
    JwtRejected,
    /// A request was refused as malformed or too large.
    BadRequest,
    /// The caller could not be attested.
    Attestation,
    /// An SDS client asked for names it is not entitled to.
    SdsNotAuthorized,
    /// An SDS client rejected an update (NACK) or sent a stale or malformed request.
    SdsRejected,
}

impl Denial {
    fn as_str(self) -> &'static str {
        match self {
            Self::NoIdentity => "no identity issued",
            Self::NotEntitled => "JWT-SVID denied: not entitled",
            Self::JwtRejected => "JWT-SVID rejected",
            Self::BadRequest => "request refused",
            Self::Attestation => "attestation failed",
            Self::SdsNotAuthorized => "SDS request refused: not authorized",
            Self::SdsRejected => "SDS update rejected by the client",
        }
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

/// At most `per_second` lines of each [`Denial`] kind per second; the excess is counted and
/// reported in one line when the next line of that kind is written.
#[derive(Debug)]
pub(crate) struct Throttle {
    per_second: u32,
    windows: Mutex<HashMap<Denial, Window>>,
}

impl Throttle {
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            per_second,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line of kind `what` may be written now. When a new second starts after
    /// lines were suppressed, logs how many first.
    pub(crate) fn allow(&self, what: Denial) -> bool {
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let w = windows.entry(what).or_insert(Window {
            start: now,
            lines: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            if w.suppressed > 0 {
                tracing::info!(
                    kind = what.as_str(),
                    suppressed = w.suppressed,
                    "suppressed {} similar lines (at most {} per second: denial_log_lines_per_second)",
                    w.suppressed,
                    self.per_second
                );
            }
            *w = Window {
                start: now,
                lines: 0,
                suppressed: 0,
            };
        }
        if w.lines < self.per_second {
            w.lines += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Lines suppressed in the current second for `what` (for tests).
    #[cfg(test)]
    fn suppressed(&self, what: Denial) -> u64 {
        self.windows
            .lock()
            .unwrap()
            .get(&what)
            .map_or(0, |w| w.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_bounded_in_count_length_and_token_size() {
        let l = RequestLimits::default();
        assert!(l.check_fetch_audiences(&["a".into()]).is_ok());
        assert!(l.check_fetch_audiences(&[]).is_err());
        let max_len = "a".repeat(DEFAULT_MAX_JWT_AUDIENCE_LENGTH);
        let most = vec![max_len.clone(); DEFAULT_MAX_JWT_AUDIENCES];
        assert!(l.check_fetch_audiences(&most).is_ok(), "the defaults agree");
        let e = l
            .check_fetch_audiences(&vec!["a".into(); DEFAULT_MAX_JWT_AUDIENCES + 1])
            .unwrap_err();
        assert!(e.to_string().contains("max_jwt_audiences = 16"), "{e}");
        let e = l
            .check_fetch_audiences(&[format!("{max_len}a")])
            .unwrap_err();
        assert!(
            e.to_string().contains("max_jwt_audience_length = 1024"),
            "{e}"
        );
        // Quotes double in JSON: sixteen such audiences would not fit the token limit.
        let quotes = vec!["\"".repeat(DEFAULT_MAX_JWT_AUDIENCE_LENGTH); 16];
        let e = l.check_fetch_audiences(&quotes).unwrap_err();
        assert!(e.to_string().contains("max_jwt_token_length"), "{e}");
        let at_limit = "t".repeat(DEFAULT_MAX_JWT_TOKEN_LENGTH);
        assert!(l.check_validate(&at_limit, "a").is_ok());
        let e = l.check_validate(&format!("{at_limit}t"), "a").unwrap_err();
        assert!(
            e.to_string().contains("max_jwt_token_length = 32768"),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn denial_lines_are_throttled_per_kind() {
        let t = Throttle::new(3);
        let allowed = (0..100).filter(|_| t.allow(Denial::NoIdentity)).count();
        assert_eq!(allowed, 3);
        assert_eq!(t.suppressed(Denial::NoIdentity), 97);
        assert!(
            t.allow(Denial::JwtRejected),
            "another kind has its own budget"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(t.allow(Denial::NoIdentity), "a new second");
        assert_eq!(t.suppressed(Denial::NoIdentity), 0);
    }
}
