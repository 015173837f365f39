//! Parity of the NF4 tensor-core GEMM in kernels/nf4_gemm.cu, forward (y = x·Wᵀ) and input
//! gradient (dx = dy·W): the Rust reference ≡ the same CUDA source run through the CPU emulation ≡
//! CUDA (tensor-core kernel, dequantize + cuBLAS, and the dispatcher) when a GPU is present, on
//! M, N, K that are not multiples of the 128 × 128 × 32 tiles, K not a multiple of the quantization
//! block (blocks straddling rows) or of 16 (the per-element weight path), f32 and double-quantized
//! scales, bf16 and f32 output; and the reference against an independent dense bf16 matmul.

use candle_core::{Device, Tensor};
use half::bf16;
use qlora::kernels::launch::Element;
use qlora::kernels::nf4::{dequantize_emulated, Scales};
use qlora::kernels::nf4_gemm::{
    dequantize_weight_bf16, fast_path, nf4_gemm_emulated, nf4_gemm_ref, GemmOp, GemmShape,
};
use qlora::kernels::nf4_gemv::Nf4Weight;
use qlora::quant::nf4::{double_quantize, quantize_nf4, DoubleQuant, NF4_CODE};
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

/// (N, K): K = 64 (the fast kernels, one block per row); K = 160 (fast kernels, blocks of 64
/// straddling rows); K = 200 (K % 16 = 8: the general kernels; two output tiles of dx and two of y
/// at N = 136); N = 37, K = 33 (rows starting mid-byte, reductions of odd length: general).
const SHAPES: &[(usize, usize)] = &[(8, 64), (72, 160), (136, 200), (37, 33)];
const MS: &[usize] = &[1, 17, 70];

fn dtype<T: Element>() -> Dtype {
    match T::DTYPE as i32 {
        0 => Dtype::F32,
        1 => Dtype::BF16,
        _ => Dtype::F16,
    }
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// A quantized `[n, k]` weight with both kinds of scales.
struct Weight {
    n: usize,
    k: usize,
    blocksize: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dq: DoubleQuant,
}

impl Weight {
    fn new(n: usize, k: usize, blocksize: usize, seed: u64) -> Self {
        let w = normal_vector(n * k, 0.05, seed);
        let (packed, absmax) = quantize_nf4(&w, blocksize).unwrap();
        let dq = double_quantize(&absmax, 256).unwrap();
        Weight {
            n,
            k,
            blocksize,
            packed,
            absmax,
            dq,
        }
    }

    fn scales(&self, double: bool) -> Scales<'_> {
        if double {
            Scales::Double {
                absmax_q: &self.dq.absmax_q,
                nested_absmax: &self.dq.nested_absmax,
                nested_code: &self.dq.nested_code,
                offset: self.dq.offset,
                nested_blocksize: self.dq.nested_blocksize,
            }
        } else {
            Scales::F32(&self.absmax)
        }
    }

    fn view(&self, double: bool) -> Nf4Weight<'_> {
        Nf4Weight {
            packed: &self.packed,
            scales: self.scales(double),
            n: self.n,
            k: self.k,
            blocksize: self.blocksize,
            code: &NF4_CODE,
        }
    }
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

fn parity<T: Element>(op: GemmOp, w: &Weight, m: usize, double: bool, a: &[bf16]) {
    let view = w.view(double);
    let want = nf4_gemm_ref(op, a, m, &view).unwrap();
    let got = nf4_gemm_emulated::<T>(op, a, m, &view).unwrap();
    let what = format!(
        "{op:?} m={m} n={} k={} bs={} double={double}",
        w.n, w.k, w.blocksize
    );
    check(&what, &got, &want);
}

#[test]
fn emulated_gemm_matches_reference_on_odd_shapes() {
    for (i, &(n, k)) in SHAPES.iter().enumerate() {
        let w = Weight::new(n, k, 64, i as u64);
        for (j, &m) in MS.iter().enumerate() {
            for op in [GemmOp::Forward, GemmOp::InputGrad] {
                let a = activations(op, m, &w, 10 + (i * 3 + j) as u64);
                // The first two shapes must reach the fast kernels (malloc's 16-byte alignment).
                let shape = GemmShape::new(op, m, n, k, 64).unwrap();
                let fast = fast_path(&shape, a.as_ptr() as u64, w.packed.as_ptr() as u64);
                assert_eq!(fast, i < 2, "{op:?} n={n} k={k}: fast kernels {fast}");
                // Every (scales, output dtype) pair across the M values of a shape and op.
                let double = (i + j) % 2 == 0;
                if j % 2 == 0 {
                    parity::<f32>(op, &w, m, double, &a);
                } else {
                    parity::<bf16>(op, &w, m, double, &a);
                }
            }
        }
    }
}

