//! `spiffed-loadgen`: drives any SPIFFE Workload API socket with every request carrying the
//! `workload.spiffe.io: true` security header, and serves a floor baseline.
//!
//! Scenarios ([`scenarios`]):
//! - `cold`: each iteration connects, reads the first `FetchX509SVID` message and closes;
//! - `warm`: one connection per worker, repeated `FetchJWTSVID` or `FetchX509SVID` first message;
//! - `fanout`: N streams over K connections, time until every stream sees the next rotation;
//! - `sds-fanout`: the same with Envoy SDS v3 `StreamSecrets` streams (no security header,
//!   each response acknowledged with its version and nonce, as Envoy does);
//! - `churn`: cold iterations at a fixed rate, sampling the agent's RSS and descriptors.
//!
//! Scale scenarios ([`scale`], for `bench/scale.sh`; callers of other uids need root):
//! - `first-fetch`: one child process per uid, each reading its first `FetchX509SVID` message;
//! - `partial-rotation`: the agent's CPU per rotation of a few streams, with and without many
//!   idle streams of another uid open;
//! - `admin-create`: single-entry `CreateEntries` calls on spiffed's admin socket.
//!
//! The [`floor`] is a minimal tonic server doing only the attestation syscalls and returning
//! prebuilt responses; `--compare-floor` reports each figure as a fraction of it.
//!
//! Results are JSON lines on stdout and a readable summary on stderr. Only running children as
//! other uids needs root.
#![forbid(unsafe_code)]

pub mod client;
pub mod floor;
pub mod procstat;
pub mod scale;
pub mod scenarios;
pub mod stats;
