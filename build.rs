//! Build script.
//! - Always: compiles every `kernels/*.cu` with the host C++ compiler against `kernels/emu/` (the
//!   CPU emulation of the CUDA execution model) into the static library `qlora_emu`.
//! - Feature `cuda`: compiles every `kernels/*.cu` with nvcc into a fatbin (SASS for sm_80, sm_86,
//!   sm_89 and sm_90, plus compute_80 PTX for newer GPUs) and embeds it with the CUDA release and
//!   ptxas's per-kernel registers and spills (`fatbin.rs`).
//! - Feature `bindgen` (implied by `cuda`): regenerates the Rust view of `kernels/abi.h` and checks
//!   it against the committed `src/kernels/abi_bindings.rs` (`QLORA_ABI_CHECK=1` fails the build
//!   when stale, `QLORA_ABI_UPDATE=1` rewrites it).

use std::env;
use std::path::{Path, PathBuf};

fn kernel_sources() -> Vec<PathBuf> {
    let mut cu: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu.sort();
    cu
}

fn build_emulation(cu: &[PathBuf]) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("QL_EMULATION", None)
        .include("kernels")
        .flag("-pthread")
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings(true);
    let emu_cpp = Path::new("kernels/emu/cuda_emu.cpp");
    if emu_cpp.exists() {
        b.file(emu_cpp);
    }
    // `.cu` is not a suffix g++ knows, so each kernel file goes through a one-line C++ wrapper.
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("emu");
    std::fs::create_dir_all(&out).unwrap();
    for src in cu {
        let abs = std::fs::canonicalize(src).unwrap();
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let wrapper = out.join(format!("{stem}_emu.cpp"));
        let text = format!("#include \"{}\"\n", abs.display());
        if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&wrapper, text).unwrap();
        }
        b.file(wrapper);
    }
    b.compile("qlora_emu");
    println!("cargo:rustc-link-lib=pthread");
}

/// The pure parsers of nvcc's and ptxas's output, shared with the crate (and tested there).
#[cfg(feature = "cuda")]
#[allow(dead_code)]
#[path = "src/kernels/toolchain.rs"]
mod toolchain;

/// Architectures the fatbin carries SASS for (`QLORA_CUDA_ARCHS`, comma-separated, overrides).
#[cfg(feature = "cuda")]
const DEFAULT_SASS_ARCHS: &[u32] = &[80, 86, 89, 90];
/// The virtual architecture every SASS is compiled from, also embedded as PTX for the driver to
/// JIT on newer GPUs.
#[cfg(feature = "cuda")]
const PTX_ARCH: u32 = 80;

#[cfg(feature = "cuda")]
fn missing(e: std::io::Error) -> ! {
    panic!(
        "feature `cuda` needs nvcc ({e}): run `eval \"$(bash scripts/install-cuda.sh)\"` to \
         install the pinned CUDA 13.0 compiler and set CUDA_HOME/PATH, then rebuild"
    )
}

#[cfg(feature = "cuda")]
fn sass_archs() -> Vec<u32> {
    let Ok(list) = env::var("QLORA_CUDA_ARCHS") else {
        return DEFAULT_SASS_ARCHS.to_vec();
    };
    let archs: Vec<u32> = list
        .split(',')
        .map(|a| {
            let digits = a.trim().trim_start_matches("sm_");
            match digits.parse::<u32>() {
                Ok(n) if n >= PTX_ARCH => n,
                _ => panic!(
                    "QLORA_CUDA_ARCHS must list architectures of sm_{PTX_ARCH} or newer, like \
                     `80,90` or `sm_86`; got `{list}`"
                ),
            }
        })
        .collect();
    if archs.is_empty() {
        panic!("QLORA_CUDA_ARCHS is empty");
    }
    archs
}

