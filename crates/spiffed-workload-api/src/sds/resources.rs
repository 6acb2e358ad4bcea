//! What an SDS response holds: the requested names resolved against a workload's identities
//! and bundles, each as an Envoy `tls.v3.Secret` (SDS.md §2).
//!
//! Pure: no I/O, no clock. The stream (`sds.rs`) takes a snapshot of the workload's SVIDs and
//! bundle set and asks [`build`] for the resources of the names last requested.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::google::protobuf::{Any, value};
use prost::Message as _;
use spiffed_core::{BundleSet, Identity, TrustBundle, TrustDomain};
use zeroize::{Zeroize as _, Zeroizing};

use super::SdsConfig;
use crate::ApiError;

/// The type URL of every resource sent (`envoy.extensions.transport_sockets.tls.v3.Secret`).
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The type URL of the SPIFFE validator's config.
const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The node metadata key that overrides `disable_spiffe_cert_validation` for one Envoy.
pub const DISABLE_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";

/// How validation contexts are written for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// `custom_validator_config` with the SPIFFE validator (Envoy 1.18 and later).
    Spiffe,
    /// `trusted_ca` with the PEM CAs of one trust domain (no `ALL`).
    TrustedCa,
}

/// What a client's Envoy node says about validation, kept from the last request that carried a
/// node (later requests may omit it). Only these two facts are kept, not the node itself, so an
/// open stream's memory does not grow with the node's metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePrefs {
    /// The node metadata's `disable_spiffe_cert_validation`, when it is a bool or a string Go's
    /// `strconv.ParseBool` accepts (as spire-agent); anything else is ignored.
    pub disable_override: Option<bool>,
    /// Whether `user_agent_build_version` names an Envoy older than 1.18, which lacks the
    /// SPIFFE validator. A node without a build version, or with one that has no `version`,
    /// is taken to have it (spire-agent v1.13.3 crashes on the latter).
    pub before_1_18: bool,
}

impl NodePrefs {
    /// Reads the two facts from `node`.
    pub fn of(node: &Node) -> Self {
        let disable_override = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(DISABLE_VALIDATION_KEY))
            .and_then(|v| match &v.kind {
                Some(value::Kind::BoolValue(b)) => Some(*b),
                Some(value::Kind::StringValue(s)) => parse_go_bool(s),
                _ => None,
            });
        let before_1_18 = match &node.user_agent_version_type {
            Some(node::UserAgentVersionType::UserAgentBuildVersion(b)) => {
                b.version.as_ref().is_some_and(|v| {
                    v.major_number < 1 || (v.major_number == 1 && v.minor_number < 18)
                })
            }
            _ => false,
        };
        Self {
            disable_override,
            before_1_18,
        }
    }

    /// The validation form for this client, given the agent-wide setting.
    pub fn validation(&self, disable_spiffe_cert_validation: bool) -> Validation {
        let disabled = self
            .disable_override
            .unwrap_or(disable_spiffe_cert_validation);
        if disabled || self.before_1_18 {
            Validation::TrustedCa
        } else {
            Validation::Spiffe
        }
    }
}

/// The strings Go's `strconv.ParseBool` accepts.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A workload's state at one moment: its identities (any order; `default` is the one of the
/// lowest entry ID, as spire-agent) and the agent's bundle set.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    /// The workload's identities.
    pub ids: &'a [Identity],
    /// Every bundle; the workload sees the own one and those its entries federate with.
    pub bundles: &'a BundleSet,
    /// The workload sees every federated bundle (`[federation] federate_all`).
    pub federate_all: bool,
}

impl Snapshot<'_> {
    /// The federated bundles the workload is entitled to, by trust domain.
    fn federated(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.federated().filter(|b| {
            self.federate_all
                || self
                    .ids
                    .iter()
                    .any(|i| i.entry.federates_with.contains(b.trust_domain()))
        })
    }

    /// The identities ordered by entry ID, the first of each SPIFFE ID only.
    fn identities(&self) -> Vec<&Identity> {
        let mut ids: Vec<&Identity> = self.ids.iter().collect();
        ids.sort_by(|a, b| a.entry.id.as_str().cmp(b.entry.id.as_str()));
        let mut seen = BTreeSet::new();
        ids.retain(|i| seen.insert(i.entry.spiffe_id.to_string()));
        ids
    }
}

