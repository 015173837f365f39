//! What the CUDA toolchain reported when build.rs compiled the kernels: nvcc's release (the CUDA
//! version the driver must support) and ptxas's per-kernel figures (`-Xptxas -v`), with their
//! comparison against what the driver reports for the code it loaded. Plain std code: build.rs
//! includes this file to parse the toolchain's output into the tables it embeds (`fatbin` in
//! `kernels::cuda`), so the parsers the tests pin are the ones the build runs.

/// The CUDA release in `nvcc --version` output (`Cuda compilation tools, release 13.0, V13.0.88`):
/// `(13, 0)`.
pub fn parse_nvcc_release(version_output: &str) -> Option<(u32, u32)> {
    let rest = version_output.split_once("release ")?.1;
    let release = rest.split([',', ' ', '\n']).next()?;
    let (major, minor) = release.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// ptxas's figures for one kernel compiled for one architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtxasFigures {
    /// Target architecture, `80` for sm_80.
    pub arch: u32,
    pub registers: u32,
    /// Per-thread stack frame (local memory, which is where spills go).
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// `(kernel, figures)` for every entry function in `ptxas -v` output (as nvcc prints it with
/// `-Xptxas -v`, one block per entry and architecture):
///
/// ```text
/// ptxas info    : Compiling entry function 'k_rope' for 'sm_90'
/// ptxas info    : Function properties for k_rope
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 30 registers, used 0 barriers
/// ```
///
/// Properties of non-inlined device functions (`Function properties for _Z...`) are not the
/// entry's and are skipped. An entry without a `Used N registers` line is an error, so a change
/// in ptxas's format fails the build instead of embedding zeros.
pub fn parse_ptxas_verbose(log: &str) -> Result<Vec<(String, PtxasFigures)>, String> {
    let mut out = Vec::new();
    // The entry being read, whether its properties line is next, and whether it has a registers line.
    let mut current: Option<(String, PtxasFigures, bool)> = None;
    let mut props_for_entry = false;
    let finish = |cur: Option<(String, PtxasFigures, bool)>,
                  out: &mut Vec<(String, PtxasFigures)>|
     -> Result<(), String> {
        match cur {
            Some((name, figures, true)) => {
                out.push((name, figures));
                Ok(())
            }
            Some((name, figures, false)) => Err(format!(
                "ptxas output has no `Used N registers` line for `{name}` (sm_{})",
                figures.arch
            )),
            None => Ok(()),
        }
    };
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line
            .split_once("Compiling entry function '")
            .map(|(_, r)| r)
        {
            finish(current.take(), &mut out)?;
            let (name, rest) = rest
                .split_once('\'')
                .ok_or_else(|| format!("unterminated kernel name in `{line}`"))?;
            let arch = rest
                .split_once("'sm_")
                .and_then(|(_, a)| a.split('\'').next())
                .and_then(|a| a.trim_end_matches(['a', 'f']).parse::<u32>().ok())
                .ok_or_else(|| format!("no target architecture in `{line}`"))?;
            let figures = PtxasFigures {
                arch,
                registers: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            };
            current = Some((name.to_string(), figures, false));
            props_for_entry = false;
        } else if let Some(name) = line.split_once("Function properties for ").map(|(_, n)| n) {
            props_for_entry = current.as_ref().is_some_and(|(n, _, _)| n == name.trim());
        } else if line.contains("bytes stack frame") {
            if let (true, Some((_, figures, _))) = (props_for_entry, current.as_mut()) {
                figures.stack_bytes = number_before(line, "bytes stack frame")?;
                figures.spill_store_bytes = number_before(line, "bytes spill stores")?;
                figures.spill_load_bytes = number_before(line, "bytes spill loads")?;
            }
            props_for_entry = false;
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some((_, figures, seen)) = current.as_mut() {
                figures.registers = number_before(line, "registers")?;
                *seen = true;
            }
        }
    }
    finish(current, &mut out)?;
    Ok(out)
}

/// The number just before `what` in `line` (`"0 bytes stack frame"` → 0).
fn number_before(line: &str, what: &str) -> Result<u32, String> {
    let at = line
        .find(what)
        .ok_or_else(|| format!("no `{what}` in `{line}`"))?;
    line[..at]
        .split(|c: char| c.is_whitespace() || c == ',')
        .rfind(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("no number before `{what}` in `{line}`"))
}

/// What the driver reports for one loaded kernel (`CU_FUNC_ATTRIBUTE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverFigures {
    /// `CU_FUNC_ATTRIBUTE_BINARY_VERSION`: the architecture of the code it runs (`86`).
    pub binary_arch: u32,
    /// `CU_FUNC_ATTRIBUTE_NUM_REGS`.
    pub registers: u32,
    /// `CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`: local memory per thread.
    pub local_bytes: u32,
}

