//! Parity of the NF4 kernels in kernels/nf4.cu: the Rust reference (`quant::nf4`) ≡ the same CUDA
//! source run through the CPU emulation ≡ CUDA when a GPU is present, on odd sizes, every input
//! dtype, every output dtype, f32 and double-quantized scales.

mod common;

use common::{assert_same_bits, fixture_bytes, Fixtures};
use half::{bf16, f16};
use qlora::kernels::device::LaunchDevice;
use qlora::kernels::launch::Element;
use qlora::kernels::nf4::{dequantize_emulated, quantize, Scales};
use qlora::quant::dynamic8::dynamic_map_signed;
use qlora::quant::nf4::{
    dequantize_absmax, dequantize_nf4, double_quantize, quantize_nf4, NF4_CODE,
};
use qlora::testing::quantizer_stress_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

/// Sizes that are not multiples of the quantization block, of a byte, or of a thread's 8 elements.
const SIZES: &[usize] = &[1, 2, 7, 63, 64, 65, 127, 1000, 4097, 64 * 256 + 37];
const BLOCKSIZES: &[usize] = &[64, 128, 256, 4096];

fn as_dtype<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn check_quantize<D: LaunchDevice, T: Element>(dev: &D, n: usize, blocksize: usize, seed: u64) {
    let input: Vec<T> = as_dtype(&quantizer_stress_vector(n, seed));
    let widened: Vec<f32> = input.iter().map(|x| x.to_f32()).collect();
    let (want_packed, want_absmax) = quantize_nf4(&widened, blocksize).unwrap();
    let d_in = dev.upload(&input).unwrap();
    let d_code = dev.upload(&NF4_CODE).unwrap();
    let (d_packed, d_absmax) = quantize(dev, &d_in, blocksize, &d_code).unwrap();
    let (packed, absmax) = (
        dev.download(&d_packed).unwrap(),
        dev.download(&d_absmax).unwrap(),
    );
    assert_eq!(absmax.len(), want_absmax.len());
    for (b, (g, w)) in absmax.iter().zip(&want_absmax).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "n={n} bs={blocksize} absmax[{b}]: {g} vs {w}"
        );
    }
    if let Some(i) = packed.iter().zip(&want_packed).position(|(a, b)| a != b) {
        panic!(
            "n={n} bs={blocksize} {:?}: byte {i} is {:#04x}, reference {:#04x}",
            T::DTYPE,
            packed[i],
            want_packed[i]
        );
    }
    assert_eq!(packed.len(), want_packed.len());
}

fn quantize_every_size_and_dtype<D: LaunchDevice>(dev: &D) {
    for (i, &n) in SIZES.iter().enumerate() {
        for &bs in BLOCKSIZES {
            check_quantize::<D, f32>(dev, n, bs, i as u64);
            check_quantize::<D, bf16>(dev, n, bs, 100 + i as u64);
            check_quantize::<D, f16>(dev, n, bs, 200 + i as u64);
        }
    }
}
qlora::device_test!(
    quantize_matches_reference_bytes_for_every_input_dtype,
    quantize_every_size_and_dtype
);

fn check_dequantize<T: Element>(n: usize, blocksize: usize, double: bool, dtype: Dtype) {
    let input = quantizer_stress_vector(n, n as u64 + 7);
    let (packed, absmax) = quantize_nf4(&input, blocksize).unwrap();
    let nested_code = dynamic_map_signed();
    let dq = double_quantize(&absmax, 256).unwrap();
    let (scales, ref_absmax) = if double {
        let s = Scales::Double {
            absmax_q: &dq.absmax_q,
            nested_absmax: &dq.nested_absmax,
            nested_code: &nested_code,
            offset: dq.offset,
            nested_blocksize: dq.nested_blocksize,
        };
        (s, dequantize_absmax(&dq))
    } else {
        (Scales::F32(&absmax), absmax.clone())
    };
    let want = dequantize_nf4(&packed, &ref_absmax, n, blocksize, &NF4_CODE).unwrap();
    let want: Vec<f32> = want.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    let got: Vec<T> = dequantize_emulated(&packed, scales, n, blocksize, &NF4_CODE).unwrap();
    let got: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
    if let Err(e) = lookup(Op::Dequantize, dtype).check(&got, &want) {
        panic!("n={n} bs={blocksize} double={double} {dtype:?}: {e}");
    }
}