/// Compiles every `kernels/*.cu` into a fatbin with SASS for each of [`sass_archs`] and
/// compute_80 PTX, in parallel, and writes `fatbin.rs`: the images (`include_bytes!`), the CUDA
/// release nvcc belongs to, and ptxas's registers / stack / spills per kernel and architecture.
#[cfg(feature = "cuda")]
fn build_fatbin(cu: &[PathBuf]) {
    use std::process::Command;
    let nvcc = env::var("CUDA_HOME")
        .ok()
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let version = match Command::new(&nvcc).arg("--version").output() {
        Ok(output) => output,
        Err(e) => missing(e),
    };
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let (major, minor) = toolchain::parse_nvcc_release(&version)
        .unwrap_or_else(|| panic!("no CUDA release in `nvcc --version` output:\n{version}"));
    let archs = sass_archs();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut args: Vec<String> = [
        "--fatbin",
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-Xptxas",
        "-v",
        "-I",
        "kernels",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for arch in &archs {
        args.push("-gencode".into());
        args.push(format!("arch=compute_{PTX_ARCH},code=sm_{arch}"));
    }
    args.push("-gencode".into());
    args.push(format!("arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"));

    // One nvcc per module, as many at once as there are cores (each runs ptxas once per arch).
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let logs: Vec<std::sync::Mutex<Option<String>>> =
        cu.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(cu.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(src) = cu.get(i) else { break };
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                let result = match Command::new(&nvcc)
                    .args(&args)
                    .arg("-o")
                    .arg(out.join(format!("{stem}.fatbin")))
                    .arg(src)
                    .output()
                {
                    Ok(output) => output,
                    Err(e) => missing(e),
                };
                let log = format!(
                    "{}{}",
                    String::from_utf8_lossy(&result.stdout),
                    String::from_utf8_lossy(&result.stderr)
                );
                if !result.status.success() {
                    panic!(
                        "nvcc failed ({}) on {}:\n{log}",
                        result.status,
                        src.display()
                    );
                }
                std::fs::write(out.join(format!("{stem}.ptxas.log")), &log).unwrap();
                *logs[i].lock().unwrap() = Some(log);
            });
        }
    });

    let mut text = format!(
        "/// The CUDA release of the nvcc that built the fatbins: a driver must support it.\n\
         pub const BUILT_WITH: (u32, u32) = ({major}, {minor});\n\
         /// Architectures the fatbins carry SASS for.\n\
         pub const SASS_ARCHS: &[u32] = &{archs:?};\n\
         /// The virtual architecture of the SASS and of the PTX the fatbins also carry.\n\
         pub const PTX_ARCH: u32 = {PTX_ARCH};\n"
    );
    let mut table = String::new();
    for (src, log) in cu.iter().zip(&logs) {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let log = log.lock().unwrap().take().unwrap();
        let entries = toolchain::parse_ptxas_verbose(&log)
            .unwrap_or_else(|e| panic!("{}: {e}\n{log}", src.display()));
        if entries.is_empty() {
            panic!(
                "{}: no entry functions in ptxas's output:\n{log}",
                src.display()
            );
        }
        for arch in &archs {
            if !entries.iter().any(|(_, f)| f.arch == *arch) {
                panic!(
                    "{}: ptxas reported nothing for sm_{arch}:\n{log}",
                    src.display()
                );
            }
        }
        text.push_str(&format!(
            "/// `kernels/{stem}.cu`.\npub const {}: &[u8] = \
             include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\"));\n",
            stem.to_uppercase()
        ));
        for (kernel, f) in entries {
            table.push_str(&format!(
                "    (\"{stem}\", \"{kernel}\", crate::kernels::toolchain::PtxasFigures {{ \
                 arch: {}, registers: {}, stack_bytes: {}, spill_store_bytes: {}, \
                 spill_load_bytes: {} }}),\n",
                f.arch, f.registers, f.stack_bytes, f.spill_store_bytes, f.spill_load_bytes
            ));
        }
    }
    text.push_str(&format!(
        "/// `(module, kernel, figures)`: what ptxas reported for each kernel and SASS architecture.\n\
         pub const PTXAS: &[(&str, &str, crate::kernels::toolchain::PtxasFigures)] = &[\n{table}];\n"
    ));
    std::fs::write(out.join("fatbin.rs"), text).unwrap();
    println!("cargo:rerun-if-env-changed=QLORA_CUDA_ARCHS");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=src/kernels/toolchain.rs");
}

#[cfg(feature = "bindgen")]
fn check_bindings() {
    let committed = Path::new("src/kernels/abi_bindings.rs");
    let generated = bindgen::Builder::default()
        .header("kernels/abi.h")
        .allowlist_type("Ql.*")
        .allowlist_var("QL_.*")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate_comments(true)
        .rustified_enum("QlDtype")
        .generate()
        .expect(
            "bindgen failed on kernels/abi.h (is LIBCLANG_PATH set? see scripts/install-cuda.sh)",
        )
        .to_string();
    let text = format!(
        "// Generated by bindgen from kernels/abi.h. Do not edit: rebuild with\n\
         // `QLORA_ABI_UPDATE=1 cargo build --features bindgen`.\n\n{generated}"
    );
    let current = std::fs::read_to_string(committed).unwrap_or_default();
    if current != text {
        if env::var("QLORA_ABI_UPDATE").is_ok_and(|v| v == "1") {
            std::fs::write(committed, &text).unwrap();
        } else if env::var("QLORA_ABI_CHECK").is_ok_and(|v| v == "1") {
            panic!(
                "src/kernels/abi_bindings.rs is stale against kernels/abi.h: \
                 run `QLORA_ABI_UPDATE=1 cargo build --features bindgen` and commit it"
            );
        } else {
            println!("cargo:warning=src/kernels/abi_bindings.rs is stale against kernels/abi.h");
        }
    }
    println!("cargo:rerun-if-env-changed=QLORA_ABI_UPDATE");
    println!("cargo:rerun-if-env-changed=QLORA_ABI_CHECK");
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    let cu = kernel_sources();
    for f in &cu {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    build_emulation(&cu);
    #[cfg(feature = "cuda")]
    build_fatbin(&cu);
    #[cfg(feature = "bindgen")]
    check_bindings();
}
