//! The JWT profile on the client side: `spiffed api fetch jwt` and `spiffed api validate jwt`.
//!
//! Fetching goes through the `spiffe` crate (`WorkloadApiClient::fetch_all_jwt_svids`, which
//! keeps every SVID and its hint). Validation calls `ValidateJWTSVID` with the generated client
//! instead, because the crate keeps only `sub`, `aud` and `exp` of the claims the agent returns,
//! and `validate jwt` prints them all. An `InvalidArgument` answer to `ValidateJWTSVID` is the
//! protocol's "this token is not valid", with the reason as its message: a normal outcome here,
//! not a protocol error.
//!
//! A fetched token is printed (that is the command's purpose); a token given to `validate` is
//! never echoed, in whole or in part.

use std::fmt::Write as _;
use std::io::Read as _;
use std::time::Duration;

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use spiffe::transport::{GrpcStatusCode, TransportError};
use spiffe::{JwtSvid, SpiffeId, WorkloadApiError};
use spiffed_proto::workload::ValidateJwtsvidRequest;
use spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use zeroize::Zeroizing;

use super::report::{duration_ms, received_line, rfc3339};
use super::{ClientError, SocketAddress, api_request, connect, connect_channel, my_uid};

/// What `api fetch jwt` received: the agent's JWT-SVIDs, in its order (the first is the
/// default). [`JwtSvid`]'s `Debug` shows the token's length, not the token.
#[derive(Debug, Clone)]
pub(crate) struct JwtReport {
    /// The SVIDs.
    pub(crate) svids: Vec<JwtSvid>,
    /// How long the fetch took.
    pub(crate) elapsed: Option<Duration>,
}

impl JwtReport {
    /// Readable text, in the manner of `spire-agent api fetch jwt`: per SVID the token on a line
    /// of its own, then SPIFFE ID, hint, expiry and audience. No trailing newline.
    pub(crate) fn render_text(&self) -> String {
        let mut out = received_line(self.svids.len(), self.elapsed);
        for svid in &self.svids {
            out.push('\n');
            let _ = writeln!(out, "{}", svid.token());
            let _ = writeln!(out, "SPIFFE ID:     {}", svid.spiffe_id());
            if let Some(hint) = svid.hint() {
                let _ = writeln!(out, "Hint:          {hint}");
            }
            let _ = writeln!(out, "Expires at:    {}", rfc3339(svid.expiry()));
            let _ = writeln!(out, "Audience:      {}", svid.audience().join(", "));
        }
        // No trailing newline: the caller prints with println!.
        out.pop();
        out
    }

    /// The JSON form: `{"svids":[{"spiffe_id","hint","token","expires_at","audience"}],
    /// "elapsed_ms":...}`.
    pub(crate) fn to_json(&self) -> Value {
        let svids: Vec<Value> = self
            .svids
            .iter()
            .map(|svid| {
                serde_json::json!({
                    "spiffe_id": svid.spiffe_id().to_string(),
                    "hint": svid.hint(),
                    "token": svid.token(),
                    "expires_at": rfc3339(svid.expiry()),
                    "audience": svid.audience(),
                })
            })
            .collect();
        serde_json::json!({
            "svids": svids,
            "elapsed_ms": self.elapsed.map(duration_ms),
        })
    }
}

/// Fetches the JWT-SVIDs for `audience` once: every identity of this process, or only
/// `spiffe_id`. The caller bounds the time it takes.
pub(crate) async fn fetch(
    addr: &SocketAddress,
    audience: &[String],
    spiffe_id: Option<&SpiffeId>,
) -> Result<JwtReport, ClientError> {
    let started = tokio::time::Instant::now();
    let client = connect(addr).await?;
    let svids = client
        .fetch_all_jwt_svids(audience, spiffe_id)
        .await
        .map_err(|e| fetch_error(addr, spiffe_id, e))?;
    Ok(JwtReport {
        svids,
        elapsed: Some(started.elapsed()),
    })
}

