//! With feature `cuda`: compiles `cuda/*.cu` to PTX with nvcc, once for sm_80 (Ampere) and once
//! for sm_90 (Hopper), into `$OUT_DIR`; `src/cuda.rs` embeds them and picks one at run time by
//! the device's compute capability. nvcc is `$NVCC`, else `$CUDA_ROOT/bin/nvcc`, else `nvcc` on
//! the PATH (scripts/cuda_build.sh sets up a PyPI toolkit pinned to CUDA 13.0). Without the
//! feature nothing is compiled and no CUDA toolkit is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 3] = ["attention", "cache", "sample"];
const ARCHS: [&str; 2] = ["80", "90"];

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cuda_root = std::env::var("CUDA_ROOT").ok();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match &cuda_root {
        Some(root) => format!("{root}/bin/nvcc"),
        None => "nvcc".into(),
    });
    for src in SOURCES {
        for arch in ARCHS {
            compile(&nvcc, cuda_root.as_deref(), src, arch, &out);
        }
    }
}

fn compile(nvcc: &str, cuda_root: Option<&str>, src: &str, arch: &str, out: &Path) {
    let input = format!("cuda/{src}.cu");
    let output = out.join(format!("{src}_sm{arch}.ptx"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
        .arg(format!("-arch=sm_{arch}"))
        .arg("-Icuda");
    if let Some(root) = cuda_root {
        cmd.arg(format!("-I{root}/include"));
    }
    cmd.arg("-o").arg(&output).arg(&input);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run nvcc ({nvcc}): {e}; see docs/cuda.md"));
    assert!(status.success(), "nvcc failed on {input} for sm_{arch}");
}
