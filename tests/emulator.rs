//! The CPU emulation of CUDA, pinned through its self-test kernels (`kernels/emu_selftest.cu`):
//! barriers, warp collectives, tensor-core fragment layouts, cp.async ordering, conversions and
//! atomics against plain Rust references, and races / bounds / misuse reported as errors.
//!
//! Each semantic check is written once against a [`Backend`] and runs on the emulation and, with
//! feature `cuda` and a GPU, on the device (`mod cuda`), so the emulation is checked against
//! silicon. The misuse tests (races, out-of-bounds, bad synchronization, watchdog, stale cp.async
//! reads) are undefined behaviour on a GPU and stay emulation-only.

use qlora::kernels::abi::QlEmuTestParams;
use qlora::kernels::emu::{self, selftest, EmuOptions};
use qlora::kernels::{Kernel, LaunchConfig};
use qlora::tolerance::{self, Dtype, Op, Tolerance};
use qlora::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;
use std::time::Duration;

#[cfg(feature = "cuda")]
use qlora::kernels::cuda::CudaDevice;

/// 16 bytes, 16-byte aligned: cp.async sources must be.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Chunk([u8; 16]);

/// A kernel input: the native-endian bytes of its values, in 16-byte aligned storage.
#[derive(Default)]
struct Input {
    chunks: Vec<Chunk>,
    len: usize,
}

impl Input {
    fn new<T: Copy, const W: usize>(values: &[T], to_bytes: fn(T) -> [u8; W]) -> Self {
        let len = values.len() * W;
        let mut chunks = vec![Chunk::default(); len.div_ceil(16)];
        for (i, byte) in values.iter().flat_map(|&x| to_bytes(x)).enumerate() {
            chunks[i / 16].0[i % 16] = byte;
        }
        Input { chunks, len }
    }

    /// The host address of the bytes; null for an empty (unused) input.
    fn host_ptr(&self) -> *const c_void {
        if self.len == 0 {
            std::ptr::null()
        } else {
            self.chunks.as_ptr().cast()
        }
    }
}

/// The host address of an output; null for an empty (unused) one.
fn host_out_ptr<T>(v: &mut [T]) -> *mut T {
    if v.is_empty() {
        std::ptr::null_mut()
    } else {
        v.as_mut_ptr()
    }
}

/// One launch of a self-test kernel: the inputs behind `a`, `b`, `c`, the initial contents of the
/// two outputs (the kernel may read them, and elements it leaves alone come back unchanged), and
/// the scalar fields of [`QlEmuTestParams`]. Each check sizes the buffers as the kernel's comment
/// in kernels/emu_selftest.cu documents for its launch configuration.
#[derive(Default)]
struct Launch {
    a: Input,
    b: Input,
    c: Input,
    out: Vec<f32>,
    out_u32: Vec<u32>,
    m: i32,
    n: i32,
    k: i32,
    flags: i32,
}

/// The outputs after a launch.
#[derive(Debug)]
struct Outputs {
    out: Vec<f32>,
    out_u32: Vec<u32>,
}

/// Where a self-test kernel runs.
enum Backend<'a> {
    /// The CPU emulation with these options, on host memory.
    Emulated(&'a EmuOptions),
    /// The PTX on a GPU: inputs and outputs are copied to the device and back.
    #[cfg(feature = "cuda")]
    Cuda(&'a CudaDevice),
}

impl Backend<'_> {
    /// Runs `kernel` over `cfg` and waits for it; returns what it left in the outputs.
    fn run(&self, kernel: Kernel, cfg: LaunchConfig, launch: Launch) -> qlora::Result<Outputs> {
        match self {
            Backend::Emulated(options) => {
                let Launch {
                    a,
                    b,
                    c,
                    mut out,
                    mut out_u32,
                    m,
                    n,
                    k,
                    flags,
                } = launch;
                let p = QlEmuTestParams {
                    a: a.host_ptr(),
                    b: b.host_ptr(),
                    c: c.host_ptr(),
                    out: host_out_ptr(&mut out),
                    out_u32: host_out_ptr(&mut out_u32),
                    m,
                    n,
                    k,
                    flags,
                };
                // SAFETY: the check sized every buffer behind `p` for this kernel and `cfg` (see
                // `Launch`); they are owned here and outlive the call, which returns only once
                // every emulated thread has finished.
                unsafe { emu::launch_with(&kernel, &cfg, &p, options) }?;
                Ok(Outputs { out, out_u32 })
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => cuda::run(dev, &kernel, &cfg, &launch),
        }
    }
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: smem,
    }
}

/// Default options with race checking on even under `QLORA_EMU_RACECHECK=0`.
fn checked() -> EmuOptions {
    EmuOptions {
        race_check: true,
        ..EmuOptions::default()
    }
}