/// The resources for `names` (empty, or only empty strings: everything the workload holds),
/// in this order: bundles (own trust domain, `default_bundle_name`, `default_all_bundles_name`,
/// federated trust domains in order), then certificates (each SPIFFE ID by entry ID, then
/// `default_svid_name`). Each resource is built once even if named twice.
///
/// Unlike spire-agent, a request may name both `ROOTCA` and `ALL`, or both `default` and the
/// SPIFFE ID it stands for; spire-agent serves only one of each pair and refuses the other.
///
/// Errors: [`ApiError::SdsNotAuthorized`] with every name the workload holds nothing for;
/// `BadRequest` for `ALL` when validation contexts are plain `trusted_ca`.
pub fn build(
    names: &[String],
    snap: &Snapshot<'_>,
    validation: Validation,
    cfg: &SdsConfig,
) -> Result<Vec<Any>, ApiError> {
    let mut wanted: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .collect();
    let everything = wanted.is_empty();
    let mut want = |name: &str| everything || wanted.remove(name);
    let mut out = Vec::new();

    let own = snap.bundles.own();
    let own_id = own.trust_domain().id_string();
    if want(&own_id) {
        out.push(bundle_secret(&own_id, own, validation));
    }
    if !everything && want(&cfg.default_bundle_name) {
        out.push(bundle_secret(&cfg.default_bundle_name, own, validation));
    }
    if !everything && want(&cfg.default_all_bundles_name) {
        if validation == Validation::TrustedCa {
            return Err(ApiError::BadRequest(format!(
                "unable to use the SPIFFE validator for {:?} on Envoy below 1.18 or with \
                 disable_spiffe_cert_validation: ask for {:?} or the trust domain IDs instead",
                cfg.default_all_bundles_name, cfg.default_bundle_name
            )));
        }
        let all: Vec<&TrustBundle> = std::iter::once(own).chain(snap.federated()).collect();
        out.push(spiffe_validation_secret(
            &cfg.default_all_bundles_name,
            &all,
        ));
    }
    for b in snap.federated() {
        let id = b.trust_domain().id_string();
        if want(&id) {
            out.push(bundle_secret(&id, b, validation));
        }
    }

    let ids = snap.identities();
    for i in &ids {
        let id = i.entry.spiffe_id.to_string();
        if want(&id) {
            out.push(certificate_secret(&id, i)?);
        }
    }
    if !everything
        && let Some(first) = ids.first()
        && want(&cfg.default_svid_name)
    {
        out.push(certificate_secret(&cfg.default_svid_name, first)?);
    }
    if !wanted.is_empty() {
        return Err(ApiError::SdsNotAuthorized(
            wanted.into_iter().map(str::to_owned).collect(),
        ));
    }
    Ok(out)
}

/// `secret` packed as a resource; the encoded bytes are the only copy left of a key it held.
fn pack(mut secret: Secret) -> Any {
    let value = secret.encode_to_vec();
    if let Some(secret::Type::TlsCertificate(tls)) = &mut secret.r#type
        && let Some(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(key)),
            ..
        }) = &mut tls.private_key
    {
        key.zeroize();
    }
    Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        value,
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

/// A `tls_certificate` named `name`: the chain as PEM (one block per certificate, leaf first)
/// and the key as PKCS#8 PEM.
fn certificate_secret(name: &str, identity: &Identity) -> Result<Any, ApiError> {
    let svid = &identity.x509;
    let certs = split_der(&svid.cert_chain_der).ok_or_else(|| {
        ApiError::Internal(format!(
            "the X.509-SVID of {} is not a DER certificate chain",
            svid.spiffe_id
        ))
    })?;
    let chain = pem("CERTIFICATE", certs);
    let key = pem("PRIVATE KEY", [svid.key.pkcs8_der()]);
    Ok(pack(Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.as_bytes().to_vec()),
            private_key: inline(key.as_bytes().to_vec()),
            ..Default::default()
        })),
    }))
}

/// A `validation_context` named `name` for one trust domain, in the client's form.
fn bundle_secret(name: &str, bundle: &TrustBundle, validation: Validation) -> Any {
    match validation {
        Validation::Spiffe => spiffe_validation_secret(name, &[bundle]),
        Validation::TrustedCa => pack(Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(ca_pem(bundle)),
                    ..Default::default()
                },
            )),
        }),
    }
}

/// A `validation_context` named `name` with the SPIFFE validator, one trust domain per bundle,
/// sorted by trust domain name.
fn spiffe_validation_secret(name: &str, bundles: &[&TrustBundle]) -> Any {
    let mut tds: Vec<(&TrustDomain, &TrustBundle)> =
        bundles.iter().map(|b| (b.trust_domain(), *b)).collect();
    tds.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let config = SpiffeCertValidatorConfig {
        trust_domains: tds
            .into_iter()
            .map(|(td, b)| spiffe_cert_validator_config::TrustDomain {
                name: td.as_str().to_owned(),
                trust_bundle: inline(ca_pem(b)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    pack(Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.to_owned(),
                    typed_config: Some(Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.to_owned(),
                        value: config.encode_to_vec(),
                    }),
                }),
                ..Default::default()
            },
        )),
    })
}

/// The X.509 authorities of `bundle` as PEM.
fn ca_pem(bundle: &TrustBundle) -> Vec<u8> {
    let ders = bundle.x509.authorities.iter().map(Vec::as_slice);
    pem("CERTIFICATE", ders).as_bytes().to_vec()
}

