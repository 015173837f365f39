//! Parity of the NF4 tensor-core GEMM in kernels/nf4_gemm.cu, forward (y = x·Wᵀ) and input
//! gradient (dx = dy·W): the Rust reference ≡ the same CUDA source run through the CPU emulation ≡
//! CUDA (tensor-core kernel, dequantize + cuBLAS, and the dispatcher) when a GPU is present, on
//! M, N, K that are not multiples of the 128 × 128 × 32 tiles, K not a multiple of the quantization
//! block (blocks straddling rows) or of 16 (the per-element weight path), f32 and double-quantized
//! scales, bf16 and f32 output; and the reference against an independent dense bf16 matmul.

use candle_core::{Device, Tensor};
mod common;

use common::nf4_weight::{all, DeviceWeight, Weight};
use half::bf16;
use qlora::kernels::device::{Emulator, LaunchDevice};
use qlora::kernels::launch::Element;
use qlora::kernels::nf4::{dequantize, Nf4Weight, Scales};
use qlora::kernels::nf4_gemm::{
    dequantize_weight_bf16, fast_path, nf4_gemm, nf4_gemm_into, nf4_gemm_ref, GemmOp, GemmShape,
};
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

/// (N, K): K = 64 (the fast kernels, one block per row); K = 160 (fast kernels, blocks of 64
/// straddling rows); K = 200 (K % 16 = 8: the general kernels; two output tiles of dx and two of y
/// at N = 136); N = 37, K = 33 (rows starting mid-byte, reductions of odd length: general).
const SHAPES: &[(usize, usize)] = &[(8, 64), (72, 160), (136, 200), (37, 33)];
const MS: &[usize] = &[1, 17, 70];

use qlora::kernels::launch::tolerance_dtype as dtype;

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Activations for `op`: x `[m, k]` or dy `[m, n]`.
fn activations(op: GemmOp, m: usize, w: &Weight, seed: u64) -> Vec<bf16> {
    let red = match op {
        GemmOp::Forward => w.k,
        GemmOp::InputGrad => w.n,
    };
    bf16s(&normal_vector(m * red, 1.0, seed))
}

/// `got` (in T) against the f32 reference rounded once to T.
fn check<T: Element>(what: &str, got: &[T], want: &[f32]) {
    check_op(Op::Nf4Gemm, what, got, want);
}

fn check_op<T: Element>(op: Op, what: &str, got: &[T], want: &[f32]) {
    let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = want.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    if let Err(e) = lookup(op, dtype::<T>()).check(&got, &want) {
        panic!("{what} {:?}: {e}", dtype::<T>());
    }
}

fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// The kernel on `dev` (into a new buffer, and into a caller-owned one: the same bits) against
/// the reference; `a` is uploaded `shift` elements into a buffer.
fn parity_shifted<D: LaunchDevice, T: Element>(
    dev: &D,
    op: GemmOp,
    w: &Weight,
    m: usize,
    double: bool,
    a: &[bf16],
    shift: usize,
) {
    let want = nf4_gemm_ref(op, a, m, &w.host(double)).unwrap();
    let dw = DeviceWeight::new(dev, w);
    let view = dw.view(dev, double);
    let mut shifted = vec![bf16::ZERO; a.len() + shift];
    shifted[shift..].copy_from_slice(a);
    let d_a = dev.upload(&shifted).unwrap();
    let a_view = dev.slice(&d_a, shift..shifted.len()).unwrap();
    let out = nf4_gemm::<D, T>(dev, op, &a_view, m, &view).unwrap();
    let got = dev.download(&out).unwrap();
    let what = format!(
        "{} {op:?} m={m} n={} k={} bs={} double={double} shift={shift}",
        dev.label(),
        w.n,
        w.k,
        w.blocksize
    );
    check(&what, &got, &want);
    let mut out2 = dev.zeros::<T>(got.len()).unwrap();
    nf4_gemm_into(dev, op, &a_view, m, &view, &mut out2).unwrap();
    assert_eq!(
        bits(&dev.download(&out2).unwrap()),
        bits(&got),
        "{what} into"
    );
}