fn emulation_error<T: std::fmt::Debug>(r: qlora::Result<T>) -> String {
    match r {
        Err(Error::Emulation { reason, .. }) => reason,
        other => panic!("expected an emulation error, got {other:?}"),
    }
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn check_block_reduce(backend: &Backend) {
    let n = 10_007usize;
    let a: Vec<f32> = {
        let mut rng = StdRng::seed_from_u64(1);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    };
    let slice = 157usize;
    let blocks = n.div_ceil(slice);
    let want: Vec<f32> = a.chunks(slice).map(|c| c.iter().sum()).collect();
    for block in [
        (32, 1, 1),
        (96, 1, 1),
        (256, 1, 1),
        (48, 1, 1),
        (16, 6, 1),
        (1, 1, 1),
    ] {
        let launch = Launch {
            a: Input::new(&a, f32::to_ne_bytes),
            out: vec![f32::NAN; blocks],
            n: n as i32,
            k: slice as i32,
            ..Launch::default()
        };
        let out = backend
            .run(
                selftest::BLOCK_REDUCE,
                cfg((blocks as u32, 1, 1), block, 128),
                launch,
            )
            .unwrap()
            .out;
        tolerance::lookup(Op::Reduction, Dtype::F32)
            .check(&out, &want)
            .unwrap_or_else(|e| panic!("block {block:?}: {e}"));
    }
}

#[test]
fn block_reduce_matches_reference_for_block_shapes() {
    check_block_reduce(&Backend::Emulated(&EmuOptions::default()));
}

fn check_large_grid(backend: &Backend) {
    // 64 blocks of 256 threads, ten shuffle rounds and a barrier each: the launch the emulator is
    // sized for (about half a second on 2 cores).
    let blocks = 64;
    let a = vec![1.0f32; blocks * 1000];
    let launch = Launch {
        a: Input::new(&a, f32::to_ne_bytes),
        out: vec![0.0; blocks],
        n: a.len() as i32,
        k: 1000,
        ..Launch::default()
    };
    let out = backend
        .run(
            selftest::BLOCK_REDUCE,
            cfg((blocks as u32, 1, 1), (256, 1, 1), 128),
            launch,
        )
        .unwrap()
        .out;
    assert!(out.iter().all(|&s| s == 1000.0), "{out:?}");
}

#[test]
fn large_grid_with_barriers_and_shuffles_runs() {
    check_large_grid(&Backend::Emulated(&EmuOptions::default()));
}

fn check_warp_scan(backend: &Backend) {
    let n = 128;
    let mut rng = StdRng::seed_from_u64(2);
    let a: Vec<u32> = (0..n).map(|_| rng.random_range(0..1000)).collect();
    for width in [32usize, 16, 8, 1] {
        let launch = Launch {
            a: Input::new(&a, u32::to_ne_bytes),
            out_u32: vec![0; n],
            k: width as i32,
            ..Launch::default()
        };
        let out = backend
            .run(selftest::WARP_SCAN, cfg((2, 1, 1), (64, 1, 1), 0), launch)
            .unwrap()
            .out_u32;
        let want: Vec<u32> = a
            .chunks(width)
            .flat_map(|c| {
                c.iter().scan(0u32, |s, &x| {
                    *s += x;
                    Some(*s)
                })
            })
            .collect();
        assert_eq!(out, want, "width {width}");
    }
}

#[test]
fn warp_scan_gives_inclusive_prefix_sums_per_section() {
    check_warp_scan(&Backend::Emulated(&EmuOptions::default()));
}

/// Source lane of PTX `shfl.sync` for CUDA's clamp values (segment = `width` lanes).
fn ptx_source(mode: &str, lane: i32, arg: i32, width: i32) -> i32 {
    let start = lane & !(width - 1);
    let end = start | (width - 1);
    let j = match mode {
        "idx" => return start | (arg & (width - 1)),
        "up" => {
            return if lane - arg >= start {
                lane - arg
            } else {
                lane
            }
        }
        "down" => lane + arg,
        _ => lane ^ arg,
    };
    if j <= end {
        j
    } else {
        lane
    }
}

fn check_warp_ops(backend: &Backend) {
    let threads = 128usize;
    let mut rng = StdRng::seed_from_u64(3);
    let mut x: Vec<u32> = (0..threads).map(|_| rng.random_range(1..1 << 20)).collect();
    x[40] = 7; // warp 1 has a 7; warp 2 has a zero
    x[70] = 0;
    for width in [32i32, 8, 4] {
        let launch = Launch {
            a: Input::new(&x, u32::to_ne_bytes),
            out_u32: vec![0; 12 * threads],
            k: width,
            ..Launch::default()
        };
        let out = backend
            .run(selftest::WARP_OPS, cfg((2, 1, 1), (64, 1, 1), 0), launch)
            .unwrap()
            .out_u32;
        for i in 0..threads {
            let (base, lane) = (i - i % 32, (i % 32) as i32);
            let w = &x[base..base + 32];
            let at = |l: i32| w[l as usize];
            let o = &out[12 * i..12 * i + 12];
            let ctx = format!("width {width} thread {i}");
            assert_eq!(
                o[0],
                at(ptx_source("idx", lane, lane * 3 + 1, width)),
                "{ctx} idx"
            );
            assert_eq!(o[1], at(ptx_source("up", lane, 3, width)), "{ctx} up");
            assert_eq!(o[2], at(ptx_source("down", lane, 3, width)), "{ctx} down");
            assert_eq!(o[3], at(ptx_source("xor", lane, 5, width)), "{ctx} xor");
            let ballot = (0..32)
                .filter(|&l| w[l] & 1 == 1)
                .fold(0u32, |b, l| b | 1 << l);
            assert_eq!(o[4], ballot, "{ctx} ballot");
            assert_eq!(o[5], w.contains(&7) as u32, "{ctx} any");
            assert_eq!(o[6], (!w.contains(&0)) as u32, "{ctx} all");
            assert_eq!(o[7], 2 * at(lane ^ 1) + 1, "{ctx} f64 xor");
            let down1 = if lane < 31 { lane + 1 } else { lane };
            assert_eq!(o[8], at(down1) & 0xFFFF, "{ctx} bf16 down");
            assert_eq!(o[9], w[0], "{ctx} u64 broadcast");
            assert_eq!(o[10], u32::MAX, "{ctx} activemask");
            assert_eq!(
                o[11],
                if lane < 16 { 0xAAAA } else { 0 },
                "{ctx} half-warp ballot"
            );
        }
        // Hand-picked cases of the segment rules: with width 4, lane 5 ^ 5 = lane 0 lies in an
        // earlier segment and is read; lane 1 ^ 5 = lane 4 lies in a later one, so lane 1 keeps
        // its own value.
        if width == 4 {
            assert_eq!(out[12 * 5 + 3], x[0]);
            assert_eq!(out[12 + 3], x[1]);
        }
    }
}

#[test]
fn warp_shuffles_and_votes_follow_ptx_rules() {
    check_warp_ops(&Backend::Emulated(&EmuOptions::default()));
}

/// A (m × k) or B (k × n) in bf16, rows padded to 8 elements with NaN the kernel must not read.
fn padded_bf16(rows: usize, cols: usize, values: &[f32]) -> Input {
    let ld = cols.div_ceil(8) * 8;
    let mut bits = vec![0x7FC0u16; rows * ld];
    for r in 0..rows {
        for c in 0..cols {
            bits[r * ld + c] = half::bf16::from_f32(values[r * cols + c]).to_bits();
        }
    }
    Input::new(&bits, u16::to_ne_bytes)
}

fn check_mma_gemm(backend: &Backend) {
    // The emulation accumulates in k order like the reference; tensor cores accumulate in their
    // own order and alignment, a few ulps per term.
    let tol = match backend {
        Backend::Emulated(_) => Tolerance {
            atol: 1e-6,
            rtol: 1e-5,
        },
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => tolerance::lookup(Op::MatmulBf16, Dtype::F32),
    };
    for &(m, n, k) in &[
        (37usize, 29usize, 45usize),
        (1, 1, 1),
        (16, 8, 16),
        (64, 40, 70),
        (33, 17, 96),
    ] {
        let mut rng = StdRng::seed_from_u64((m * 10_000 + n * 100 + k) as u64);
        let a: Vec<f32> = (0..m * k)
            .map(|_| bf16_round(rng.random_range(-2.0f32..2.0)))
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|_| bf16_round(rng.random_range(-2.0f32..2.0)))
            .collect();
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).fold(0.0f32, |s, kk| s + a[i * k + kk] * b[kk * n + j]);
            }
        }
        let launch = Launch {
            a: padded_bf16(m, k, &a),
            b: padded_bf16(k, n, &b),
            out: vec![f32::NAN; m * n],
            m: m as i32,
            n: n as i32,
            k: k as i32,
            ..Launch::default()
        };
        let grid = (n.div_ceil(16) as u32, m.div_ceil(32) as u32, 1);
        let out = backend
            .run(selftest::MMA_GEMM, cfg(grid, (64, 1, 1), 0), launch)
            .unwrap()
            .out;
        tol.check(&out, &want)
            .unwrap_or_else(|e| panic!("{m}x{n}x{k}: {e}"));
    }
}

