//! Node attestation: `Agent/AttestAgent` on a connection without a client certificate, then
//! `Bundle/GetBundle` on the same connection (SPIRE-AGENT.md §1).
//!
//! The agent sends its attestation data and a CSR for a fresh key, answers the server's
//! challenges (x509pop), and receives its agent SVID and whether it may re-attest. What comes
//! back is checked before it is used: the chain parses, the leaf's ID is in our trust domain,
//! the leaf carries our key, and it has not expired.

mod x509pop;

use std::path::PathBuf;
use std::time::SystemTime;

use spiffe::TrustDomain;
use spiffed_proto::spire::agent::agent_client::AgentClient;
use spiffed_proto::spire::agent::{
    AgentX509svidParams, AttestAgentRequest, attest_agent_request, attest_agent_response,
};
use spiffed_proto::spire::bundle::GetBundleRequest;
use spiffed_proto::spire::bundle::bundle_client::BundleClient;
use spiffed_proto::spire::types;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::agent_svid::{AgentKey, AgentSvid};
use crate::config::{JoinToken, NodeAttestation};
use crate::link::rpc;
use crate::server::ServerError;

pub(crate) use x509pop::X509Pop;

#[cfg(test)]
pub(crate) use x509pop::testing as x509pop_testing;

/// At most this many challenge rounds (x509pop has one).
const MAX_CHALLENGES: usize = 8;

/// The fix for a join token the server refuses or the agent lacks.
pub(crate) const NEW_TOKEN_FIX: &str = "get a new one with `spire-server token generate` on \
     the server (optionally -spiffeID spiffe://<trust domain>/host/<name>) and pass it with \
     --join-token, SPIFFED_JOIN_TOKEN or join_token in [spire_server]";

/// How this node attests, from the configuration.
#[derive(Clone, Debug)]
pub(crate) enum Attestor {
    /// A join token, if one was given.
    JoinToken(Option<JoinToken>),
    /// x509pop with these files.
    X509Pop {
        certificate_path: PathBuf,
        private_key_path: PathBuf,
        intermediates_path: Option<PathBuf>,
    },
}

impl Attestor {
    pub(crate) fn from_config(a: &NodeAttestation) -> Self {
        match a {
            NodeAttestation::JoinToken(t) => Self::JoinToken(t.clone()),
            NodeAttestation::X509Pop {
                certificate_path,
                private_key_path,
                intermediates_path,
            } => Self::X509Pop {
                certificate_path: certificate_path.clone(),
                private_key_path: private_key_path.clone(),
                intermediates_path: intermediates_path.clone(),
            },
        }
    }

    /// The attestor's name on the wire.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::JoinToken(_) => "join_token",
            Self::X509Pop { .. } => "x509pop",
        }
    }

    /// Reads the node's files (x509pop), with the errors a user must fix.
    pub(crate) fn load_x509pop(&self, now: SystemTime) -> Result<Option<X509Pop>, AttestError> {
        match self {
            Self::X509Pop {
                certificate_path,
                private_key_path,
                intermediates_path,
            } => X509Pop::load(
                certificate_path,
                private_key_path,
                intermediates_path.as_ref(),
                now,
            )
            .map(Some)
            .map_err(AttestError::Node),
            Self::JoinToken(_) => Ok(None),
        }
    }
}

/// What an attestation gives.
#[derive(Debug)]
pub(crate) struct Attested {
    /// The agent SVID, checked.
    pub(crate) svid: AgentSvid,
    /// Whether the agent may re-attest (x509pop) rather than renew (join_token).
    pub(crate) reattestable: bool,
    /// The trust domain's bundle, from `GetBundle` right after.
    pub(crate) bundle: types::Bundle,
}

/// Why an attestation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum AttestError {
    /// No address gave a connection, or it broke (retry later).
    #[error("cannot reach the SPIRE Server at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// Join-token attestation with no token.
    #[error(
        "the agent has no usable agent SVID and no join token to attest with: {}",
        NEW_TOKEN_FIX
    )]
    NoToken,
    /// The server refused the join token (used, expired, unknown).
    #[error(
        "the SPIRE Server refused the join token ({message}): {}",
        NEW_TOKEN_FIX
    )]
    TokenRefused { message: String },
    /// The node is banned.
    #[error(
        "the SPIRE Server refused the attestation because the agent is banned ({message}): \
         remove it with `spire-server agent evict -spiffeID AGENT_ID`, then the agent attests \
         again"
    )]
    Banned { message: String },
    /// The server refused the attestation for another reason.
    #[error("the SPIRE Server refused the {kind} attestation ({code:?}: {message}){hint}")]
    Refused {
        kind: &'static str,
        code: tonic::Code,
        message: String,
        hint: String,
    },
    /// The node's own files are unusable (x509pop).
    #[error("{0}")]
    Node(String),
    /// The agent could not make its key or CSR.
    #[error("{0}")]
    Local(String),
    /// The server's answer breaks the protocol.
    #[error("the SPIRE Server sent an invalid attestation answer: {0}")]
    Invalid(String),
}

