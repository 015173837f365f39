//! Parity of the NF4 GEMV in kernels/nf4_gemv.cu: the Rust reference (dequantize with
//! `quant::nf4`, f32 matmul) ≡ the same CUDA source run through the CPU emulation ≡ CUDA when a
//! GPU is present, for M ∈ {1, 3, 16}, odd N, K not a multiple of the quantization block (blocks
//! straddling rows), f32 and double-quantized scales, bf16 and f32 x / y, with and without bias.

use half::bf16;
use qlora::kernels::launch::Element;
use qlora::kernels::nf4::Scales;
use qlora::kernels::nf4_gemv::{nf4_gemv_emulated, nf4_gemv_ref, Nf4Weight, MAX_M};
use qlora::quant::nf4::{double_quantize, quantize_nf4, DoubleQuant, NF4_CODE};
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

/// (N, K): one row, K % 64 != 0 with K % 32 == 0 (vector path, blocks straddling rows), K % 32 != 0
/// (per-element path), and a K of 65 blocks.
const SHAPES: &[(usize, usize)] = &[(1, 64), (7, 96), (37, 200), (64, 4160)];
const MS: &[usize] = &[1, 3, 16];

fn dtype<T: Element>() -> Dtype {
    match T::DTYPE as i32 {
        0 => Dtype::F32,
        1 => Dtype::BF16,
        _ => Dtype::F16,
    }
}

fn cast<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
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
        let w = normal_vector(n * k, 0.02, seed);
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

    fn view(&self, double: bool) -> Nf4Weight<'_> {
        let scales = if double {
            Scales::Double {
                absmax_q: &self.dq.absmax_q,
                nested_absmax: &self.dq.nested_absmax,
                nested_code: &self.dq.nested_code,
                offset: self.dq.offset,
                nested_blocksize: self.dq.nested_blocksize,
            }
        } else {
            Scales::F32(&self.absmax)
        };
        Nf4Weight {
            packed: &self.packed,
            scales,
            n: self.n,
            k: self.k,
            blocksize: self.blocksize,
            code: &NF4_CODE,
        }
    }
}

/// `got` (in T) against the f32 reference rounded once to T.
fn check<T: Element>(what: &str, got: &[T], want: &[f32]) {
    let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = want.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    if let Err(e) = lookup(Op::Nf4Gemv, dtype::<T>()).check(&got, &want) {
        panic!("{what} {:?}: {e}", dtype::<T>());
    }
}

fn parity<T: Element>(w: &Weight, m: usize, double: bool, with_bias: bool, x: &[T]) {
    let bias: Vec<T> = cast(&normal_vector(w.n, 0.5, 99));
    let bias = with_bias.then_some(&bias[..]);
    let view = w.view(double);
    let want = nf4_gemv_ref(x, m, &view, bias).unwrap();
    let got = nf4_gemv_emulated(x, m, &view, bias).unwrap();
    let what = format!(
        "m={m} n={} k={} bs={} double={double} bias={with_bias}",
        w.n, w.k, w.blocksize
    );
    check(&what, &got, &want);
}

#[test]
fn emulated_gemv_matches_reference_on_odd_shapes() {
    for (i, &(n, k)) in SHAPES.iter().enumerate() {
        let w = Weight::new(n, k, 64, i as u64);
        for &m in MS {
            let x = normal_vector(m * k, 1.0, 10 + i as u64);
            // Every (scales, dtype, bias) combination across the M values of a shape.
            for (j, double) in [false, true].into_iter().enumerate() {
                let bias = (m + j) % 2 == 0;
                parity::<f32>(&w, m, double, bias, &x);
                parity::<bf16>(&w, m, double, !bias, &cast(&x));
            }
        }
    }
}

#[test]
fn emulated_gemv_matches_reference_for_every_blocksize() {
    // K = 160 is a multiple of 32 but of no larger block, so most blocks straddle rows; K = 33
    // starts every other row in the low nibble of a byte.
    for &bs in qlora::quant::nf4::SUPPORTED_BLOCKSIZES {
        for &(n, k) in &[(9, 160), (5, 33)] {
            let w = Weight::new(n, k, bs, bs as u64);
            let x = normal_vector(2 * k, 1.0, 7);
            parity::<bf16>(&w, 2, true, true, &cast(&x));
            parity::<f32>(&w, 2, false, false, &x);
        }
    }
}

#[test]
fn emulated_gemv_takes_the_scalar_path_on_misaligned_inputs() {
    let (n, k, m) = (7, 96, 3);
    let w = Weight::new(n, k, 64, 5);
    let x: Vec<bf16> = cast(&normal_vector(m * k + 1, 1.0, 6));
    parity::<bf16>(&w, m, false, true, &x[1..]);
    let mut packed = vec![0u8; w.packed.len() + 1];
    packed[1..].copy_from_slice(&w.packed);
    // A Vec's buffer is aligned; one byte in misaligns the codes themselves.
    let view = Nf4Weight {
        packed: &packed[1..],
        ..w.view(true)
    };
    let x = &x[1..];
    let want = nf4_gemv_ref::<bf16, f32>(x, m, &view, None).unwrap();
    let got = nf4_gemv_emulated::<bf16, f32>(x, m, &view, None).unwrap();
    check("misaligned codes", &got, &want);
}