#[test]
fn mma_gemm_matches_f32_reference_on_odd_shapes() {
    check_mma_gemm(&Backend::Emulated(&EmuOptions::default()));
}

/// D = A·B + C through one mma whose fragments the kernel places by the PTX ISA formulas.
fn run_mma_layout(backend: &Backend, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
    let bf16_bits = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect()
    };
    let launch = Launch {
        a: Input::new(&bf16_bits(a), u16::to_ne_bytes),
        b: Input::new(&bf16_bits(b), u16::to_ne_bytes),
        c: Input::new(c, f32::to_ne_bytes),
        out: vec![f32::NAN; 16 * 8],
        ..Launch::default()
    };
    backend
        .run(selftest::MMA_LAYOUT, cfg((1, 1, 1), (32, 1, 1), 0), launch)
        .unwrap()
        .out
}

fn check_mma_layout(backend: &Backend) {
    // A is a permutation (row r picks k = (5r + 3) mod 16), B[k][n] = 8k + n, C[r][n] = 1000 + 10r + n:
    // D[r][n] = 8·perm(r) + n + C[r][n], so a misplaced fragment element shows at once.
    let perm = |r: usize| (5 * r + 3) % 16;
    let mut a = vec![0.0f32; 256];
    for r in 0..16 {
        a[r * 16 + perm(r)] = 1.0;
    }
    let b: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let c: Vec<f32> = (0..128)
        .map(|i| (1000 + 10 * (i / 8) + i % 8) as f32)
        .collect();
    let d = run_mma_layout(backend, &a, &b, &c);
    for r in 0..16 {
        for n in 0..8 {
            assert_eq!(
                d[r * 8 + n],
                (8 * perm(r) + n) as f32 + c[r * 8 + n],
                "D[{r}][{n}]"
            );
        }
    }
    // By hand: row 1 picks k = 8 (the upper half of A's columns), so D[1][2] = B[8][2] + C[1][2].
    assert_eq!(d[8 + 2], 66.0 + 1012.0);
    // Row 9 (the g + 8 half of D) picks k = 0: D[9][7] = B[0][7] + C[9][7] = 7 + 1097.
    assert_eq!(d[9 * 8 + 7], 7.0 + 1097.0);

    // Small integers: every product and sum is exact, so D must equal A·B + C exactly.
    let mut rng = StdRng::seed_from_u64(4);
    let a: Vec<f32> = (0..256)
        .map(|_| rng.random_range(-8i32..8) as f32)
        .collect();
    let b: Vec<f32> = (0..128)
        .map(|_| rng.random_range(-8i32..8) as f32)
        .collect();
    let c: Vec<f32> = (0..128)
        .map(|_| rng.random_range(-100i32..100) as f32)
        .collect();
    let d = run_mma_layout(backend, &a, &b, &c);
    for r in 0..16 {
        for n in 0..8 {
            let want = c[r * 8 + n] + (0..16).map(|k| a[r * 16 + k] * b[k * 8 + n]).sum::<f32>();
            assert_eq!(d[r * 8 + n], want, "D[{r}][{n}]");
        }
    }
}

