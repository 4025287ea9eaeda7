//! Generates the gRPC code from `ringtrain.proto`. protoc comes from the
//! `protoc-bin-vendored` crate unless `PROTOC` is set, so a fresh machine needs
//! no system package to build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    println!("cargo:rerun-if-changed=ringtrain.proto");
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("ringtrain_descriptor.bin");
    tonic_prost_build::configure()
        // For gRPC server reflection (grpcurl and friends).
        .file_descriptor_set_path(descriptors)
        // Gradient payloads are `bytes::Bytes`, so decoding does not copy them again.
        .bytes(".ringtrain.v1.RingFrame.payload")
        .bytes(".ringtrain.v1.FileChunk.data")
        .compile_protos(&["ringtrain.proto"], &["."])?;
    Ok(())
}
