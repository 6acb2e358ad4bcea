//! Generated gRPC code for the official SPIFFE Workload API.
//!
//! `proto/workload.proto` is the canonical `workload.proto` from the SPIFFE standards
//! (<https://github.com/spiffe/spiffe/blob/main/standards/workloadapi.proto>, identical to
//! go-spiffe's `proto/spiffe/workload/workload.proto`), with the incubating WIT-SVID methods and
//! messages as the standard defines them. It has no `package` statement, so the service is
//! `SpiffeWorkloadAPI` and every path is `/SpiffeWorkloadAPI/<Method>`: clients depend on that.
#![forbid(unsafe_code)]

/// Messages and the `SpiffeWorkloadAPI` client and server (the proto has no package).
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The encoded `FileDescriptorSet` of `workload.proto`, for gRPC reflection.
pub const WORKLOAD_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/workload_descriptor.bin"));

/// spiffed's own administration API (package `spiffed.admin.v1`), served only on the admin
/// socket: entry management and `explain`.
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/spiffed.admin.v1.rs"));
}

/// spiffed's status service (package `spiffed.status.v1`), on the Workload API socket: the
/// agent's mode and readiness for `spiffed healthcheck`.
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub mod status {
    include!(concat!(env!("OUT_DIR"), "/spiffed.status.v1.rs"));
}

/// The SPIRE Server APIs that a node agent calls (agent mode), from spire-api-sdk
/// (`proto/spire`, Apache-2.0): clients for `Agent`, `Bundle`, `Entry` and `SVID`, and their
/// types. Servers are generated too, for unit tests of the client side.
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub mod spire {
    /// The generated packages, nested as the proto packages are (`spire.api.…`).
    pub mod api {
        /// `spire.api.types`.
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
        }
        /// `spire.api.server`.
        pub mod server {
            /// `spire.api.server.agent`.
            pub mod agent {
                /// `spire.api.server.agent.v1`.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/spire.api.server.agent.v1.rs"));
                }
            }
            /// `spire.api.server.bundle`.
            pub mod bundle {
                /// `spire.api.server.bundle.v1`.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/spire.api.server.bundle.v1.rs"));
                }
            }
            /// `spire.api.server.entry`.
            pub mod entry {
                /// `spire.api.server.entry.v1`.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/spire.api.server.entry.v1.rs"));
                }
            }
            /// `spire.api.server.svid`.
            pub mod svid {
                /// `spire.api.server.svid.v1`.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/spire.api.server.svid.v1.rs"));
                }
            }
        }
    }
    pub use api::server::agent::v1 as agent;
    pub use api::server::bundle::v1 as bundle;
    pub use api::server::entry::v1 as entry;
    pub use api::server::svid::v1 as svid;
    pub use api::types;
}

pub mod shared;
