//! Compiles `proto/workload.proto`, `proto/admin.proto` and the SPIRE Server APIs (`proto/spire`) with protox (a pure-Rust protobuf compiler), so no system
//! `protoc` is needed, and writes the descriptor set that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["workload.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("workload_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds.clone())?;

    // The server again, for spiffed: the streamed responses are `Encoded` (encoded once, shared
    // by every stream sending the same message) and the codec keeps small per-stream buffers.
    // Every message is the one generated above.
    let shared = out.join("shared");
    std::fs::create_dir_all(&shared)?;
    let mut server = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&shared)
        .codec_path("crate::shared::SharedCodec");
    for (proto, rust) in [
        ("X509SVIDRequest", "X509svidRequest"),
        ("X509SVID", "X509svid"),
        ("X509BundlesRequest", "X509BundlesRequest"),
        ("JWTSVIDRequest", "JwtsvidRequest"),
        ("JWTSVIDResponse", "JwtsvidResponse"),
        ("JWTSVID", "Jwtsvid"),
        ("JWTBundlesRequest", "JwtBundlesRequest"),
        ("ValidateJWTSVIDRequest", "ValidateJwtsvidRequest"),
        ("ValidateJWTSVIDResponse", "ValidateJwtsvidResponse"),
        ("WITSVIDRequest", "WitsvidRequest"),
        ("WITSVIDResponse", "WitsvidResponse"),
        ("WITSVID", "Witsvid"),
        ("WITBundlesRequest", "WitBundlesRequest"),
        ("WITBundlesResponse", "WitBundlesResponse"),
    ] {
        server = server.extern_path(format!(".{proto}"), format!("crate::workload::{rust}"));
    }
    for (proto, rust) in [
        ("X509SVIDResponse", "X509svidResponse"),
        ("X509BundlesResponse", "X509BundlesResponse"),
        ("JWTBundlesResponse", "JwtBundlesResponse"),
    ] {
        server = server.extern_path(
            format!(".{proto}"),
            format!("crate::shared::Encoded<crate::workload::{rust}>"),
        );
    }
    server.compile_fds(fds)?;
    let admin = protox::compile(["admin.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(admin)?;

    let status = protox::compile(["status.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(status)?;

    // The SPIRE Server APIs an agent calls (agent mode): clients only.
    let spire = protox::compile(
        [
            "spire/api/server/agent/v1/agent.proto",
            "spire/api/server/bundle/v1/bundle.proto",
            "spire/api/server/entry/v1/entry.proto",
            "spire/api/server/svid/v1/svid.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(spire)?;
    Ok(())
}
