//! JWT profile encodings: the JWKS of a JWT bundle, and claims as a protobuf `Struct`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use prost_types::value::Kind;
use serde_json::{Map, Value, json};
use spiffed_core::JwtBundle;

/// The bundle as a plain JWK Set, as SPIRE serves it on the Workload API: every key with `kid`,
/// `kty`, `crv` and full-length coordinates; no `use`, no `spiffe_*` members (CONFORMANCE 50).
pub(crate) fn jwks(bundle: &JwtBundle) -> Vec<u8> {
    let keys: Vec<Value> = bundle
        .keys
        .iter()
        .filter_map(|k| {
            // Uncompressed P-256 point: 0x04 || X (32) || Y (32).
            let x = k.public_point.get(1..33)?;
            let y = k.public_point.get(33..65)?;
            Some(json!({
                "kty": "EC",
                "kid": k.kid,
                "crv": "P-256",
                "x": B64URL.encode(x),
                "y": B64URL.encode(y),
            }))
        })
        .collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

/// The trust domain of the token's `sub` claim, read without verifying anything (to pick the
/// bundle to verify with); `None` when the token is not a readable JWS with a SPIFFE ID `sub`.
pub(crate) fn subject_trust_domain(token: &str) -> Option<spiffed_core::TrustDomain> {
    let payload = token.split('.').nth(1)?;
    let bytes = B64URL.decode(payload).ok()?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    let id = spiffed_core::SpiffeId::new(sub).ok()?;
    Some(id.trust_domain().clone())
}

/// JSON claims as a protobuf `Struct` (numbers become doubles, as the Struct type demands).
pub(crate) fn claims_struct(claims: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(claims_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffed_core::{JwtAuthority, TrustDomain};
    use std::time::SystemTime;

    #[test]
    fn jwks_has_full_coordinates_and_kid() {
        let mut point = vec![4u8];
        point.extend([0u8; 32]); // leading zeros must survive: go-jose wants 32 bytes
        point.extend([7u8; 32]);
        let b = JwtBundle {
            trust_domain: TrustDomain::new("td").unwrap(),
            keys: vec![JwtAuthority {
                kid: "k1".into(),
                public_point: point,
                not_after: SystemTime::now(),
            }],
            sequence: 1,
        };
        let v: Value = serde_json::from_slice(&jwks(&b)).unwrap();
        let k = &v["keys"][0];
        assert_eq!(k["kid"], "k1");
        assert_eq!(k["kty"], "EC");
        assert_eq!(B64URL.decode(k["x"].as_str().unwrap()).unwrap().len(), 32);
        assert!(k.get("use").is_none() && k.get("d").is_none());
    }

    #[test]
    fn claims_keep_types() {
        let m: Map<String, Value> =
            serde_json::from_str(r#"{"sub":"s","aud":["a"],"exp":5,"x":{"y":true}}"#).unwrap();
        let s = claims_struct(m);
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        assert!(matches!(&s.fields["aud"].kind, Some(Kind::ListValue(l)) if l.values.len() == 1));
        assert!(matches!(&s.fields["x"].kind, Some(Kind::StructValue(_))));
    }
}
