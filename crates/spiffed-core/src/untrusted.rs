//! Client-supplied strings in log lines and error messages, at a bounded cost.
//!
//! A caller controls the audiences, `kid`s, token fragments and requested SPIFFE IDs it sends,
//! and (through its executable's path) some of its selectors. Logging those verbatim lets one
//! caller write megabytes of log per request, or forge log lines with control characters.
//! Every such string goes through [`Untrusted`] (or [`clip`]) before it reaches a log line or
//! an error message: at most [`max_chars`] characters are kept, control and other
//! non-printable characters are escaped, and a longer string is shown as its start, its length
//! and a short SHA-256 digest, so that two long values can still be told apart.
//!
//! ```
//! use spiffed_core::untrusted::Untrusted;
//! let long = "a".repeat(10_000);
//! let shown = Untrusted(&long).to_string();
//! assert!(shown.len() < 200);
//! assert!(shown.contains("10000 bytes"));
//! assert_eq!(Untrusted("web\nFAKE LINE").to_string(), "web\\nFAKE LINE");
//! ```

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default for [`max_chars`]: long enough for any real audience, SPIFFE ID or path head.
pub const DEFAULT_MAX_CHARS: usize = 128;

/// The smallest setting [`set_max_chars`] accepts (shorter would hide too much).
pub const MIN_MAX_CHARS: usize = 16;

static MAX_CHARS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_CHARS);

/// Sets how many characters of a client-supplied string are kept (the agent's
/// `max_logged_string_length`), process-wide. Values below [`MIN_MAX_CHARS`] are raised to it.
pub fn set_max_chars(n: usize) {
    MAX_CHARS.store(n.max(MIN_MAX_CHARS), Ordering::Relaxed);
}

/// How many characters of a client-supplied string are kept (default [`DEFAULT_MAX_CHARS`]).
pub fn max_chars() -> usize {
    MAX_CHARS.load(Ordering::Relaxed)
}

/// A client-supplied string, displayed bounded and escaped (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = max_chars();
        for (shown, c) in self.0.chars().enumerate() {
            if shown >= max {
                // More follows: summarize instead.
                return write!(
                    f,
                    "…({} bytes, sha256:{})",
                    self.0.len(),
                    short_digest(self.0.as_bytes())
                );
            }
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' || c == '\u{feff}' {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// [`Untrusted`] as an owned string, for error values that outlive the request.
pub fn clip(s: &str) -> String {
    Untrusted(s).to_string()
}

/// A list of client-supplied strings, displayed as `[a, b, …]`: each one bounded and at most
/// [`MAX_LISTED`] of them, then the count of the rest.
#[derive(Clone, Copy, Debug)]
pub struct UntrustedList<'a>(pub &'a [String]);

/// How many items of an [`UntrustedList`] are shown.
pub const MAX_LISTED: usize = 8;

impl fmt::Display for UntrustedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (i, s) in self.0.iter().take(MAX_LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{:?}", Untrusted(s).to_string())?;
        }
        if self.0.len() > MAX_LISTED {
            write!(f, ", …{} more", self.0.len() - MAX_LISTED)?;
        }
        f.write_char(']')
    }
}

/// The first 4 bytes of the SHA-256 of `b`, as 8 hex digits.
fn short_digest(b: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    d.as_ref()
        .iter()
        .take(4)
        .fold(String::with_capacity(8), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_are_kept_and_long_ones_summarized() {
        assert_eq!(
            Untrusted("spiffe://example.org/web").to_string(),
            "spiffe://example.org/web"
        );
        let exact = "x".repeat(DEFAULT_MAX_CHARS);
        assert_eq!(Untrusted(&exact).to_string(), exact);
        let long = format!("{exact}y");
        let shown = Untrusted(&long).to_string();
        assert!(shown.starts_with(&exact), "{shown}");
        assert!(shown.contains("129 bytes, sha256:"), "{shown}");
        // Two long values with the same start differ in the digest.
        let other = format!("{exact}z");
        assert_ne!(shown, Untrusted(&other).to_string());
        let huge = "k".repeat(45_000);
        assert!(Untrusted(&huge).to_string().len() < DEFAULT_MAX_CHARS + 64);
    }

    #[test]
    fn control_characters_cannot_forge_lines() {
        let s = Untrusted("a\nlevel=ERROR fake\r\u{1b}[31m").to_string();
        assert!(!s.chars().any(char::is_control), "{s:?}");
        assert!(s.contains("\\n") && s.contains("\\u{1b}"), "{s}");
    }

    #[test]
    fn lists_are_bounded_in_count_and_length() {
        let many: Vec<String> = (0..1000).map(|i| format!("aud{i}")).collect();
        let s = UntrustedList(&many).to_string();
        assert!(s.starts_with("[\"aud0\", \"aud1\""), "{s}");
        assert!(s.ends_with(", …992 more]"), "{s}");
        assert_eq!(UntrustedList(&[]).to_string(), "[]");
    }
}