/// The warning to print for `kernel` as loaded (`None`: it runs as built, without local memory):
/// the figures differ from ptxas's for that architecture, it uses local memory or spills, or, with
/// no build-time figures for the architecture (the driver JIT-compiled the PTX), it uses local
/// memory.
pub fn load_warning(
    kernel: &str,
    built: Option<&PtxasFigures>,
    loaded: &DriverFigures,
) -> Option<String> {
    let arch = loaded.binary_arch;
    let Some(built) = built else {
        return (loaded.local_bytes > 0).then(|| {
            format!(
                "kernel `{kernel}` on sm_{arch} (JIT-compiled from the PTX; no build-time ptxas \
                 figures): {} registers and {} bytes of local memory per thread (spills?)",
                loaded.registers, loaded.local_bytes
            )
        });
    };
    let mut problems = Vec::new();
    if built.registers != loaded.registers || built.stack_bytes != loaded.local_bytes {
        problems.push(format!(
            "the driver reports {} registers and {} bytes of local memory per thread, ptxas \
             reported {} and {} at build time",
            loaded.registers, loaded.local_bytes, built.registers, built.stack_bytes
        ));
    }
    if built.spill_store_bytes > 0 || built.spill_load_bytes > 0 {
        problems.push(format!(
            "ptxas reported {} bytes of spill stores and {} of spill loads",
            built.spill_store_bytes, built.spill_load_bytes
        ));
    } else if loaded.local_bytes > 0 {
        problems.push(format!(
            "it uses {} bytes of local memory per thread",
            loaded.local_bytes
        ));
    }
    (!problems.is_empty())
        .then(|| format!("kernel `{kernel}` on sm_{arch}: {}", problems.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_rope' for 'sm_90'
ptxas info    : Function properties for k_rope
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
ptxas info    : Compile time = 22.988 ms
ptxas info    : Compiling entry function 'k_big' for 'sm_86'
ptxas info    : Function properties for _Z6helperv
    48 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for k_big
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
";

    #[test]
    fn nvcc_release_is_read_from_its_version_banner() {
        let banner = "nvcc: NVIDIA (R) Cuda compiler driver\n\
                      Cuda compilation tools, release 13.0, V13.0.88\n\
                      Build cuda_13.0.r13.0/compiler.36424714_0\n";
        assert_eq!(parse_nvcc_release(banner), Some((13, 0)));
        assert_eq!(
            parse_nvcc_release("release 12.10, V12.10.1"),
            Some((12, 10))
        );
        assert_eq!(parse_nvcc_release("nvcc: command not found"), None);
    }

    #[test]
    fn parses_entries_per_architecture() {
        let parsed = parse_ptxas_verbose(LOG).unwrap();
        assert_eq!(
            parsed,
            vec![
                (
                    "k_rope".to_string(),
                    PtxasFigures {
                        arch: 90,
                        registers: 30,
                        stack_bytes: 0,
                        spill_store_bytes: 0,
                        spill_load_bytes: 0
                    }
                ),
                (
                    "k_big".to_string(),
                    PtxasFigures {
                        arch: 86,
                        registers: 255,
                        stack_bytes: 40,
                        spill_store_bytes: 36,
                        spill_load_bytes: 28
                    }
                ),
            ]
        );
    }

    #[test]
    fn an_entry_without_registers_is_an_error() {
        let log = "ptxas info    : Compiling entry function 'k_x' for 'sm_80'\n\
                   ptxas info    : Compiling entry function 'k_y' for 'sm_80'\n\
                   ptxas info    : Used 8 registers\n";
        let err = parse_ptxas_verbose(log).unwrap_err();
        assert!(err.contains("k_x") && err.contains("sm_80"), "{err}");
        assert!(parse_ptxas_verbose("").unwrap().is_empty());
    }

    #[test]
    fn arch_suffixes_are_dropped() {
        let log = "ptxas info    : Compiling entry function 'k_x' for 'sm_90a'\n\
                   ptxas info    : Used 8 registers\n";
        assert_eq!(parse_ptxas_verbose(log).unwrap()[0].1.arch, 90);
    }

    fn built(registers: u32, stack: u32, spill: u32) -> PtxasFigures {
        PtxasFigures {
            arch: 86,
            registers,
            stack_bytes: stack,
            spill_store_bytes: spill,
            spill_load_bytes: spill,
        }
    }

    fn loaded(arch: u32, registers: u32, local: u32) -> DriverFigures {
        DriverFigures {
            binary_arch: arch,
            registers,
            local_bytes: local,
        }
    }

    #[test]
    fn matching_figures_without_local_memory_need_no_warning() {
        assert_eq!(
            load_warning("k", Some(&built(40, 0, 0)), &loaded(86, 40, 0)),
            None
        );
        assert_eq!(load_warning("k", None, &loaded(120, 40, 0)), None);
    }

    #[test]
    fn a_mismatch_names_kernel_arch_and_both_figures() {
        let w = load_warning("k_gemm", Some(&built(40, 0, 0)), &loaded(86, 48, 0)).unwrap();
        assert!(w.contains("`k_gemm` on sm_86"), "{w}");
        assert!(
            w.contains("48 registers") && w.contains("reported 40"),
            "{w}"
        );
    }

    #[test]
    fn spills_and_local_memory_are_reported() {
        let w = load_warning("k", Some(&built(255, 64, 32)), &loaded(86, 255, 64)).unwrap();
        assert!(w.contains("32 bytes of spill stores"), "{w}");
        assert!(!w.contains("driver reports"), "{w}");
        let w = load_warning("k", Some(&built(64, 16, 0)), &loaded(86, 64, 16)).unwrap();
        assert!(w.contains("16 bytes of local memory"), "{w}");
        let w = load_warning("k", None, &loaded(120, 64, 8)).unwrap();
        assert!(w.contains("sm_120") && w.contains("JIT"), "{w}");
    }
}
