//! Reading the few facts the server link needs from X.509 certificates (DER), with errors that
//! say which certificate was wrong.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// What a certificate says about itself, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertFacts {
    /// The URI SANs, in order.
    pub(crate) uris: Vec<String>,
    /// Start of validity.
    pub(crate) not_before: SystemTime,
    /// End of validity.
    pub(crate) not_after: SystemTime,
    /// The subjectPublicKey bits (for EC keys the SEC1 point).
    pub(crate) public_key: Vec<u8>,
    /// The serial number, hex.
    pub(crate) serial: String,
    /// The DER of the subject name.
    pub(crate) subject: Vec<u8>,
    /// The DER of the issuer name.
    pub(crate) issuer: Vec<u8>,
    /// Whether KeyUsage has digitalSignature (`None`: no KeyUsage extension).
    pub(crate) digital_signature: Option<bool>,
}

/// Parses a DER certificate; the error is the parser's, to be put in context by the caller.
pub(crate) fn facts(der: &[u8]) -> Result<CertFacts, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the certificate", rest.len()));
    }
    let mut uris = Vec::new();
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push((*u).to_owned());
                }
            }
        }
        Ok(None) => {}
        Err(e) => return Err(format!("bad subjectAltName: {e}")),
    }
    let digital_signature = match cert.key_usage() {
        Ok(Some(ku)) => Some(ku.value.digital_signature()),
        Ok(None) => None,
        Err(e) => return Err(format!("bad keyUsage: {e}")),
    };
    let validity = cert.validity();
    Ok(CertFacts {
        uris,
        not_before: unix(validity.not_before.timestamp()),
        not_after: unix(validity.not_after.timestamp()),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        subject: cert.subject().as_raw().to_vec(),
        issuer: cert.issuer().as_raw().to_vec(),
        digital_signature,
    })
}

/// A Unix timestamp as a `SystemTime` (clamped at the epoch).
pub(crate) fn unix(secs: i64) -> SystemTime {
    u64::try_from(secs)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH)
}

/// Seconds since the epoch, for messages and the status.
pub(crate) fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A time as RFC 3339-ish UTC text (`2026-12-01T18:00:00Z`) for messages.
pub(crate) fn show(t: SystemTime) -> String {
    let s = secs(t);
    let days = s.div_euclid(86_400);
    let rem = s.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_as_utc() {
        assert_eq!(show(unix(0)), "1970-01-01T00:00:00Z");
        assert_eq!(show(unix(1_796_083_200)), "2026-12-01T00:00:00Z");
        assert_eq!(show(unix(951_825_599)), "2000-02-29T11:59:59Z");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(facts(b"not a certificate").is_err());
        assert!(facts(&[]).is_err());
    }
}