impl AttestError {
    /// Whether trying again with the same configuration cannot succeed (the operator must act).
    pub(crate) fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::NoToken | Self::TokenRefused { .. } | Self::Banned { .. } | Self::Node(_)
        )
    }

    fn from_server(e: ServerError, kind: &'static str) -> Self {
        match e {
            ServerError::Unreachable { address, reason } => Self::Unreachable { address, reason },
            ServerError::Invalid(m) => Self::Invalid(m),
            ServerError::NotAttested(m) => Self::Local(m),
            ServerError::PermissionDenied { message, .. } if message.contains("banned") => {
                Self::Banned { message }
            }
            ServerError::PermissionDenied { message, .. } => Self::Refused {
                kind,
                code: tonic::Code::PermissionDenied,
                message,
                hint: String::new(),
            },
            ServerError::Status { code, message } => {
                if message.contains("banned") {
                    return Self::Banned { message };
                }
                if kind == "join_token"
                    && matches!(
                        code,
                        tonic::Code::InvalidArgument
                            | tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    )
                {
                    return Self::TokenRefused { message };
                }
                let hint = if kind == "x509pop" {
                    "; check that the node certificate chains to a CA in the server's x509pop \
                     ca_bundle_path, and that the node is not already attested with another \
                     certificate"
                        .to_owned()
                } else {
                    String::new()
                };
                Self::Refused {
                    kind,
                    code,
                    message,
                    hint,
                }
            }
        }
    }
}

/// Attests over `channel` (no client certificate) with `key`, then fetches the bundle on the
/// same connection. The caller bounds the whole exchange in time.
pub(crate) async fn attest(
    channel: Channel,
    address: &str,
    attestor: &Attestor,
    td: &TrustDomain,
    key: AgentKey,
) -> Result<Attested, AttestError> {
    let kind = attestor.kind();
    let pop = attestor.load_x509pop(SystemTime::now())?;
    let payload: Zeroizing<Vec<u8>> = match (attestor, &pop) {
        (Attestor::JoinToken(None), _) => return Err(AttestError::NoToken),
        (Attestor::JoinToken(Some(t)), _) => Zeroizing::new(t.expose().as_bytes().to_vec()),
        (_, Some(p)) => Zeroizing::new(p.payload().map_err(AttestError::Local)?),
        (_, None) => return Err(AttestError::Local("x509pop files not loaded".to_owned())),
    };
    if let Some(p) = &pop {
        tracing::debug!(
            expected_agent_id = %p.default_agent_id(td.as_str()),
            "attesting with x509pop"
        );
    }
    let csr = key.csr().map_err(AttestError::Local)?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(
            attest_agent_request::Params {
                data: Some(types::AttestationData {
                    r#type: kind.to_owned(),
                    payload: payload.to_vec(),
                }),
                params: Some(AgentX509svidParams { csr }),
            },
        )),
    };
    tx.send(first)
        .await
        .map_err(|_| AttestError::Local("the attestation stream closed".to_owned()))?;
    let server = |s: tonic::Status| AttestError::from_server(rpc::server_error(&s, address), kind);
    let mut client = AgentClient::new(channel.clone());
    let mut stream = client
        .attest_agent(ReceiverStream::new(rx))
        .await
        .map_err(server)?
        .into_inner();
    let mut challenges = 0;
    let result = loop {
        let Some(resp) = stream.message().await.map_err(server)? else {
            return Err(AttestError::Invalid(
                "the attestation stream ended without a result".to_owned(),
            ));
        };
        match resp.step {
            Some(attest_agent_response::Step::Result(r)) => break r,
            Some(attest_agent_response::Step::Challenge(c)) => {
                challenges += 1;
                if challenges > MAX_CHALLENGES {
                    return Err(AttestError::Invalid(format!(
                        "more than {MAX_CHALLENGES} challenges"
                    )));
                }
                let Some(p) = &pop else {
                    return Err(AttestError::Invalid(format!(
                        "a challenge for {kind}, which has none"
                    )));
                };
                let answer = p.respond(&c).map_err(AttestError::Invalid)?;
                let step = AttestAgentRequest {
                    step: Some(attest_agent_request::Step::ChallengeResponse(answer)),
                };
                tx.send(step).await.map_err(|_| {
                    AttestError::Invalid("the server closed the attestation stream".to_owned())
                })?;
            }
            None => return Err(AttestError::Invalid("an empty answer".to_owned())),
        }
    };
    // Half-close: the exchange is over.
    drop(tx);
    let Some(svid) = result.svid else {
        return Err(AttestError::Invalid("a result without an SVID".to_owned()));
    };
    let svid = AgentSvid::new(svid.cert_chain, key, td, SystemTime::now())
        .map_err(|e| AttestError::Invalid(format!("the agent SVID: {e}")))?;
    let bundle = BundleClient::new(channel)
        .get_bundle(GetBundleRequest { output_mask: None })
        .await
        .map_err(server)?
        .into_inner();
    check_bundle(&bundle, td).map_err(AttestError::Invalid)?;
    Ok(Attested {
        svid,
        reattestable: result.reattestable,
        bundle,
    })
}

/// The bundle is our trust domain's and has X.509 authorities that parse.
pub(crate) fn check_bundle(bundle: &types::Bundle, td: &TrustDomain) -> Result<(), String> {
    if bundle.trust_domain != td.as_str() && bundle.trust_domain != td.id_string() {
        return Err(format!(
            "the bundle is for trust domain {:?}, not {} (is trust_domain the server's?)",
            bundle.trust_domain,
            td.as_str()
        ));
    }
    if bundle.x509_authorities.is_empty() {
        return Err("the bundle has no X.509 authorities".to_owned());
    }
    for (i, a) in bundle.x509_authorities.iter().enumerate() {
        crate::cert::facts(&a.asn1)
            .map_err(|e| format!("X.509 authority #{} of the bundle: {e}", i + 1))?;
    }
    Ok(())
}