/// PEM blocks labelled `label`, one per DER item; zeroized on drop (it may hold a key).
fn pem<'a>(label: &str, ders: impl IntoIterator<Item = &'a [u8]>) -> Zeroizing<String> {
    use base64::Engine as _;
    let mut out = Zeroizing::new(String::new());
    for der in ders {
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
        out.push_str("-----BEGIN ");
        out.push_str(label);
        out.push_str("-----\n");
        let mut rest = b64.as_str();
        while !rest.is_empty() {
            let (line, tail) = rest.split_at(rest.len().min(64));
            out.push_str(line);
            out.push('\n');
            rest = tail;
        }
        out.push_str("-----END ");
        out.push_str(label);
        out.push_str("-----\n");
    }
    out
}

/// Splits concatenated DER items (each a SEQUENCE with a definite length); `None` when the
/// bytes are not exactly that.
pub fn split_der(mut der: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (&tag, rest) = der.split_first()?;
        if tag != 0x30 {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, rest) = rest.split_at(n);
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        };
        let header = der.len() - rest.len();
        let total = header.checked_add(len)?;
        if total > der.len() {
            return None;
        }
        let (item, tail) = der.split_at(total);
        out.push(item);
        der = tail;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::BuildVersion;
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    pub(crate) fn node(version: Option<Option<(u32, u32)>>, meta: Option<value::Kind>) -> Node {
        Node {
            user_agent_version_type: version.map(|v| {
                node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                    version: v.map(|(major, minor)| SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                })
            }),
            metadata: meta.map(|k| Struct {
                fields: [(DISABLE_VALIDATION_KEY.to_owned(), Value { kind: Some(k) })].into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn envoy_versions_and_metadata_choose_the_validation_form() {
        let v = |n: &Node, agent| NodePrefs::of(n).validation(agent);
        // No build version, or one without `version` (spire-agent crashes): the validator.
        assert_eq!(v(&node(None, None), false), Validation::Spiffe);
        assert_eq!(v(&node(Some(None), None), false), Validation::Spiffe);
        assert_eq!(
            v(&node(Some(Some((1, 18))), None), false),
            Validation::Spiffe
        );
        assert_eq!(
            v(&node(Some(Some((2, 0))), None), false),
            Validation::Spiffe
        );
        assert_eq!(
            v(&node(Some(Some((1, 17))), None), false),
            Validation::TrustedCa
        );
        assert_eq!(
            v(&node(Some(Some((0, 99))), None), false),
            Validation::TrustedCa
        );
        // The agent-wide setting, and the node's override either way.
        assert_eq!(v(&node(None, None), true), Validation::TrustedCa);
        let b = |x| Some(value::Kind::BoolValue(x));
        let s = |x: &str| Some(value::Kind::StringValue(x.into()));
        assert_eq!(v(&node(None, b(true)), false), Validation::TrustedCa);
        assert_eq!(v(&node(None, b(false)), true), Validation::Spiffe);
        assert_eq!(v(&node(None, s("true")), false), Validation::TrustedCa);
        assert_eq!(v(&node(None, s("false")), true), Validation::Spiffe);
        assert_eq!(v(&node(None, s("T")), false), Validation::TrustedCa);
        // Unparsable values are ignored.
        assert_eq!(v(&node(None, s("yes")), false), Validation::Spiffe);
        assert_eq!(
            v(&node(None, Some(value::Kind::NumberValue(1.0))), true),
            Validation::TrustedCa
        );
        // The override does not make an old Envoy support the validator.
        assert_eq!(
            v(&node(Some(Some((1, 17))), b(false)), false),
            Validation::TrustedCa
        );
    }

    #[test]
    fn der_items_are_split_exactly() {
        let short = [0x30, 0x02, 0xaa, 0xbb];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend([7u8; 0x80]);
        let both: Vec<u8> = short.iter().chain(long.iter()).copied().collect();
        assert_eq!(split_der(&both).unwrap(), [&short[..], &long[..]]);
        assert_eq!(split_der(&[]).unwrap(), Vec::<&[u8]>::new());
        for bad in [
            &[0x31, 0x00][..],
            &[0x30][..],
            &[0x30, 0x03, 0x01][..],
            &[0x30, 0x80][..],
            &[0x30, 0x85, 1, 1, 1, 1, 1][..],
            &[0x30, 0x82, 0x01][..],
        ] {
            assert!(split_der(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn pem_blocks_wrap_at_64_columns() {
        let p = pem("CERTIFICATE", [&[0u8; 100][..], &[1u8; 3][..]]);
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        // 100 bytes are 136 base64 characters: 64 + 64 + 8.
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2].len(), 64);
        assert_eq!(lines[3].len(), 8);
        assert_eq!(lines[4], "-----END CERTIFICATE-----");
        assert_eq!(lines[5], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[6], "AQEB");
        assert_eq!(p.matches("BEGIN").count(), 2);
    }
}
