//! Compiles `proto/tollgate/v1/*.proto` with protox, so building needs no
//! system `protoc`, and writes the descriptors the reflection service serves
//! (`tollgate.v1`, and Envoy's ext_authz and access-log services from the
//! copies in `proto/vendor/`, see `scripts/vendor-envoy-protos.sh`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tollgate/v1/tollgate.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    let reflected = [
        "proto/tollgate/v1/tollgate.proto",
        "envoy/service/auth/v3/external_auth.proto",
        "envoy/service/accesslog/v3/als.proto",
    ];
    let mut all = protox::compile(reflected, ["proto", "proto/vendor"])?;
    // The API's shape, not its comments.
    for file in &mut all.file {
        file.source_code_info = None;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("reflection_descriptors.bin");
    std::fs::write(out, all.encode_to_vec())?;
    Ok(())
}