#[test]
fn mma_fragment_layout_matches_ptx_isa() {
    check_mma_layout(&Backend::Emulated(&EmuOptions::default()));
}

fn check_ldmatrix_layout(backend: &Backend) {
    let launch = Launch {
        out_u32: vec![0; 4 * 32 * 4],
        ..Launch::default()
    };
    let out = backend
        .run(
            selftest::LDMATRIX_LAYOUT,
            cfg((1, 1, 1), (32, 1, 1), 0),
            launch,
        )
        .unwrap()
        .out_u32;
    // Element (j, q, c) as ldmatrix sees it: row q of matrix j comes from lane 8j + q, which
    // points at stored row 8j + 7 - q, holding 8 · (8j + 7 - q) + c.
    let v = |j: usize, q: usize, c: usize| (8 * (8 * j + 7 - q) + c) as u32;
    let reg = |variant: usize, lane: usize, j: usize| out[(variant * 32 + lane) * 4 + j];
    for lane in 0..32 {
        let (row, col) = (lane / 4, 2 * (lane % 4));
        for j in 0..4 {
            let plain = v(j, row, col) | v(j, row, col + 1) << 16;
            let trans = v(j, col, row) | v(j, col + 1, row) << 16;
            assert_eq!(reg(0, lane, j), plain, "x4 lane {lane} reg {j}");
            assert_eq!(reg(1, lane, j), trans, "x4.trans lane {lane} reg {j}");
            if j < 2 {
                assert_eq!(reg(2, lane, j), plain, "x2 lane {lane} reg {j}");
                assert_eq!(reg(3, lane, j), trans, "x2.trans lane {lane} reg {j}");
            } else {
                assert_eq!((reg(2, lane, j), reg(3, lane, j)), (0, 0));
            }
        }
    }
    // By hand: lane 5 gets row 1, columns 2-3 of matrix 0 (stored row 6: 50, 51); transposed,
    // rows 2-3 of column 1 (stored rows 5 and 4: 41, 33); lane 31 register 3 gets row 7,
    // columns 6-7 of matrix 3 (stored row 24: 198, 199).
    assert_eq!(reg(0, 5, 0), 0x0033_0032);
    assert_eq!(reg(1, 5, 0), 0x0021_0029);
    assert_eq!(reg(0, 31, 3), 0x00C7_00C6);
}