fn is_invalid<T>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn gemv_rejects_invalid_arguments() {
    let w = Weight::new(7, 96, 64, 1);
    let view = w.view(false);
    let x = vec![0f32; 3 * 96];
    let bias = vec![0f32; 7];
    let run = |x: &[f32], m: usize, view: &Nf4Weight<'_>, bias: Option<&[f32]>| {
        (
            is_invalid(nf4_gemv_ref(x, m, view, bias)),
            is_invalid(nf4_gemv_emulated(x, m, view, bias)),
        )
    };
    let big = vec![0f32; (MAX_M + 1) * 96];
    assert_eq!(run(&big, MAX_M + 1, &view, None), (true, true), "m > 16");
    assert_eq!(run(&[], 0, &view, None), (true, true), "m = 0");
    assert_eq!(run(&x[1..], 3, &view, None), (true, true), "short x");
    assert_eq!(
        run(&x, 3, &view, Some(&bias[1..])),
        (true, true),
        "short bias"
    );
    let short_packed = Nf4Weight {
        packed: &w.packed[1..],
        ..view
    };
    assert_eq!(run(&x, 3, &short_packed, None), (true, true), "packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(&w.absmax[1..]),
        ..view
    };
    assert_eq!(run(&x, 3, &short_scales, None), (true, true), "scales");
    let bad_blocksize = Nf4Weight {
        blocksize: 48,
        ..view
    };
    assert_eq!(run(&x, 3, &bad_blocksize, None), (true, true), "blocksize");
    let empty = Nf4Weight { n: 0, ..view };
    assert_eq!(run(&x, 3, &empty, None), (true, true), "n = 0");
    let f16x = vec![half::f16::ZERO; 3 * 96];
    assert!(is_invalid(nf4_gemv_emulated::<_, f32>(
        &f16x, 3, &view, None
    )));
    assert!(is_invalid(nf4_gemv_emulated::<f32, half::f16>(
        &x, 3, &view, None
    )));
    assert_eq!(run(&x, 3, &view, Some(&bias)), (false, false), "valid");
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4::DeviceScales;
    use qlora::kernels::nf4_gemv::{nf4_gemv_cuda, nf4_gemv_cuda_into, DeviceNf4Weight};

    fn cuda_parity<T: Element>(dev: &CudaDevice, w: &Weight, m: usize, double: bool, bias: bool) {
        let s = dev.stream();
        let x: Vec<T> = cast(&normal_vector(m * w.k, 1.0, 3));
        let b: Vec<T> = cast(&normal_vector(w.n, 0.5, 4));
        let b = bias.then_some(&b[..]);
        let want = nf4_gemv_ref(&x, m, &w.view(double), b).unwrap();
        let d_x = s.clone_htod(&x).unwrap();
        let d_b = b.map(|b| s.clone_htod(b).unwrap());
        let d_packed = s.clone_htod(&w.packed).unwrap();
        let d_code = s.clone_htod(&NF4_CODE).unwrap();
        let d_absmax = s.clone_htod(&w.absmax).unwrap();
        let d_q = s.clone_htod(&w.dq.absmax_q).unwrap();
        let d_na = s.clone_htod(&w.dq.nested_absmax).unwrap();
        let d_nc = s.clone_htod(&w.dq.nested_code).unwrap();
        let scales = if double {
            DeviceScales::Double {
                absmax_q: &d_q,
                nested_absmax: &d_na,
                nested_code: &d_nc,
                offset: w.dq.offset,
                nested_blocksize: w.dq.nested_blocksize,
            }
        } else {
            DeviceScales::F32(&d_absmax)
        };
        let dw = DeviceNf4Weight {
            packed: &d_packed,
            scales,
            n: w.n,
            k: w.k,
            blocksize: w.blocksize,
            code: &d_code,
        };
        let y = nf4_gemv_cuda(dev, &d_x, m, &dw, d_b.as_ref()).unwrap();
        let got = s.clone_dtoh(&y).unwrap();
        let what = format!("cuda m={m} n={} k={} double={double}", w.n, w.k);
        check(&what, &got, &want);
        let mut y2 = s.alloc_zeros::<T>(m * w.n).unwrap();
        nf4_gemv_cuda_into(dev, &d_x, m, &dw, d_b.as_ref(), &mut y2).unwrap();
        assert_eq!(
            s.clone_dtoh(&y2)
                .unwrap()
                .iter()
                .map(|v| v.to_f32().to_bits())
                .collect::<Vec<_>>(),
            got.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn cuda_gemv_matches_reference() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        for (i, &(n, k)) in SHAPES.iter().enumerate() {
            let w = Weight::new(n, k, 64, i as u64);
            for &m in MS {
                for double in [false, true] {
                    cuda_parity::<f32>(&dev, &w, m, double, m % 2 == 1);
                    cuda_parity::<bf16>(&dev, &w, m, double, m % 2 == 0);
                }
            }
        }
    }

    #[test]
    fn cuda_gemv_matches_reference_at_llama_13b_gate_shape() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let w = Weight::new(13824, 5120, 64, 42);
        cuda_parity::<bf16>(&dev, &w, 1, true, false);
    }
}

#[test]
fn one_row_of_x_takes_the_decode_kernel_and_more_rows_the_multi_row_one() {
    use qlora::kernels::emu::launches_on_this_thread as launches;
    let w = Weight::new(9, 160, 64, 3);
    for (m, decode) in [(1, true), (2, false), (16, false)] {
        let x = normal_vector(m * 160, 1.0, 8);
        let before = (launches("k_nf4_gemv"), launches("k_nf4_gemv_rows"));
        parity::<f32>(&w, m, true, false, &x);
        let ran = (
            launches("k_nf4_gemv") - before.0,
            launches("k_nf4_gemv_rows") - before.1,
        );
        assert_eq!(ran, if decode { (1, 0) } else { (0, 1) }, "m = {m}");
    }
}