#[test]
fn emulated_gemm_covers_row_tiles_and_rasterization_groups() {
    // m = 130: a second block row holding two rows, both kernels, both output dtypes.
    let w = Weight::new(24, 48, 64, 3);
    for op in [GemmOp::Forward, GemmOp::InputGrad] {
        let a = activations(op, 130, &w, 4);
        parity::<bf16>(op, &w, 130, true, &a);
        parity::<f32>(op, &w, 130, false, &a);
    }
    // m = 1030: nine row tiles by two column tiles, so the blocks are remapped across a full
    // group of eight row tiles and a partial one.
    let w = Weight::new(136, 64, 64, 8);
    let x = activations(GemmOp::Forward, 1030, &w, 9);
    parity::<bf16>(GemmOp::Forward, &w, 1030, true, &x);
    let w = Weight::new(64, 144, 64, 9);
    let dy = activations(GemmOp::InputGrad, 1030, &w, 10);
    parity::<f32>(GemmOp::InputGrad, &w, 1030, false, &dy);
}

#[test]
fn emulated_gemm_matches_reference_for_blocksizes() {
    // K = 96 with blocks of 32 (three per row), 128 (straddling rows) and 256 (several rows per
    // block, and the fast path's 16-code chunks); K = 40 (per-element path) with blocks of 128.
    for (bs, k) in [(32, 96), (128, 96), (256, 96), (128, 40)] {
        let w = Weight::new(20, k, bs, bs as u64);
        for (i, op) in [GemmOp::Forward, GemmOp::InputGrad].into_iter().enumerate() {
            let a = activations(op, 5, &w, 7 + i as u64);
            parity::<bf16>(op, &w, 5, true, &a);
            parity::<f32>(op, &w, 5, false, &a);
        }
    }
}

#[test]
fn emulated_gemm_takes_the_general_kernels_on_misaligned_inputs() {
    // Three reduction steps in both kernels, so a step's activation stores meet the previous
    // step's reads of the same buffer (the race detector checks the barrier between them).
    let w = Weight::new(72, 96, 64, 5);
    for op in [GemmOp::Forward, GemmOp::InputGrad] {
        // Activations one element into a buffer: rows are no longer 16-byte aligned.
        let a = activations(op, 3, &w, 6);
        let mut shifted = vec![bf16::ZERO; a.len() + 1];
        shifted[1..].copy_from_slice(&a);
        parity::<f32>(op, &w, 3, true, &shifted[1..]);
        // Codes one byte into a buffer.
        let mut packed = vec![0u8; w.packed.len() + 1];
        packed[1..].copy_from_slice(&w.packed);
        let view = Nf4Weight {
            packed: &packed[1..],
            ..w.view(false)
        };
        let want = nf4_gemm_ref(op, &a, 3, &view).unwrap();
        let got = nf4_gemm_emulated::<bf16>(op, &a, 3, &view).unwrap();
        check(&format!("{op:?} misaligned codes"), &got, &want);
    }
}

