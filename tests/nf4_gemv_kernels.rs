//! Parity of the NF4 GEMV in kernels/nf4_gemv.cu: the Rust reference (dequantize with
//! `quant::nf4`, f32 matmul) ≡ the same CUDA source run through the CPU emulation ≡ CUDA when a
//! GPU is present, for M ∈ {1, 3, 16}, odd N, K not a multiple of the quantization block (blocks
//! straddling rows), f32 and double-quantized scales, bf16 and f32 x / y, with and without bias.

mod common;

use common::nf4_weight::{all, DeviceWeight, Weight};
use half::bf16;
use qlora::kernels::device::{Emulator, LaunchDevice};
use qlora::kernels::launch::Element;
use qlora::kernels::nf4::{Nf4Weight, Scales};
use qlora::kernels::nf4_gemv::{nf4_gemv, nf4_gemv_into, nf4_gemv_ref, MAX_M};
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Op};
use qlora::Error;

/// (N, K): one row, K % 64 != 0 with K % 32 == 0 (vector path, blocks straddling rows), K % 32 != 0
/// (per-element path), and a K of 65 blocks.
const SHAPES: &[(usize, usize)] = &[(1, 64), (7, 96), (37, 200), (64, 4160)];
const MS: &[usize] = &[1, 3, 16];

use qlora::kernels::launch::tolerance_dtype as dtype;

fn cast<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// `got` (in T) against the f32 reference rounded once to T.
fn check<T: Element>(what: &str, got: &[T], want: &[f32]) {
    let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = want.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    if let Err(e) = lookup(Op::Nf4Gemv, dtype::<T>()).check(&got, &want) {
        panic!("{what} {:?}: {e}", dtype::<T>());
    }
}

fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// The kernel on `dev` (into a new buffer, and into a caller-owned one: the same bits) against
/// the reference.
fn parity<D: LaunchDevice, T: Element>(
    dev: &D,
    w: &Weight,
    m: usize,
    double: bool,
    with_bias: bool,
    x: &[T],
) {
    let bias: Vec<T> = cast(&normal_vector(w.n, 0.5, 99));
    let bias = with_bias.then_some(&bias[..]);
    let want = nf4_gemv_ref(x, m, &w.host(double), bias).unwrap();
    let dw = DeviceWeight::new(dev, w);
    let view = dw.view(dev, double);
    let d_x = dev.upload(x).unwrap();
    let d_b = bias.map(|b| dev.upload(b).unwrap());
    let y = nf4_gemv::<D, T, T, D::Buffer<T>>(dev, &d_x, m, &view, d_b.as_ref()).unwrap();
    let got = dev.download(&y).unwrap();
    let what = format!(
        "{} m={m} n={} k={} bs={} double={double} bias={with_bias}",
        dev.label(),
        w.n,
        w.k,
        w.blocksize
    );
    check(&what, &got, &want);
    let mut y2 = dev.zeros::<T>(m * w.n).unwrap();
    nf4_gemv_into(dev, &d_x, m, &view, d_b.as_ref(), &mut y2).unwrap();
    assert_eq!(bits(&dev.download(&y2).unwrap()), bits(&got), "{what} into");
}

fn gemv_odd_shapes<D: LaunchDevice>(dev: &D) {
    for (i, &(n, k)) in SHAPES.iter().enumerate() {
        let w = Weight::new(n, k, 64, 0.02, i as u64);
        for &m in MS {
            let x = normal_vector(m * k, 1.0, 10 + i as u64);
            // Every (scales, dtype, bias) combination across the M values of a shape.
            for (j, double) in [false, true].into_iter().enumerate() {
                let bias = (m + j) % 2 == 0;
                parity::<D, f32>(dev, &w, m, double, bias, &x);
                parity::<D, bf16>(dev, &w, m, double, !bias, &cast(&x));
            }
        }
    }
}
qlora::device_test!(gemv_matches_reference_on_odd_shapes, gemv_odd_shapes);

fn gemv_blocksizes<D: LaunchDevice>(dev: &D) {
    // K = 160 is a multiple of 32 but of no larger block, so most blocks straddle rows; K = 33
    // starts every other row in the low nibble of a byte.
    for &bs in qlora::quant::nf4::SUPPORTED_BLOCKSIZES {
        for &(n, k) in &[(9, 160), (5, 33)] {
            let w = Weight::new(n, k, bs, 0.02, bs as u64);
            let x = normal_vector(2 * k, 1.0, 7);
            parity::<D, bf16>(dev, &w, 2, true, true, &cast(&x));
            parity::<D, f32>(dev, &w, 2, false, false, &x);
        }
    }
}
qlora::device_test!(gemv_matches_reference_for_every_blocksize, gemv_blocksizes);