#[test]
fn ldmatrix_layout_matches_ptx_isa() {
    check_ldmatrix_layout(&Backend::Emulated(&EmuOptions::default()));
}

/// `k_emu_neighbour_exchange` over two blocks of `threads` (flags as the kernel documents).
fn neighbour_exchange(backend: &Backend, flags: i32, threads: u32) -> qlora::Result<Vec<f32>> {
    let a: Vec<f32> = (0..2 * threads).map(|i| i as f32).collect();
    let launch = Launch {
        a: Input::new(&a, f32::to_ne_bytes),
        out: vec![0.0; a.len()],
        flags,
        ..Launch::default()
    };
    let cfg = cfg((2, 1, 1), (threads, 1, 1), 0);
    Ok(backend.run(selftest::NEIGHBOUR_EXCHANGE, cfg, launch)?.out)
}

#[test]
fn missing_syncthreads_is_reported_as_race() {
    let reason = emulation_error(neighbour_exchange(&Backend::Emulated(&checked()), 0, 128));
    assert!(
        reason.contains("data race") && reason.contains("`cells["),
        "{reason}"
    );
}

fn check_syncthreads_orders(backend: &Backend) {
    let out = neighbour_exchange(backend, 1, 128).unwrap();
    let want: Vec<f32> = (0..256u32)
        .map(|i| (i - i % 128 + (i + 1) % 128) as f32)
        .collect();
    assert_eq!(out, want);
}

#[test]
fn syncthreads_orders_shared_memory_across_warps() {
    check_syncthreads_orders(&Backend::Emulated(&checked()));
}

#[test]
fn missing_syncwarp_within_a_warp_is_reported_as_race() {
    let reason = emulation_error(neighbour_exchange(&Backend::Emulated(&checked()), 4, 64));
    assert!(reason.contains("data race"), "{reason}");
}

fn check_syncwarp_orders(backend: &Backend) {
    let out = neighbour_exchange(backend, 2 | 4, 64).unwrap();
    let want: Vec<f32> = (0..128u32)
        .map(|i| (i - i % 32 + (i + 1) % 32) as f32)
        .collect();
    assert_eq!(out, want);
}

#[test]
fn syncwarp_orders_shared_memory_within_a_warp() {
    check_syncwarp_orders(&Backend::Emulated(&checked()));
}

#[test]
fn race_check_can_be_switched_off() {
    let options = EmuOptions {
        race_check: false,
        ..EmuOptions::default()
    };
    neighbour_exchange(&Backend::Emulated(&options), 0, 128).unwrap();
}

fn shared_oob(flags: i32, offset: i32) -> qlora::Result<Vec<f32>> {
    let launch = Launch {
        out: vec![0.0; 64],
        flags,
        k: offset,
        ..Launch::default()
    };
    let cfg = cfg((1, 1, 1), (64, 1, 1), 256);
    let backend = Backend::Emulated(&EmuOptions::default());
    Ok(backend.run(selftest::SHARED_OOB, cfg, launch)?.out)
}

#[test]
fn shared_out_of_bounds_is_reported_with_the_array_name() {
    for (flags, needle) in [(0, "`tile[64]`"), (1, "`grid2["), (2, "`dyn[64]`")] {
        let reason = emulation_error(shared_oob(flags, 1));
        assert!(
            reason.contains("out-of-bounds") && reason.contains(needle),
            "{reason}"
        );
    }
    let reason = emulation_error(shared_oob(0, -1));
    assert!(
        reason.contains("`tile[-1]`") && reason.contains("thread (0,0,0)"),
        "{reason}"
    );
    // The process and the emulator survive: in-bounds launches still run.
    for flags in 0..3 {
        let out = shared_oob(flags, 0).unwrap();
        assert_eq!(out, (0..64).map(|i| i as f32).collect::<Vec<_>>());
    }
}

