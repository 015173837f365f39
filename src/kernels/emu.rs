//! Launches of kernels compiled for the CPU emulation of CUDA (`kernels/emu/`): the launch
//! configuration is checked against the device limits, the kernel runs over its grid with one OS
//! thread per CUDA thread, and faults (races, out-of-bounds shared memory, bad warp masks,
//! deadlocks) come back as [`Error::Emulation`]. Also the emulator's self-test kernels.

use super::abi::QlLaunchConfig;
use super::launch::{Kernel, LaunchConfig};
use crate::{Error, Result};
use std::ffi::{c_char, c_void, CStr};
use std::time::Duration;

/// Most threads in one block.
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;
/// Most dynamic shared memory per block on any device (sm_90's opt-in limit); a kernel gets 48 KiB
/// unless it opts in ([`Kernel::check_launch`]).
pub const MAX_DYNAMIC_SHARED_BYTES: u32 = 227 * 1024;
const ERR_BUF_BYTES: usize = 1024;

extern "C" {
    fn qlemu_set_launch_options(race_check: i32, watchdog_ms: u32);
}

/// Per-launch switches of the emulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuOptions {
    /// Check shared-memory accesses for data races (costs a lock per access).
    pub race_check: bool,
    /// How long a thread may wait at a barrier or warp collective before the launch fails as
    /// deadlocked.
    pub watchdog: Duration,
}

impl Default for EmuOptions {
    /// Race checking on unless `QLORA_EMU_RACECHECK=0`; a 10 s watchdog.
    fn default() -> Self {
        EmuOptions {
            race_check: std::env::var("QLORA_EMU_RACECHECK").map_or(true, |v| v != "0"),
            watchdog: Duration::from_secs(10),
        }
    }
}

/// Checks `cfg` against the limits a CUDA launch has (and the emulation enforces), then against
/// the kernel's own ([`Kernel::check_launch`]).
pub fn validate_config(kernel: &Kernel, cfg: &LaunchConfig) -> Result<()> {
    let (gx, gy, gz) = cfg.grid_dim;
    let (bx, by, bz) = cfg.block_dim;
    let bad = |reason: String| Err(Error::invalid(kernel.name, reason));
    if [gx, gy, gz, bx, by, bz].contains(&0) {
        return bad(format!("launch dimensions must be non-zero: {cfg:?}"));
    }
    if cfg.threads_per_block() > MAX_THREADS_PER_BLOCK {
        return bad(format!(
            "{} threads per block exceed {MAX_THREADS_PER_BLOCK}",
            cfg.threads_per_block()
        ));
    }
    if bz > 64 {
        return bad(format!("block.z = {bz} exceeds 64"));
    }
    if gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
        return bad(format!("grid {:?} out of range", cfg.grid_dim));
    }
    if cfg.shared_mem_bytes > MAX_DYNAMIC_SHARED_BYTES {
        return bad(format!(
            "{} bytes of dynamic shared memory exceed {MAX_DYNAMIC_SHARED_BYTES}",
            cfg.shared_mem_bytes
        ));
    }
    // The kernel's own limits: its block shape, and dynamic shared memory over 48 KiB only when
    // it opted in, as a GPU launch without the attribute fails.
    kernel.check_launch(cfg)
}

thread_local! {
    /// Emulated launches made by this thread, by kernel name.
    static LAUNCHES: std::cell::RefCell<std::collections::HashMap<&'static str, u64>> =
        Default::default();
}

/// How many emulated launches of the kernel named `name` this thread has made: lets a test prove
/// that a code path really runs a kernel (launches are synchronous, on the caller's thread).
pub fn launches_on_this_thread(name: &str) -> u64 {
    LAUNCHES.with(|counts| counts.borrow().get(name).copied().unwrap_or(0))
}