fn gemv_misaligned<D: LaunchDevice>(dev: &D) {
    let (n, k, m) = (7, 96, 3);
    let w = Weight::new(n, k, 64, 0.02, 5);
    let x: Vec<bf16> = cast(&normal_vector(m * k + 1, 1.0, 6));
    let bias: Vec<bf16> = cast(&normal_vector(n, 0.5, 99));
    let want = nf4_gemv_ref(&x[1..], m, &w.host(false), Some(&bias[..])).unwrap();
    let dw = DeviceWeight::new(dev, &w);
    // One element into a buffer: x's rows are no longer 16-byte aligned.
    let d_x = dev.upload(&x).unwrap();
    let x_view = dev.slice(&d_x, 1..x.len()).unwrap();
    let d_b = dev.upload(&bias).unwrap();
    let y =
        nf4_gemv::<D, bf16, bf16, _>(dev, &x_view, m, &dw.view(dev, false), Some(&d_b)).unwrap();
    check("misaligned x", &dev.download(&y).unwrap(), &want);
    // One byte into a buffer misaligns the codes themselves.
    let mut packed = vec![0u8; w.packed.len() + 1];
    packed[1..].copy_from_slice(&w.packed);
    let d_packed = dev.upload(&packed).unwrap();
    let view = Nf4Weight {
        packed: dev.slice(&d_packed, 1..packed.len()).unwrap(),
        ..dw.view(dev, true)
    };
    let want = nf4_gemv_ref::<bf16, f32>(&x[1..], m, &w.host(true), None).unwrap();
    let y = nf4_gemv::<D, bf16, f32, D::Buffer<f32>>(dev, &x_view, m, &view, None).unwrap();
    check("misaligned codes", &dev.download(&y).unwrap(), &want);
}
qlora::device_test!(
    gemv_takes_the_scalar_path_on_misaligned_inputs,
    gemv_misaligned
);

fn is_invalid<T>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn reference_rejects_invalid_arguments() {
    let w = Weight::new(7, 96, 64, 0.02, 1);
    let view = w.host(false);
    let x = vec![0f32; 3 * 96];
    let bias = vec![0f32; 7];
    let run = |x: &[f32], m: usize, view: &Nf4Weight<'_, Emulator>, bias: Option<&[f32]>| {
        is_invalid(nf4_gemv_ref(x, m, view, bias))
    };
    let big = vec![0f32; (MAX_M + 1) * 96];
    assert!(run(&big, MAX_M + 1, &view, None), "m > 16");
    assert!(run(&[], 0, &view, None), "m = 0");
    assert!(run(&x[1..], 3, &view, None), "short x");
    assert!(run(&x, 3, &view, Some(&bias[1..])), "short bias");
    let short_packed = Nf4Weight {
        packed: &w.packed[1..],
        ..view
    };
    assert!(run(&x, 3, &short_packed, None), "packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(&w.absmax[1..]),
        ..view
    };
    assert!(run(&x, 3, &short_scales, None), "scales");
    let bad_blocksize = Nf4Weight {
        blocksize: 48,
        ..view
    };
    assert!(run(&x, 3, &bad_blocksize, None), "blocksize");
    let empty = Nf4Weight { n: 0, ..view };
    assert!(run(&x, 3, &empty, None), "n = 0");
    assert!(!run(&x, 3, &view, Some(&bias)), "valid");
}