fn check_conversions(backend: &Backend) {
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + 2f32.powi(-8),       // bf16 tie, rounds down to even
        1.0 + 3.0 * 2f32.powi(-8), // bf16 tie, rounds up to even
        1.0 + 2f32.powi(-11),      // f16 tie
        1.0 + 3.0 * 2f32.powi(-11),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x807F_FFFF),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN
        65504.0,
        65519.996,
        65520.0, // f16 overflow by rounding
        -65520.0,
        3.3961776e38, // bf16 rounds to inf
        2f32.powi(-24),
        2f32.powi(-25),       // f16 tie between 0 and the smallest subnormal
        1.5 * 2f32.powi(-25), // rounds up to it
        3.0 * 2f32.powi(-25), // tie between subnormals 1 and 2: even
        2f32.powi(-14),
        2f32.powi(-14) - 2f32.powi(-25), // subnormal rounding into the smallest normal
        1e-40,
    ];
    let mut rng = StdRng::seed_from_u64(5);
    x.extend((0..4000).map(|_| f32::from_bits(rng.random::<u32>())));
    x.extend((0..1000).map(|_| rng.random_range(-70000.0f32..70000.0)));
    let n = x.len();
    let launch = Launch {
        a: Input::new(&x, f32::to_ne_bytes),
        out: vec![0.0; 2 * n],
        out_u32: vec![0; n],
        n: n as i32,
        ..Launch::default()
    };
    let Outputs {
        out: back,
        out_u32: bits,
    } = backend
        .run(
            selftest::CONVERT,
            cfg((n.div_ceil(128) as u32, 1, 1), (128, 1, 1), 0),
            launch,
        )
        .unwrap();
    for i in 0..n {
        let (bf, h) = ((bits[i] & 0xFFFF) as u16, (bits[i] >> 16) as u16);
        let (want_bf, want_h) = (half::bf16::from_f32(x[i]), half::f16::from_f32(x[i]));
        if x[i].is_nan() {
            assert_eq!(
                (bf, h),
                (0x7FFF, 0x7FFF),
                "canonical NaN for {:#x}",
                x[i].to_bits()
            );
            assert!(back[2 * i].is_nan() && back[2 * i + 1].is_nan());
            continue;
        }
        assert_eq!(
            bf,
            want_bf.to_bits(),
            "bf16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            h,
            want_h.to_bits(),
            "f16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(back[2 * i].to_bits(), want_bf.to_f32().to_bits());
        assert_eq!(back[2 * i + 1].to_bits(), want_h.to_f32().to_bits());
    }
}

#[test]
fn bf16_and_f16_rounding_matches_half_crate() {
    check_conversions(&Backend::Emulated(&EmuOptions::default()));
}

fn check_atomics(backend: &Backend) {
    let n = 1000usize;
    let a: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
    let launch = Launch {
        a: Input::new(&a, f32::to_ne_bytes),
        out: vec![0.0],
        out_u32: vec![0, 0, u32::MAX, i32::MIN as u32, 0, 0, 0],
        n: n as i32,
        ..Launch::default()
    };
    let Outputs {
        out: sum,
        out_u32: words,
    } = backend
        .run(selftest::ATOMICS, cfg((4, 1, 1), (256, 1, 1), 0), launch)
        .unwrap();
    let h = |i: usize| (i as u32).wrapping_mul(2_654_435_761);
    assert_eq!(sum[0], a.iter().sum::<f32>());
    assert_eq!(words[0], n as u32);
    assert_eq!(words[1], (0..n).map(h).max().unwrap());
    assert_eq!(words[2], (0..n).map(h).min().unwrap());
    assert_eq!(words[3] as i32, 16 - 1000);
    assert_eq!(words[4], n as u32);
    assert_eq!(words[5], 1);
    assert_eq!(words[6], n as u32);
}

#[test]
fn atomics_from_many_threads_and_blocks_are_exact() {
    check_atomics(&Backend::Emulated(&EmuOptions::default()));
}

/// Commit groups, waits and zero-fill land each copy where the PTX ISA says; any access to a
/// destination still in flight (a read or write before the wait that retires its group, or a
/// second copy into it) is reported, since a GPU may run it before or after the copy lands.
#[test]
fn cp_async_lands_at_its_wait_and_reports_accesses_in_flight() {
    let threads = 64usize;
    let values: Vec<f32> = (0..4 * threads).map(|i| 1.5 + i as f32).collect();
    let run = |flags: i32| {
        let launch = Launch {
            a: Input::new(&values, f32::to_ne_bytes),
            out: vec![0.0; 4 * threads],
            out_u32: vec![0; 4 * threads],
            k: 6, // zero-filled copy of 6 of the 16 bytes
            flags,
            ..Launch::default()
        };
        Backend::Emulated(&EmuOptions::default()).run(
            selftest::CP_ASYNC,
            cfg((1, 1, 1), (threads as u32, 1, 1), 0),
            launch,
        )
    };
    let Outputs {
        out,
        out_u32: words,
    } = run(0).unwrap();
    for t in 0..threads {
        let x = &values[4 * t..4 * t + 4];
        assert_eq!(
            &out[4 * t..4 * t + 4],
            x,
            "thread {t}: group 0 after wait_group 1"
        );
        let zfill = [x[0].to_bits(), x[1].to_bits() & 0xFFFF, 0, 0];
        assert_eq!(
            &words[4 * t..4 * t + 4],
            &zfill,
            "thread {t}: zero-filled copy"
        );
    }
    for (flags, what) in [
        (1, "read before any wait"),
        (2, "write while group 1 is in flight"),
        (3, "second copy into a destination in flight"),
    ] {
        match run(flags) {
            Err(Error::Emulation { reason, .. }) => assert!(
                reason.contains("while a cp.async into it is in flight"),
                "{what}: {reason}"
            ),
            other => panic!("{what}: expected an emulation fault, got {other:?}"),
        }
    }
}