#[test]
fn emulated_dequantize_matches_reference_bits_for_every_output_dtype() {
    for &n in SIZES {
        for &bs in BLOCKSIZES {
            for double in [false, true] {
                check_dequantize::<f32>(n, bs, double, Dtype::F32);
                check_dequantize::<bf16>(n, bs, double, Dtype::BF16);
                check_dequantize::<f16>(n, bs, double, Dtype::F16);
            }
        }
    }
}

#[test]
fn emulated_dequantize_handles_nested_blocks_beyond_the_first() {
    // 64·256·2 + 5 elements at blocksize 64: three nested blocks of scales, the last partial.
    let n = 64 * 256 * 2 + 5;
    check_dequantize::<f32>(n, 64, true, Dtype::F32);
}

/// `k_nf4_quantize` from the stored dtype, as bitsandbytes did, on every fixture.
fn quantize_fixtures<D: LaunchDevice>(dev: &D) {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    let d_code = dev.upload(&NF4_CODE).unwrap();
    for c in &fx.configs {
        let cfg = &c.config;
        let (d_packed, d_absmax) = if c.dtype == "bfloat16" {
            let d_in = dev.upload(&fx.bf16s(&format!("{}.input", c.case))).unwrap();
            quantize(dev, &d_in, c.blocksize, &d_code)
        } else {
            let d_in = dev.upload(&fx.input(c)).unwrap();
            quantize(dev, &d_in, c.blocksize, &d_code)
        }
        .unwrap();
        assert_eq!(
            dev.download(&d_packed).unwrap(),
            fx.u8s(&format!("{cfg}.packed")),
            "{cfg}: packed bytes"
        );
        let absmax_key = if c.double_quant {
            format!("{cfg}.absmax_f32")
        } else {
            format!("{cfg}.absmax")
        };
        assert_same_bits(
            &dev.download(&d_absmax).unwrap(),
            &fx.f32s(&absmax_key),
            cfg,
        );
    }
}
qlora::device_test!(
    quantize_reproduces_every_bitsandbytes_fixture,
    quantize_fixtures
);

#[test]
fn emulated_dequantize_reproduces_every_bitsandbytes_fixture() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    let nested_code = fx.nested_map();
    for c in &fx.configs {
        let cfg = &c.config;
        let n = fx.input(c).len();
        let key = format!("{cfg}.dequant");
        if !fx.has(&key) {
            continue;
        }
        let t = fx.bnb_tensor(c);
        let scales = match &t.scales {
            qlora::quant::nf4::Nf4Scales::F32(a) => Scales::F32(a),
            qlora::quant::nf4::Nf4Scales::Double(dq) => Scales::Double {
                absmax_q: &dq.absmax_q,
                nested_absmax: &dq.nested_absmax,
                nested_code: &nested_code,
                offset: dq.offset,
                nested_blocksize: dq.nested_blocksize,
            },
        };
        if c.dtype == "bfloat16" {
            let got: Vec<bf16> =
                dequantize_emulated(&t.packed, scales, n, c.blocksize, &t.code).unwrap();
            let got: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
            let want: Vec<u16> = fx.bf16s(&key).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{cfg}: bf16 dequant");
        } else {
            let got: Vec<f32> =
                dequantize_emulated(&t.packed, scales, n, c.blocksize, &t.code).unwrap();
            assert_same_bits(&got, &fx.f32s(&key), cfg);
        }
    }
}