/// Classifies a failed `FetchJWTSVID`. With `--spiffe-id`, a denial means this process is not
/// entitled to that ID (spiffed says "no identity issued: the caller is not entitled to ID",
/// which the `spiffe` crate folds into `NoIdentityIssued`). `InvalidArgument` carries the
/// agent's reason (a malformed SPIFFE ID, an empty audience).
fn fetch_error(
    addr: &SocketAddress,
    spiffe_id: Option<&SpiffeId>,
    err: WorkloadApiError,
) -> ClientError {
    match (&err, spiffe_id) {
        (WorkloadApiError::NoIdentityIssued, Some(id)) => ClientError::NotEntitled {
            spiffe_id: id.to_string(),
            uid: my_uid(),
        },
        (WorkloadApiError::Transport(TransportError::Status(status)), _)
            if status.code() == GrpcStatusCode::InvalidArgument =>
        {
            ClientError::InvalidRequest {
                path: addr.path.clone(),
                message: status.message().to_owned(),
            }
        }
        _ => ClientError::from_api(&addr.path, err),
    }
}

/// The agent's verdict on a token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Validation {
    /// The token is valid for the audience.
    Valid {
        /// The token's SPIFFE ID.
        spiffe_id: String,
        /// Every claim of the token, as the agent returned them.
        claims: Map<String, Value>,
    },
    /// The token is not valid.
    Invalid {
        /// The agent's reason.
        reason: String,
    },
}

impl Validation {
    /// Whether the token is valid.
    pub(crate) fn is_valid(&self) -> bool {
        matches!(self, Self::Valid { .. })
    }

    /// Readable text: for a valid token, "Token is valid.", the SPIFFE ID and the claims as
    /// pretty JSON; for an invalid one, "Token is not valid: REASON". No trailing newline.
    pub(crate) fn render_text(&self) -> String {
        match self {
            Self::Valid { spiffe_id, claims } => {
                let pretty = serde_json::to_string_pretty(claims)
                    .unwrap_or_else(|_| Value::Object(claims.clone()).to_string());
                format!("Token is valid.\nSPIFFE ID:     {spiffe_id}\nClaims:\n{pretty}")
            }
            Self::Invalid { reason } => format!("Token is not valid: {reason}"),
        }
    }

    /// The JSON form: `{"valid":true,"spiffe_id":...,"claims":{...}}` or
    /// `{"valid":false,"reason":...}`.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Self::Valid { spiffe_id, claims } => serde_json::json!({
                "valid": true,
                "spiffe_id": spiffe_id,
                "claims": claims,
            }),
            Self::Invalid { reason } => serde_json::json!({
                "valid": false,
                "reason": reason,
            }),
        }
    }
}

/// Asks the agent whether `token` is a valid JWT-SVID for `audience` (`ValidateJWTSVID`). An
/// `InvalidArgument` answer is [`Validation::Invalid`]; other failures are errors. The caller
/// bounds the time it takes.
pub(crate) async fn validate(
    addr: &SocketAddress,
    audience: &str,
    token: &str,
) -> Result<Validation, ClientError> {
    let mut client = SpiffeWorkloadApiClient::new(connect_channel(addr).await?);
    let request = api_request(ValidateJwtsvidRequest {
        audience: audience.to_owned(),
        svid: token.to_owned(),
    });
    match client.validate_jwtsvid(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.spiffe_id.is_empty() {
                return Err(ClientError::Malformed {
                    path: addr.path.clone(),
                    what: "ValidateJWTSVIDResponse.spiffe_id is empty",
                });
            }
            let claims = response.claims.map(struct_to_json).unwrap_or_default();
            Ok(Validation::Valid {
                spiffe_id: response.spiffe_id,
                claims,
            })
        }
        Err(status) if status.code() == tonic::Code::InvalidArgument => Ok(Validation::Invalid {
            reason: status.message().to_owned(),
        }),
        Err(status) if status.code() == tonic::Code::PermissionDenied => {
            Err(ClientError::PermissionDenied {
                path: addr.path.clone(),
                message: status.message().to_owned(),
            })
        }
        Err(status) => Err(ClientError::Status {
            path: addr.path.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        }),
    }
}

/// Reads the TOKEN argument: the token itself, or `-` for standard input. Surrounding
/// whitespace (a trailing newline from `echo` or a file) is removed.
pub(crate) fn read_token(arg: &str) -> Result<Zeroizing<String>, ClientError> {
    let token = if arg == "-" {
        let mut buf = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut buf)
            .map_err(ClientError::ReadToken)?;
        Zeroizing::new(buf.trim().to_owned())
    } else {
        Zeroizing::new(arg.trim().to_owned())
    };
    if token.is_empty() {
        return Err(ClientError::NoToken);
    }
    Ok(token)
}

