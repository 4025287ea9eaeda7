//! Shared build script for every crate that links libtorch (worker, cli, tests).
//!
//! torch-sys publishes the directory of the libtorch it linked through Cargo's
//! `links` metadata (`DEP_TCH_LIBTORCH_LIB`). Baking it into the binary's rpath
//! means `target/release/ringtrain` runs without the user exporting LD_LIBRARY_PATH.
//! `$ORIGIN/../lib` is added too, for images that ship the libraries beside the binary.
pub fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib");
}