#[test]
fn reference_equals_dense_bf16_matmul_of_the_dequantized_weight() {
    let (m, n, k) = (9, 40, 136);
    let w = Weight::new(n, k, 64, 11);
    for double in [false, true] {
        let view = w.view(double);
        // The bf16 weight every path multiplies is what k_nf4_dequantize writes (what the
        // dequantize + cuBLAS path feeds cuBLAS), bit for bit.
        let dense = dequantize_weight_bf16(&view).unwrap();
        let kernel: Vec<bf16> =
            dequantize_emulated(&w.packed, view.scales, n * k, 64, &NF4_CODE).unwrap();
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
fn gemm_rejects_invalid_arguments() {
    let w = Weight::new(8, 64, 64, 1);
    let view = w.view(false);
    let x = vec![bf16::ZERO; 3 * 64];
    let run = |op: GemmOp, a: &[bf16], m: usize, view: &Nf4Weight<'_>| {
        (
            is_invalid(nf4_gemm_ref(op, a, m, view)),
            is_invalid(nf4_gemm_emulated::<f32>(op, a, m, view)),
        )
    };
    let f = GemmOp::Forward;
    assert_eq!(run(f, &x, 3, &view), (false, false), "valid");
    assert_eq!(
        run(GemmOp::InputGrad, &x[..3 * 8], 3, &view),
        (false, false),
        "valid dx"
    );
    assert_eq!(run(f, &[], 0, &view), (true, true), "m = 0");
    assert_eq!(run(f, &x[1..], 3, &view), (true, true), "short x");
    // dy is [m, n]: x's [m, k] length is wrong for the input gradient.
    assert_eq!(
        run(GemmOp::InputGrad, &x, 3, &view),
        (true, true),
        "dy length"
    );
    let short_packed = Nf4Weight {
        packed: &w.packed[1..],
        ..view
    };
    assert_eq!(run(f, &x, 3, &short_packed), (true, true), "packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(&w.absmax[1..]),
        ..view
    };
    assert_eq!(run(f, &x, 3, &short_scales), (true, true), "scales");
    let bad_blocksize = Nf4Weight {
        blocksize: 48,
        ..view
    };
    assert_eq!(run(f, &x, 3, &bad_blocksize), (true, true), "blocksize");
    let empty = Nf4Weight { n: 0, ..view };
    assert_eq!(run(f, &x, 3, &empty), (true, true), "n = 0");
    let bad_nested = Nf4Weight {
        scales: Scales::Double {
            absmax_q: &w.dq.absmax_q,
            nested_absmax: &w.dq.nested_absmax,
            nested_code: &w.dq.nested_code,
            offset: w.dq.offset,
            nested_blocksize: 3,
        },
        ..view
    };
    assert!(
        is_invalid(nf4_gemm_emulated::<f32>(f, &x, 3, &bad_nested)),
        "nested blocksize"
    );
    assert!(
        is_invalid(nf4_gemm_emulated::<half::f16>(f, &x, 3, &view)),
        "f16 output"
    );
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cudarc::driver::CudaSlice;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4::DeviceScales;
    use qlora::kernels::nf4_gemm::{nf4_gemm_cuda_into, Nf4Matmul, Nf4MatmulPath, Nf4MatmulPlan};
    use qlora::kernels::nf4_gemv::{nf4_gemv_ref, DeviceNf4Weight};

    /// A weight's buffers on the device.
    struct DeviceWeight {
        packed: CudaSlice<u8>,
        code: CudaSlice<f32>,
        absmax: CudaSlice<f32>,
        q: CudaSlice<u8>,
        na: CudaSlice<f32>,
        nc: CudaSlice<f32>,
        offset: f32,
        nested_blocksize: usize,
        n: usize,
        k: usize,
        blocksize: usize,
    }

    impl DeviceWeight {
        fn new(dev: &CudaDevice, w: &Weight) -> Self {
            let s = dev.stream();
            DeviceWeight {
                packed: s.clone_htod(&w.packed).unwrap(),
                code: s.clone_htod(&NF4_CODE).unwrap(),
                absmax: s.clone_htod(&w.absmax).unwrap(),
                q: s.clone_htod(&w.dq.absmax_q).unwrap(),
                na: s.clone_htod(&w.dq.nested_absmax).unwrap(),
                nc: s.clone_htod(&w.dq.nested_code).unwrap(),
                offset: w.dq.offset,
                nested_blocksize: w.dq.nested_blocksize,
                n: w.n,
                k: w.k,
                blocksize: w.blocksize,
            }
        }

        fn view(&self, double: bool) -> DeviceNf4Weight<'_> {
            let scales = if double {
                DeviceScales::Double {
                    absmax_q: &self.q,
                    nested_absmax: &self.na,
                    nested_code: &self.nc,
                    offset: self.offset,
                    nested_blocksize: self.nested_blocksize,
                }
            } else {
                DeviceScales::F32(&self.absmax)
            };
            DeviceNf4Weight {
                packed: &self.packed,
                scales,
                n: self.n,
                k: self.k,
                blocksize: self.blocksize,
                code: &self.code,
            }
        }
    }

    /// Every path that can run the shape, against the reference.
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
        let want = nf4_gemm_ref(op, &a, m, &w.view(double)).unwrap();
        let dw = DeviceWeight::new(dev, w);
        let d_a = s.clone_htod(&a).unwrap();
        let out_len = want.len();
        let mut out = s.alloc_zeros::<T>(out_len).unwrap();
        nf4_gemm_cuda_into(dev, op, &d_a, m, &dw.view(double), &mut out).unwrap();
        let what = format!("cuda {op:?} m={m} n={} k={} double={double}", w.n, w.k);
        check(&what, &s.clone_dtoh(&out).unwrap(), &want);
        // The GEMV multiplies unrounded f32 weights: its own reference and tolerance.
        let reference = |path: Nf4MatmulPath| {
            if path == Nf4MatmulPath::Gemv {
                let gemv = nf4_gemv_ref::<bf16, T>(&a, m, &w.view(double), None).unwrap();
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
                mm.run_path(dev, path, op, &d_a, m, &dw.view(double), &mut out)
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
        mm.run(dev, op, &d_a, m, &dw.view(double), &mut out)
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
    fn cuda_gemm_matches_reference_on_odd_shapes() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let mut mm = Nf4Matmul::new(&dev, Nf4MatmulPlan::default()).unwrap();
        for (i, &(n, k)) in SHAPES.iter().enumerate() {
            let w = Weight::new(n, k, 64, i as u64);
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
        let w = Weight::new(640, 5120, 64, 42);
        cuda_parity::<bf16>(&dev, &mut mm, GemmOp::Forward, &w, 300, true);
        cuda_parity::<f32>(&dev, &mut mm, GemmOp::InputGrad, &w, 300, true);
    }
}