fn gemv_bad_arguments<D: LaunchDevice>(dev: &D) {
    let w = Weight::new(7, 96, 64, 0.02, 1);
    let dw = DeviceWeight::new(dev, &w);
    let x = dev.upload(&vec![0f32; 3 * 96]).unwrap();
    let bias = dev.upload(&[0f32; 7]).unwrap();
    let run = |x: &D::View<'_, f32>,
               m: usize,
               view: &Nf4Weight<'_, D>,
               bias: Option<&D::View<'_, f32>>| {
        is_invalid(nf4_gemv::<D, f32, f32, _>(dev, x, m, view, bias))
    };
    let x_all = all(dev, &x);
    let big = dev.zeros::<f32>((MAX_M + 1) * 96).unwrap();
    assert!(
        run(&all(dev, &big), MAX_M + 1, &dw.view(dev, false), None),
        "m > 16"
    );
    let none = dev.slice(&x, 0..0).unwrap();
    assert!(run(&none, 0, &dw.view(dev, false), None), "m = 0");
    let short_x = dev.slice(&x, 1..3 * 96).unwrap();
    assert!(run(&short_x, 3, &dw.view(dev, false), None), "short x");
    let short_bias = dev.slice(&bias, 1..7).unwrap();
    assert!(
        run(&x_all, 3, &dw.view(dev, false), Some(&short_bias)),
        "short bias"
    );
    let short_packed = Nf4Weight {
        packed: dev.slice(&dw.packed, 1..w.packed.len()).unwrap(),
        ..dw.view(dev, false)
    };
    assert!(run(&x_all, 3, &short_packed, None), "packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(dev.slice(&dw.absmax, 1..w.absmax.len()).unwrap()),
        ..dw.view(dev, false)
    };
    assert!(run(&x_all, 3, &short_scales, None), "scales");
    let short_code = Nf4Weight {
        code: dev.slice(&dw.code, 0..15).unwrap(),
        ..dw.view(dev, false)
    };
    assert!(run(&x_all, 3, &short_code, None), "code");
    let bad_blocksize = Nf4Weight {
        blocksize: 48,
        ..dw.view(dev, false)
    };
    assert!(run(&x_all, 3, &bad_blocksize, None), "blocksize");
    let empty = Nf4Weight {
        n: 0,
        ..dw.view(dev, false)
    };
    assert!(run(&x_all, 3, &empty, None), "n = 0");
    let bad_nested = Nf4Weight {
        scales: dw.double_scales(dev, 3),
        ..dw.view(dev, true)
    };
    assert!(run(&x_all, 3, &bad_nested, None), "nested blocksize");
    let mut short_y = dev.zeros::<f32>(3 * 7 - 1).unwrap();
    assert!(
        is_invalid(nf4_gemv_into::<D, f32, f32, D::Buffer<f32>>(
            dev,
            &x,
            3,
            &dw.view(dev, false),
            None,
            &mut short_y
        )),
        "short y"
    );
    let f16x = dev.upload(&vec![half::f16::ZERO; 3 * 96]).unwrap();
    assert!(is_invalid(nf4_gemv::<D, _, f32, D::Buffer<f32>>(
        dev,
        &f16x,
        3,
        &dw.view(dev, false),
        None
    )));
    assert!(is_invalid(nf4_gemv::<
        D,
        f32,
        half::f16,
        D::Buffer<half::f16>,
    >(dev, &x, 3, &dw.view(dev, false), None)));
    assert!(
        !run(&x_all, 3, &dw.view(dev, false), Some(&all(dev, &bias))),
        "valid"
    );
}
qlora::device_test!(gemv_rejects_invalid_arguments, gemv_bad_arguments);

/// A Llama-2-13B gate projection: too large for the emulation, so on the GPU only.
#[cfg(feature = "cuda")]
#[test]
fn cuda_gemv_matches_reference_at_llama_13b_gate_shape() {
    let Some(dev) = qlora::kernels::cuda::CudaDevice::first_available() else {
        return;
    };
    let w = Weight::new(13824, 5120, 64, 0.02, 42);
    let x: Vec<bf16> = cast(&normal_vector(5120, 1.0, 3));
    parity(&dev, &w, 1, true, false, &x);
}

#[test]
fn one_row_of_x_takes_the_decode_kernel_and_more_rows_the_multi_row_one() {
    use qlora::kernels::emu::launches_on_this_thread as launches;
    let w = Weight::new(9, 160, 64, 0.02, 3);
    for (m, decode) in [(1, true), (2, false), (16, false)] {
        let x = normal_vector(m * 160, 1.0, 8);
        let before = (launches("k_nf4_gemv"), launches("k_nf4_gemv_rows"));
        // parity launches the kernel twice (into a new buffer and into a caller-owned one).
        parity::<Emulator, f32>(&Emulator::default(), &w, m, true, false, &x);
        let ran = (
            launches("k_nf4_gemv") - before.0,
            launches("k_nf4_gemv_rows") - before.1,
        );
        assert_eq!(ran, if decode { (2, 0) } else { (0, 2) }, "m = {m}");
    }
}