#[test]
fn invalid_launch_configs_are_rejected() {
    let backend = Backend::Emulated(&EmuOptions::default());
    for bad in [
        cfg((1, 1, 1), (1025, 1, 1), 0),
        cfg((1, 1, 1), (32, 33, 1), 0),
        cfg((0, 1, 1), (32, 1, 1), 0),
        cfg((1, 1, 1), (1, 1, 65), 0),
        cfg((1, 65536, 1), (32, 1, 1), 0),
        cfg((1, 1, 1), (32, 1, 1), 227 * 1024 + 1),
    ] {
        match backend.run(selftest::BLOCK_REDUCE, bad, Launch::default()) {
            Err(Error::InvalidArgument { op, .. }) => assert_eq!(op, "k_emu_block_reduce"),
            other => panic!("{bad:?}: expected InvalidArgument, got {other:?}"),
        }
    }
}

/// A launch asking 48 KiB + 4 bytes of dynamic shared memory: refused before launching when the
/// kernel has not opted in (as a GPU launch without the attribute fails), run when it has (the
/// CUDA backend sets `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
fn check_dynamic_shared_opt_in(backend: &Backend) {
    let over = 48 * 1024 + 4;
    let a: Vec<f32> = (0..1000).map(|i| (i % 7) as f32 - 3.0).collect();
    let want: Vec<f32> = a.chunks(250).map(|c| c.iter().sum()).collect();
    let launch = || Launch {
        a: Input::new(&a, f32::to_ne_bytes),
        out: vec![f32::NAN; 4],
        n: a.len() as i32,
        k: 250,
        ..Launch::default()
    };
    let refused = backend.run(
        selftest::BLOCK_REDUCE,
        cfg((4, 1, 1), (128, 1, 1), over),
        launch(),
    );
    match refused {
        Err(Error::InvalidArgument { op, reason }) => {
            assert_eq!(op, "k_emu_block_reduce");
            assert!(
                reason.contains(&format!("{over} bytes of dynamic shared memory"))
                    && reason.contains("49152")
                    && reason.contains("opting in"),
                "{reason}"
            );
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    let opted_in = Kernel {
        dynamic_shared_opt_in: Some(over),
        ..selftest::BLOCK_REDUCE
    };
    let out = backend
        .run(opted_in, cfg((4, 1, 1), (128, 1, 1), over), launch())
        .unwrap()
        .out;
    assert_eq!(out, want);
    // Past its own opt-in, the kernel is refused again.
    match backend.run(opted_in, cfg((4, 1, 1), (128, 1, 1), over + 4), launch()) {
        Err(Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains("opted in to"), "{reason}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn dynamic_shared_memory_over_48_kib_needs_an_opt_in() {
    check_dynamic_shared_opt_in(&Backend::Emulated(&EmuOptions::default()));
}

#[test]
fn an_opt_in_beyond_every_target_architecture_is_refused() {
    let greedy = Kernel {
        dynamic_shared_opt_in: Some(100 * 1024),
        ..selftest::BLOCK_REDUCE
    };
    let backend = Backend::Emulated(&EmuOptions::default());
    match backend.run(greedy, cfg((1, 1, 1), (32, 1, 1), 128), Launch::default()) {
        Err(Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains("every target architecture"), "{reason}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn bad_sync(flags: i32, options: &EmuOptions) -> String {
    let launch = Launch {
        out: vec![0.0; 32],
        flags,
        ..Launch::default()
    };
    emulation_error(Backend::Emulated(options).run(
        selftest::BAD_SYNC,
        cfg((1, 1, 1), (32, 1, 1), 0),
        launch,
    ))
}

#[test]
fn warp_collective_with_an_exited_lane_fails() {
    let reason = bad_sync(0, &EmuOptions::default());
    assert!(reason.contains("exited"), "{reason}");
}

#[test]
fn lanes_with_different_warp_masks_fail() {
    let reason = bad_sync(2, &EmuOptions::default());
    assert!(reason.contains("different masks"), "{reason}");
}

#[test]
fn barrier_deadlock_is_reported_by_the_watchdog() {
    let options = EmuOptions {
        watchdog: Duration::from_millis(200),
        ..EmuOptions::default()
    };
    let reason = bad_sync(1, &options);
    assert!(reason.contains("deadlock"), "{reason}");
}

/// The semantic checks on a GPU, when one exists (each test returns early otherwise).
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cudarc::driver::{
        CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError, SyncOnDrop,
    };
    use std::sync::Arc;

    fn cuda_err(e: DriverError) -> Error {
        Error::Cuda(e.to_string())
    }

    /// A copy of `host` on the device; `None` when empty (CUDA cannot allocate 0 bytes, and an
    /// unused buffer stays a null pointer as on the host).
    fn upload<T: DeviceRepr>(
        s: &Arc<CudaStream>,
        host: &[T],
    ) -> qlora::Result<Option<CudaSlice<T>>> {
        if host.is_empty() {
            return Ok(None);
        }
        s.clone_htod(host).map(Some).map_err(cuda_err)
    }

    fn download<T: DeviceRepr>(
        s: &Arc<CudaStream>,
        device: &Option<CudaSlice<T>>,
    ) -> qlora::Result<Vec<T>> {
        device
            .as_ref()
            .map_or(Ok(Vec::new()), |d| s.clone_dtoh(d).map_err(cuda_err))
    }

    /// The device address held by a `device_ptr` guard pair; 0 (null) for no buffer.
    fn addr(ptr: &Option<(u64, SyncOnDrop<'_>)>) -> u64 {
        ptr.as_ref().map_or(0, |&(p, _)| p)
    }

    /// [`Backend::run`] on `dev`: uploads the inputs and the outputs' initial contents, launches,
    /// synchronizes (so faults surface here) and downloads the outputs.
    pub(super) fn run(
        dev: &CudaDevice,
        kernel: &Kernel,
        cfg: &LaunchConfig,
        launch: &Launch,
    ) -> qlora::Result<Outputs> {
        let s = dev.stream();
        let bytes = |input: &Input| -> Vec<u8> {
            let all = input.chunks.iter().flat_map(|c| c.0);
            all.take(input.len).collect()
        };
        let a = upload(s, &bytes(&launch.a))?;
        let b = upload(s, &bytes(&launch.b))?;
        let c = upload(s, &bytes(&launch.c))?;
        let mut out = upload(s, &launch.out)?;
        let mut out_u32 = upload(s, &launch.out_u32)?;
        {
            // The guards order the buffers on `s` and must live until the launch is queued.
            let a_ptr = a.as_ref().map(|d| d.device_ptr(s));
            let b_ptr = b.as_ref().map(|d| d.device_ptr(s));
            let c_ptr = c.as_ref().map(|d| d.device_ptr(s));
            let out_ptr = out.as_mut().map(|d| d.device_ptr_mut(s));
            let out_u32_ptr = out_u32.as_mut().map(|d| d.device_ptr_mut(s));
            let p = QlEmuTestParams {
                a: addr(&a_ptr) as *const c_void,
                b: addr(&b_ptr) as *const c_void,
                c: addr(&c_ptr) as *const c_void,
                out: addr(&out_ptr) as *mut f32,
                out_u32: addr(&out_u32_ptr) as *mut u32,
                m: launch.m,
                n: launch.n,
                k: launch.k,
                flags: launch.flags,
            };
            // SAFETY: the device buffers are copies of `launch`'s, which the check sized for this
            // kernel and `cfg`; they live until after the synchronize below, and their guards
            // until the launch is queued.
            unsafe { dev.launch(kernel, cfg, &p) }?;
        }
        dev.synchronize()?;
        Ok(Outputs {
            out: download(s, &out)?,
            out_u32: download(s, &out_u32)?,
        })
    }

    macro_rules! on_gpu {
        ($($test:ident => $check:ident;)*) => {$(
            #[test]
            fn $test() {
                let Some(dev) = CudaDevice::first_available() else {
                    return;
                };
                $check(&Backend::Cuda(&dev));
            }
        )*};
    }

    on_gpu! {
        block_reduce_matches_reference_for_block_shapes => check_block_reduce;
        large_grid_with_barriers_and_shuffles_runs => check_large_grid;
        warp_scan_gives_inclusive_prefix_sums_per_section => check_warp_scan;
        warp_shuffles_and_votes_follow_ptx_rules => check_warp_ops;
        mma_gemm_matches_f32_reference_on_odd_shapes => check_mma_gemm;
        mma_fragment_layout_matches_ptx_isa => check_mma_layout;
        ldmatrix_layout_matches_ptx_isa => check_ldmatrix_layout;
        syncthreads_orders_shared_memory_across_warps => check_syncthreads_orders;
        syncwarp_orders_shared_memory_within_a_warp => check_syncwarp_orders;
        bf16_and_f16_rounding_matches_half_crate => check_conversions;
        atomics_from_many_threads_and_blocks_are_exact => check_atomics;
        dynamic_shared_memory_over_48_kib_needs_an_opt_in => check_dynamic_shared_opt_in;
    }
}