fn quantize_bad_arguments<D: LaunchDevice>(dev: &D) {
    let x = dev.upload(&[0.5f32; 100]).unwrap();
    let code = dev.upload(&NF4_CODE).unwrap();
    let err = quantize(dev, &x, 100, &code)
        .err()
        .expect("blocksize 100 is rejected");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let empty = dev.zeros::<f32>(0).unwrap();
    let err = quantize(dev, &empty, 64, &code)
        .err()
        .expect("an empty input is rejected");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let short_code = dev.upload(&NF4_CODE[..15]).unwrap();
    let err = quantize(dev, &x, 64, &short_code)
        .err()
        .expect("a 15-value code is rejected");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}
qlora::device_test!(
    quantize_rejects_bad_arguments_before_launching,
    quantize_bad_arguments
);

#[test]
fn launchers_reject_bad_arguments_before_launching() {
    let x = vec![0.5f32; 100];

    let (packed, absmax) = quantize_nf4(&x, 64).unwrap();
    let short = &packed[..packed.len() - 1];
    let err =
        dequantize_emulated::<f32>(short, Scales::F32(&absmax), 100, 64, &NF4_CODE).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let err = dequantize_emulated::<f32>(&packed, Scales::F32(&absmax[..1]), 100, 64, &NF4_CODE)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let code = dynamic_map_signed();
    let bad_nested = Scales::Double {
        absmax_q: &[0, 0],
        nested_absmax: &[],
        nested_code: &code,
        offset: 0.0,
        nested_blocksize: 256,
    };
    let err = dequantize_emulated::<f32>(&packed, bad_nested, 100, 64, &NF4_CODE).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4::{dequantize_cuda, DeviceScales};

    #[test]
    fn opening_a_device_succeeds_or_fails_cleanly() {
        // Without a usable driver the error is `NoCudaDevice`, never a panic or another variant.
        // CI runs these tests against a stub libcuda and sets QLORA_EXPECT_NO_GPU=1, so there the
        // failure path must be the one taken.
        let expect_none = std::env::var("QLORA_EXPECT_NO_GPU").is_ok_and(|v| v == "1");
        match CudaDevice::new(0) {
            Ok(dev) => {
                assert!(!expect_none, "a device opened under the stub driver");
                dev.synchronize().unwrap();
            }
            Err(err) => assert!(matches!(err, Error::NoCudaDevice(_)), "{err}"),
        }
    }

    #[test]
    fn cuda_dequantize_matches_reference_bits() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let s = dev.stream();
        for &n in SIZES {
            for &bs in BLOCKSIZES {
                let input = quantizer_stress_vector(n, n as u64);
                let (packed, absmax) = quantize_nf4(&input, bs).unwrap();
                let dq = double_quantize(&absmax, 256).unwrap();
                let d_packed = s.clone_htod(&packed).unwrap();
                let d_code = s.clone_htod(&NF4_CODE).unwrap();
                let d_absmax = s.clone_htod(&absmax).unwrap();
                let d_q = s.clone_htod(&dq.absmax_q).unwrap();
                let d_na = s.clone_htod(&dq.nested_absmax).unwrap();
                let d_nc = s.clone_htod(&dynamic_map_signed()).unwrap();
                for double in [false, true] {
                    let scales = if double {
                        DeviceScales::Double {
                            absmax_q: &d_q,
                            nested_absmax: &d_na,
                            nested_code: &d_nc,
                            offset: dq.offset,
                            nested_blocksize: 256,
                        }
                    } else {
                        DeviceScales::F32(&d_absmax)
                    };
                    let ref_absmax = if double {
                        dequantize_absmax(&dq)
                    } else {
                        absmax.clone()
                    };
                    let want = dequantize_nf4(&packed, &ref_absmax, n, bs, &NF4_CODE).unwrap();
                    let got =
                        dequantize_cuda::<bf16>(&dev, &d_packed, scales, n, bs, &d_code).unwrap();
                    let got: Vec<f32> = s
                        .clone_dtoh(&got)
                        .unwrap()
                        .iter()
                        .map(|x| x.to_f32())
                        .collect();
                    let want: Vec<f32> = want.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
                    lookup(Op::Dequantize, Dtype::BF16)
                        .check(&got, &want)
                        .unwrap();
                }
            }
        }
    }
}