/// A protobuf `Struct` as a JSON object.
fn struct_to_json(s: prost_types::Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

/// A protobuf `Value` as JSON. `Struct` numbers are doubles: whole numbers that a double holds
/// exactly (such as `exp` and `iat`) print as integers.
fn value_to_json(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => number_to_json(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.into_iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
    }
}

/// A double as a JSON number: an integer when it is one and exactly representable, null when
/// it is not finite.
fn number_to_json(n: f64) -> Value {
    /// 2^53: every integer of smaller magnitude is exact in a double.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() < EXACT {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "a whole number below 2^53 converts exactly"
        )]
        let i = n as i64;
        return Value::Number(Number::from(i));
    }
    Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    fn string(s: &str) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    #[test]
    fn claims_convert_with_whole_numbers_as_integers() {
        let s = prost_types::Struct {
            fields: [
                ("sub".to_owned(), string("spiffe://example.org/web")),
                ("exp".to_owned(), num(1_767_225_600.0)),
                ("half".to_owned(), num(0.5)),
                ("nan".to_owned(), num(f64::NAN)),
                (
                    "aud".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue {
                            values: vec![string("a"), string("b")],
                        })),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        };
        let json = Value::Object(struct_to_json(s));
        assert_eq!(
            json,
            serde_json::json!({
                "sub": "spiffe://example.org/web",
                "exp": 1_767_225_600_i64,
                "half": 0.5,
                "nan": null,
                "aud": ["a", "b"],
            })
        );
        assert_eq!(json["exp"].to_string(), "1767225600");
    }

    #[test]
    fn validation_text_and_json() {
        let mut claims = Map::new();
        claims.insert("sub".into(), "spiffe://example.org/web".into());
        let valid = Validation::Valid {
            spiffe_id: "spiffe://example.org/web".into(),
            claims,
        };
        let text = valid.render_text();
        assert!(text.starts_with("Token is valid.\nSPIFFE ID:     spiffe://example.org/web\n"));
        assert!(text.contains("\"sub\": \"spiffe://example.org/web\""));
        assert_eq!(valid.to_json()["valid"], true);
        assert_eq!(valid.to_json()["claims"]["sub"], "spiffe://example.org/web");

        let invalid = Validation::Invalid {
            reason: "token has expired".into(),
        };
        assert!(!invalid.is_valid());
        assert_eq!(
            invalid.render_text(),
            "Token is not valid: token has expired"
        );
        assert_eq!(
            invalid.to_json(),
            serde_json::json!({"valid": false, "reason": "token has expired"})
        );
    }

    #[test]
    fn token_argument_is_trimmed_and_must_not_be_empty() {
        assert_eq!(read_token(" a.b.c\n").unwrap().as_str(), "a.b.c");
        assert!(matches!(read_token("  "), Err(ClientError::NoToken)));
    }

    #[test]
    fn fetch_report_text_and_json() {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
        let header = B64URL.encode(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
        let claims =
            B64URL.encode(r#"{"sub":"spiffe://example.org/web","aud":["a","b"],"exp":1767225600}"#);
        let token = format!("{header}.{claims}.sig");
        let svid = JwtSvid::parse_insecure(&token)
            .unwrap()
            .with_hint("internal");
        let report = JwtReport {
            svids: vec![svid],
            elapsed: Some(Duration::from_micros(1500)),
        };
        let text = report.render_text();
        for want in [
            "Received 1 svid(s) after 1.50 ms",
            &format!("\n\n{token}\n"),
            "SPIFFE ID:     spiffe://example.org/web",
            "Hint:          internal",
            "Expires at:    2026-01-01T00:00:00Z",
            "Audience:      a, b",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.ends_with('\n'));
        let json = report.to_json();
        let first = &json["svids"][0];
        assert_eq!(first["spiffe_id"], "spiffe://example.org/web");
        assert_eq!(first["hint"], "internal");
        assert_eq!(first["token"], token.as_str());
        assert_eq!(first["expires_at"], "2026-01-01T00:00:00Z");
        assert_eq!(first["audience"], serde_json::json!(["a", "b"]));
    }
}