/// Runs `kernel` through the CPU emulation with default [`EmuOptions`].
///
/// # Safety
/// `P` must be the parameter struct the kernel takes, and every pointer in `params` must be valid
/// for all the reads and writes the kernel makes under `cfg`.
pub unsafe fn launch<P>(kernel: &Kernel, cfg: &LaunchConfig, params: &P) -> Result<()> {
    // SAFETY: the caller upholds this function's contract, which is launch_with's.
    unsafe { launch_with(kernel, cfg, params, &EmuOptions::default()) }
}

/// Runs `kernel` through the CPU emulation with explicit options.
///
/// # Safety
/// As for [`launch`].
pub unsafe fn launch_with<P>(
    kernel: &Kernel,
    cfg: &LaunchConfig,
    params: &P,
    options: &EmuOptions,
) -> Result<()> {
    validate_config(kernel, cfg)?;
    LAUNCHES.with(|counts| *counts.borrow_mut().entry(kernel.name).or_insert(0) += 1);
    let abi: QlLaunchConfig = cfg.to_abi();
    let watchdog_ms = u32::try_from(options.watchdog.as_millis()).unwrap_or(u32::MAX);
    let mut err = [0 as c_char; ERR_BUF_BYTES];
    // SAFETY: the options only apply to the next launch from this thread, which is the one just
    // below; `abi` and `err` outlive the call, the entry writes at most `err.len()` bytes
    // including the NUL, and the caller guarantees `params` matches the kernel.
    let rc = unsafe {
        qlemu_set_launch_options(i32::from(options.race_check), watchdog_ms);
        (kernel.emu)(
            &abi,
            (params as *const P).cast::<c_void>(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let bytes: Vec<u8> = err.iter().map(|&c| c as u8).collect();
    let reason = CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    Err(Error::Emulation {
        kernel: kernel.name,
        reason,
    })
}

/// The emulator's self-test kernels (`kernels/emu_selftest.cu`), all taking
/// [`QlEmuTestParams`](super::abi::QlEmuTestParams); the .cu file documents each one's inputs,
/// outputs and launch shape.
pub mod selftest {
    use super::super::launch::declare_kernels;

    declare_kernels! {
        module "emu_selftest";
        /// Per-block sums with warp shuffles, dynamic shared memory and a barrier.
        BLOCK_REDUCE = k_emu_block_reduce / qlemu_k_emu_block_reduce;
        /// Inclusive prefix sums within shuffle sections (`__shfl_up_sync` with a width).
        WARP_SCAN = k_emu_warp_scan / qlemu_k_emu_warp_scan;
        /// Every shuffle kind, votes, 2- and 8-byte shuffles, the active mask.
        WARP_OPS = k_emu_warp_ops / qlemu_k_emu_warp_ops;
        /// bf16 GEMM through cp.async double buffering, ldmatrix and mma.
        MMA_GEMM = k_emu_mma_gemm / qlemu_k_emu_mma_gemm;
        /// One mma with fragments placed by the PTX ISA formulas.
        MMA_LAYOUT = k_emu_mma_layout / qlemu_k_emu_mma_layout;
        /// Registers of ldmatrix x4 / x4.trans / x2 / x2.trans.
        LDMATRIX_LAYOUT = k_emu_ldmatrix_layout / qlemu_k_emu_ldmatrix_layout;
        /// Write own shared cell, read a neighbour's, with or without a barrier.
        NEIGHBOUR_EXCHANGE = k_emu_neighbour_exchange / qlemu_k_emu_neighbour_exchange;
        /// Shared accesses at an offset index (1-D, 2-D and dynamic arrays).
        SHARED_OOB = k_emu_shared_oob / qlemu_k_emu_shared_oob;
        /// f32 to bf16 / f16 and back.
        CONVERT = k_emu_convert / qlemu_k_emu_convert;
        /// Global and shared atomics from every thread.
        ATOMICS = k_emu_atomics / qlemu_k_emu_atomics;
        /// cp.async commit groups, waits and zero-fill.
        CP_ASYNC = k_emu_cp_async / qlemu_k_emu_cp_async;
        /// Misused warp and block synchronization (emulation only).
        BAD_SYNC = k_emu_bad_sync / qlemu_k_emu_bad_sync;
    }
}