fn parity<D: LaunchDevice, T: Element>(
    dev: &D,
    op: GemmOp,
    w: &Weight,
    m: usize,
    double: bool,
    a: &[bf16],
) {
    parity_shifted::<D, T>(dev, op, w, m, double, a, 0);
}

fn gemm_odd_shapes<D: LaunchDevice>(dev: &D) {
    for (i, &(n, k)) in SHAPES.iter().enumerate() {
        let w = Weight::new(n, k, 64, 0.05, i as u64);
        for (j, &m) in MS.iter().enumerate() {
            for op in [GemmOp::Forward, GemmOp::InputGrad] {
                let a = activations(op, m, &w, 10 + (i * 3 + j) as u64);
                // The first two shapes must reach the fast kernels (a fresh buffer is aligned).
                let shape = GemmShape::new(op, m, n, k, 64).unwrap();
                let fast = fast_path(&shape, 256, 256);
                assert_eq!(fast, i < 2, "{op:?} n={n} k={k}: fast kernels {fast}");
                // Every (scales, output dtype) pair across the M values of a shape and op.
                let double = (i + j) % 2 == 0;
                if j % 2 == 0 {
                    parity::<D, f32>(dev, op, &w, m, double, &a);
                } else {
                    parity::<D, bf16>(dev, op, &w, m, double, &a);
                }
            }
        }
    }
}
qlora::device_test!(gemm_matches_reference_on_odd_shapes, gemm_odd_shapes);

/// Which kernel each product of [`gemm_odd_shapes`]' shapes takes on the emulator: the fast ones
/// for the first two shapes (a fresh buffer's 16-byte alignment), the general ones after.
#[test]
fn odd_shapes_reach_the_fast_kernels_where_aligned() {
    use qlora::kernels::emu::launches_on_this_thread as launches;
    let dev = Emulator::default();
    for (i, &(n, k)) in SHAPES.iter().enumerate() {
        let w = Weight::new(n, k, 64, 0.05, i as u64);
        for op in [GemmOp::Forward, GemmOp::InputGrad] {
            let a = activations(op, 17, &w, 1);
            let (fast_name, general_name) = match op {
                GemmOp::Forward => ("k_nf4_gemm", "k_nf4_gemm_general"),
                GemmOp::InputGrad => ("k_nf4_gemm_dx", "k_nf4_gemm_dx_general"),
            };
            let before = (launches(fast_name), launches(general_name));
            parity::<Emulator, f32>(&dev, op, &w, 17, false, &a);
            let ran = (
                launches(fast_name) - before.0,
                launches(general_name) - before.1,
            );
            let want = if i < 2 { (2, 0) } else { (0, 2) };
            assert_eq!(ran, want, "{op:?} n={n} k={k}");
        }
    }
}

fn gemm_row_tiles<D: LaunchDevice>(dev: &D) {
    // m = 130: a second block row holding two rows, both kernels, both output dtypes.
    let w = Weight::new(24, 48, 64, 0.05, 3);
    for op in [GemmOp::Forward, GemmOp::InputGrad] {
        let a = activations(op, 130, &w, 4);
        parity::<D, bf16>(dev, op, &w, 130, true, &a);
        parity::<D, f32>(dev, op, &w, 130, false, &a);
    }
    // m = 1030: nine row tiles by two column tiles, so the blocks are remapped across a full
    // group of eight row tiles and a partial one.
    let w = Weight::new(136, 64, 64, 0.05, 8);
    let x = activations(GemmOp::Forward, 1030, &w, 9);
    parity::<D, bf16>(dev, GemmOp::Forward, &w, 1030, true, &x);
    let w = Weight::new(64, 144, 64, 0.05, 9);
    let dy = activations(GemmOp::InputGrad, 1030, &w, 10);
    parity::<D, f32>(dev, GemmOp::InputGrad, &w, 1030, false, &dy);
}
qlora::device_test!(
    gemm_covers_row_tiles_and_rasterization_groups,
    gemm_row_tiles
);

