//! Generates the SDS server (`envoy.service.secret.v3.SecretDiscoveryService`) over spiffed's
//! codec, with tonic-build's manual builder (no .proto files: the messages are envoy-types').
//!
//! envoy-types' own server encodes every response afresh and gives each call tonic's default
//! 8 KiB encode and decode buffers. Ours sends [`SdsResponse`], whose resources were encoded
//! once for every stream that sends them, through `SharedCodec`'s small per-call buffers, as
//! the Workload API's streams do.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    const DISCOVERY: &str = "::envoy_types::pb::envoy::service::discovery::v3";
    const CODEC: &str = "::spiffed_proto::shared::SharedCodec";
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(input)
            .output_type(output)
            .codec_path(CODEC)
    };
    let sds = Service::builder()
        .name("SecretDiscoveryService")
        .package("envoy.service.secret.v3")
        .method(
            method(
                "delta_secrets",
                "DeltaSecrets",
                &format!("{DISCOVERY}::DeltaDiscoveryRequest"),
                &format!("{DISCOVERY}::DeltaDiscoveryResponse"),
            )
            .client_streaming()
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "stream_secrets",
                "StreamSecrets",
                &format!("{DISCOVERY}::DiscoveryRequest"),
                "crate::sds::SdsResponse",
            )
            .client_streaming()
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "fetch_secrets",
                "FetchSecrets",
                &format!("{DISCOVERY}::DiscoveryRequest"),
                "crate::sds::SdsResponse",
            )
            .build(),
        )
        .build();
    Builder::new().build_client(false).compile(&[sds]);
}
