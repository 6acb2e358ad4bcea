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

pub mod shared;