fn gemm_blocksizes<D: LaunchDevice>(dev: &D) {
    // K = 96 with blocks of 32 (three per row), 128 (straddling rows) and 256 (several rows per
    // block, and the fast path's 16-code chunks); K = 40 (per-element path) with blocks of 128.
    for (bs, k) in [(32, 96), (128, 96), (256, 96), (128, 40)] {
        let w = Weight::new(20, k, bs, 0.05, bs as u64);
        for (i, op) in [GemmOp::Forward, GemmOp::InputGrad].into_iter().enumerate() {
            let a = activations(op, 5, &w, 7 + i as u64);
            parity::<D, bf16>(dev, op, &w, 5, true, &a);
            parity::<D, f32>(dev, op, &w, 5, false, &a);
        }
    }
}
qlora::device_test!(gemm_matches_reference_for_blocksizes, gemm_blocksizes);

fn gemm_misaligned<D: LaunchDevice>(dev: &D) {
    // Three reduction steps in both kernels, so a step's activation stores meet the previous
    // step's reads of the same buffer (the race detector checks the barrier between them).
    let w = Weight::new(72, 96, 64, 0.05, 5);
    for op in [GemmOp::Forward, GemmOp::InputGrad] {
        // Activations one element into a buffer: rows are no longer 16-byte aligned.
        let a = activations(op, 3, &w, 6);
        parity_shifted::<D, f32>(dev, op, &w, 3, true, &a, 1);
        // Codes one byte into a buffer.
        let mut packed = vec![0u8; w.packed.len() + 1];
        packed[1..].copy_from_slice(&w.packed);
        let dw = DeviceWeight::new(dev, &w);
        let d_packed = dev.upload(&packed).unwrap();
        let view = Nf4Weight {
            packed: dev.slice(&d_packed, 1..packed.len()).unwrap(),
            ..dw.view(dev, false)
        };
        let want = nf4_gemm_ref(op, &a, 3, &w.host(false)).unwrap();
        let d_a = dev.upload(&a).unwrap();
        let got = nf4_gemm::<D, bf16>(dev, op, &d_a, 3, &view).unwrap();
        check(
            &format!("{op:?} misaligned codes"),
            &dev.download(&got).unwrap(),
            &want,
        );
    }
}
qlora::device_test!(
    gemm_takes_the_general_kernels_on_misaligned_inputs,
    gemm_misaligned
);

