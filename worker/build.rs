//! Links libtorch for the worker: the rpath every crate that links it needs
//! (../build/rpath.rs), and the small C++ shim for TorchScript modules
//! (csrc/script_module.cpp), compiled against the same libtorch that
//! torch-sys found (its include dir sits beside the lib dir it publishes).
use std::path::PathBuf;
use std::process::Command;

#[path = "../build/rpath.rs"]
mod rpath;

/// The C++ ABI libtorch was built with (torch wheels: the new one).
fn cxx11_abi() -> &'static str {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => "0",
        _ => "1",
    }
}

fn main() {
    rpath::main();
    println!("cargo:rerun-if-changed=csrc/script_module.cpp");
    let lib = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .expect("torch-sys publishes the libtorch lib dir");
    let include = lib.join("../include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/script_module.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("ringtrain_script_module");
}