#[test]
fn reference_equals_dense_bf16_matmul_of_the_dequantized_weight() {
    let (m, n, k) = (9, 40, 136);
    let w = Weight::new(n, k, 64, 0.05, 11);
    for double in [false, true] {
        let view = w.host(double);
        // The bf16 weight every path multiplies is what k_nf4_dequantize writes (what the
        // dequantize + cuBLAS path feeds cuBLAS), bit for bit.
        let dense = dequantize_weight_bf16(&view).unwrap();
        let kernel: Vec<bf16> = dequantize(&Emulator::default(), &view).unwrap();
        assert_eq!(
            dense.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            kernel.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // An independent matmul (candle, f32 on the exact bf16 values) of both products.
        let dev = Device::Cpu;
        let w_t = Tensor::from_vec(
            dense.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            (n, k),
            &dev,
        )
        .unwrap();
        let x = activations(GemmOp::Forward, m, &w, 12);
        let x_t = Tensor::from_vec(
            x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            (m, k),
            &dev,
        )
        .unwrap();
        let y_dense: Vec<f32> = x_t
            .matmul(&w_t.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let y_ref = nf4_gemm_ref(GemmOp::Forward, &x, m, &view).unwrap();
        lookup(Op::Nf4Gemm, Dtype::F32)
            .check(&y_ref, &y_dense)
            .unwrap();
        let dy = activations(GemmOp::InputGrad, m, &w, 13);
        let dy_t = Tensor::from_vec(
            dy.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            (m, n),
            &dev,
        )
        .unwrap();
        let dx_dense: Vec<f32> = dy_t
            .matmul(&w_t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dx_ref = nf4_gemm_ref(GemmOp::InputGrad, &dy, m, &view).unwrap();
        lookup(Op::Nf4Gemm, Dtype::F32)
            .check(&dx_ref, &dx_dense)
            .unwrap();
    }
}

fn is_invalid<T>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn reference_rejects_invalid_arguments() {
    let w = Weight::new(8, 64, 64, 0.05, 1);
    let view = w.host(false);
    let x = vec![bf16::ZERO; 3 * 64];
    let run = |op: GemmOp, a: &[bf16], m: usize, view: &Nf4Weight<'_, Emulator>| {
        is_invalid(nf4_gemm_ref(op, a, m, view))
    };
    let f = GemmOp::Forward;
    assert!(!run(f, &x, 3, &view), "valid");
    assert!(!run(GemmOp::InputGrad, &x[..3 * 8], 3, &view), "valid dx");
    assert!(run(f, &[], 0, &view), "m = 0");
    assert!(run(f, &x[1..], 3, &view), "short x");
    // dy is [m, n]: x's [m, k] length is wrong for the input gradient.
    assert!(run(GemmOp::InputGrad, &x, 3, &view), "dy length");
    let short_packed = Nf4Weight {
        packed: &w.packed[1..],
        ..view
    };
    assert!(run(f, &x, 3, &short_packed), "packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(&w.absmax[1..]),
        ..view
    };
    assert!(run(f, &x, 3, &short_scales), "scales");
    let bad_blocksize = Nf4Weight {
        blocksize: 48,
        ..view
    };
    assert!(run(f, &x, 3, &bad_blocksize), "blocksize");
    let empty = Nf4Weight { n: 0, ..view };
    assert!(run(f, &x, 3, &empty), "n = 0");
}

fn gemm_bad_arguments<D: LaunchDevice>(dev: &D) {
    let w = Weight::new(8, 64, 64, 0.05, 1);
    let dw = DeviceWeight::new(dev, &w);
    let x = dev.upload(&vec![bf16::ZERO; 3 * 64]).unwrap();
    let run = |op: GemmOp, a: D::View<'_, bf16>, m: usize, view: Nf4Weight<'_, D>| {
        is_invalid(nf4_gemm::<D, f32>(dev, op, &a, m, &view))
    };
    let f = GemmOp::Forward;
    let x_all = || all(dev, &x);
    let view = || dw.view(dev, false);
    assert!(!run(f, x_all(), 3, view()), "valid");
    let dy = dev.slice(&x, 0..3 * 8).unwrap();
    assert!(!run(GemmOp::InputGrad, dy, 3, view()), "valid dx");
    assert!(run(f, dev.slice(&x, 0..0).unwrap(), 0, view()), "m = 0");
    assert!(
        run(f, dev.slice(&x, 1..3 * 64).unwrap(), 3, view()),
        "short x"
    );
    // dy is [m, n]: x's [m, k] length is wrong for the input gradient.
    assert!(run(GemmOp::InputGrad, x_all(), 3, view()), "dy length");
    let short_packed = Nf4Weight {
        packed: dev.slice(&dw.packed, 1..w.packed.len()).unwrap(),
        ..view()
    };
    assert!(run(f, x_all(), 3, short_packed), "packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(dev.slice(&dw.absmax, 1..w.absmax.len()).unwrap()),
        ..view()
    };
    assert!(run(f, x_all(), 3, short_scales), "scales");
    let short_code = Nf4Weight {
        code: dev.slice(&dw.code, 0..15).unwrap(),
        ..view()
    };
    assert!(run(f, x_all(), 3, short_code), "code");
    let bad_blocksize = Nf4Weight {
        blocksize: 48,
        ..view()
    };
    assert!(run(f, x_all(), 3, bad_blocksize), "blocksize");
    let empty = Nf4Weight { n: 0, ..view() };
    assert!(run(f, x_all(), 3, empty), "n = 0");
    let bad_nested = Nf4Weight {
        scales: dw.double_scales(dev, 3),
        ..view()
    };
    assert!(run(f, x_all(), 3, bad_nested), "nested blocksize");
    let mut short_out = dev.zeros::<f32>(3 * 8 - 1).unwrap();
    assert!(
        is_invalid(nf4_gemm_into(dev, f, &x, 3, &view(), &mut short_out)),
        "short output"
    );
    assert!(
        is_invalid(nf4_gemm::<D, half::f16>(dev, f, &x, 3, &view())),
        "f16 output"
    );
}
qlora::device_test!(gemm_rejects_invalid_arguments, gemm_bad_arguments);

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4_gemm::{Nf4Matmul, Nf4MatmulPath, Nf4MatmulPlan};
    use qlora::kernels::nf4_gemv::nf4_gemv_ref;

    /// Every path of the dispatcher that can run the shape, against the reference.
    fn cuda_parity<T: Element>(
        dev: &CudaDevice,
        mm: &mut Nf4Matmul,
        op: GemmOp,
        w: &Weight,
        m: usize,
        double: bool,
    ) {
        let s = dev.stream();
        let a = activations(op, m, w, 3);
        let want = nf4_gemm_ref(op, &a, m, &w.host(double)).unwrap();
        let dw = DeviceWeight::new(dev, w);
        let d_a = s.clone_htod(&a).unwrap();
        let out_len = want.len();
        let what = format!("cuda {op:?} m={m} n={} k={} double={double}", w.n, w.k);
        // The GEMV multiplies unrounded f32 weights: its own reference and tolerance.
        let reference = |path: Nf4MatmulPath| {
            if path == Nf4MatmulPath::Gemv {
                let gemv = nf4_gemv_ref::<bf16, T>(&a, m, &w.host(double), None).unwrap();
                (Op::Nf4Gemv, gemv)
            } else {
                (Op::Nf4Gemm, want.clone())
            }
        };
        for path in [
            Nf4MatmulPath::Gemv,
            Nf4MatmulPath::TensorCore,
            Nf4MatmulPath::DequantCublas,
        ] {
            if path.supports(op, m) {
                let mut out = s.alloc_zeros::<T>(out_len).unwrap();
                mm.run_path(dev, path, op, &d_a, m, &dw.view(dev, double), &mut out)
                    .unwrap();
                let (tol, want) = reference(path);
                check_op(
                    tol,
                    &format!("{what} {path:?}"),
                    &s.clone_dtoh(&out).unwrap(),
                    &want,
                );
            }
        }
        let mut out = s.alloc_zeros::<T>(out_len).unwrap();
        mm.run(dev, op, &d_a, m, &dw.view(dev, double), &mut out)
            .unwrap();
        let (tol, want) = reference(mm.plan.choose_path(op, m, w.n, w.k));
        check_op(
            tol,
            &format!("{what} planned"),
            &s.clone_dtoh(&out).unwrap(),
            &want,
        );
    }

    #[test]
    fn cuda_matmul_paths_match_reference_on_odd_shapes() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let mut mm = Nf4Matmul::new(&dev, Nf4MatmulPlan::default()).unwrap();
        for (i, &(n, k)) in SHAPES.iter().enumerate() {
            let w = Weight::new(n, k, 64, 0.05, i as u64);
            for &m in MS.iter().chain(&[130]) {
                for op in [GemmOp::Forward, GemmOp::InputGrad] {
                    for double in [false, true] {
                        cuda_parity::<f32>(&dev, &mut mm, op, &w, m, double);
                        cuda_parity::<bf16>(&dev, &mut mm, op, &w, m, !double);
                    }
                }
            }
        }
    }

    #[test]
    fn cuda_gemm_matches_reference_at_a_llama_sized_weight() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let mut mm = Nf4Matmul::new(&dev, Nf4MatmulPlan::default()).unwrap();
        // Llama-2-13B q_proj width with 300 tokens: many k-steps, partial row tiles.
        let w = Weight::new(640, 5120, 64, 0.05, 42);
        parity::<CudaDevice, bf16>(
            &dev,
            GemmOp::Forward,
            &w,
            300,
            true,
            &activations(GemmOp::Forward, 300, &w, 3),
        );
        parity::<CudaDevice, f32>(
            &dev,
            GemmOp::InputGrad,
            &w,
            300,
            true,
            &activations(GemmOp::InputGrad, 300, &w, 3),
        );
        cuda_parity::<bf16>(&dev, &mut mm, GemmOp::Forward, &w, 300, true);
        cuda_parity::<f32>(&dev, &mut mm, GemmOp::InputGrad, &w, 300, true);
    }
}
