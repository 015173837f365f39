//! Parity of the NF4 kernels in kernels/nf4.cu: the Rust reference (`quant::nf4`) ≡ the same CUDA
//! source run through the CPU emulation ≡ CUDA when a GPU is present, on odd sizes, every input
//! dtype, every output dtype, f32 and double-quantized scales.

mod common;

use common::{assert_same_bits, fixture_bytes, Fixtures};
use half::{bf16, f16};
use qlora::kernels::device::{KernelArg, LaunchDevice, Scalar};
use qlora::kernels::launch::Element;
use qlora::kernels::nf4::{dequantize, dequantize_into, quantize, Nf4Weight, Scales};
use qlora::quant::dynamic8::dynamic_map_signed;
use qlora::quant::nf4::{
    dequantize_absmax, dequantize_nf4, double_quantize, quantize_nf4, DoubleQuant, Nf4Scales,
    NF4_CODE,
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

/// The whole of a device buffer as a view.
fn all<'a, D: LaunchDevice, T: Scalar>(dev: &'a D, buf: &'a D::Buffer<T>) -> D::View<'a, T> {
    dev.slice(buf, 0..buf.len()).unwrap()
}

/// Packed codes, the code book and both kinds of scales of one tensor on a device.
struct DeviceQuant<D: LaunchDevice> {
    packed: D::Buffer<u8>,
    code: D::Buffer<f32>,
    absmax: D::Buffer<f32>,
    absmax_q: D::Buffer<u8>,
    nested_absmax: D::Buffer<f32>,
    nested_code: D::Buffer<f32>,
    offset: f32,
    nested_blocksize: usize,
}

impl<D: LaunchDevice> DeviceQuant<D> {
    fn upload(dev: &D, packed: &[u8], code: &[f32], absmax: &[f32], dq: &DoubleQuant) -> Self {
        DeviceQuant {
            packed: dev.upload(packed).unwrap(),
            code: dev.upload(code).unwrap(),
            absmax: dev.upload(absmax).unwrap(),
            absmax_q: dev.upload(&dq.absmax_q).unwrap(),
            nested_absmax: dev.upload(&dq.nested_absmax).unwrap(),
            nested_code: dev.upload(&dq.nested_code).unwrap(),
            offset: dq.offset,
            nested_blocksize: dq.nested_blocksize,
        }
    }

    fn scales<'a>(&'a self, dev: &'a D, double: bool) -> Scales<'a, D> {
        if double {
            Scales::Double {
                absmax_q: all(dev, &self.absmax_q),
                nested_absmax: all(dev, &self.nested_absmax),
                nested_code: all(dev, &self.nested_code),
                offset: self.offset,
                nested_blocksize: self.nested_blocksize,
            }
        } else {
            Scales::F32(all(dev, &self.absmax))
        }
    }

    /// A flat tensor of `n` elements in blocks of `blocksize`.
    fn weight<'a>(
        &'a self,
        dev: &'a D,
        n: usize,
        blocksize: usize,
        double: bool,
    ) -> Nf4Weight<'a, D> {
        Nf4Weight::flat(
            all(dev, &self.packed),
            self.scales(dev, double),
            n,
            blocksize,
            all(dev, &self.code),
        )
    }
}

fn check_dequantize<D: LaunchDevice, T: Element>(
    dev: &D,
    n: usize,
    blocksize: usize,
    dtype: Dtype,
) {
    let input = quantizer_stress_vector(n, n as u64 + 7);
    let (packed, absmax) = quantize_nf4(&input, blocksize).unwrap();
    let mut dq = double_quantize(&absmax, 256).unwrap();
    dq.nested_code = dynamic_map_signed();
    let d = DeviceQuant::upload(dev, &packed, &NF4_CODE, &absmax, &dq);
    for double in [false, true] {
        let ref_absmax = if double {
            dequantize_absmax(&dq)
        } else {
            absmax.clone()
        };
        let want = dequantize_nf4(&packed, &ref_absmax, n, blocksize, &NF4_CODE).unwrap();
        let want: Vec<f32> = want.iter().map(|&x| T::from_f32(x).to_f32()).collect();
        let w = d.weight(dev, n, blocksize, double);
        let out = dequantize::<D, T>(dev, &w).unwrap();
        let got: Vec<f32> = dev
            .download(&out)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        if let Err(e) = lookup(Op::Dequantize, dtype).check(&got, &want) {
            panic!(
                "{} n={n} bs={blocksize} double={double} {dtype:?}: {e}",
                dev.label()
            );
        }
        // Into a caller-owned buffer: the same bits.
        let mut out2 = dev.zeros::<T>(n).unwrap();
        dequantize_into(dev, &w, &mut out2).unwrap();
        let again: Vec<f32> = dev
            .download(&out2)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_same_bits(&again, &got, "dequantize_into");
    }
}

fn dequantize_every_size_and_dtype<D: LaunchDevice>(dev: &D) {
    for &n in SIZES {
        for &bs in BLOCKSIZES {
            check_dequantize::<D, f32>(dev, n, bs, Dtype::F32);
            check_dequantize::<D, bf16>(dev, n, bs, Dtype::BF16);
            check_dequantize::<D, f16>(dev, n, bs, Dtype::F16);
        }
    }
}
qlora::device_test!(
    dequantize_matches_reference_bits_for_every_output_dtype,
    dequantize_every_size_and_dtype
);

fn dequantize_nested_blocks<D: LaunchDevice>(dev: &D) {
    // 64·256·2 + 5 elements at blocksize 64: three nested blocks of scales, the last partial.
    let n = 64 * 256 * 2 + 5;
    check_dequantize::<D, f32>(dev, n, 64, Dtype::F32);
}
qlora::device_test!(
    dequantize_handles_nested_blocks_beyond_the_first,
    dequantize_nested_blocks
);

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

/// `k_nf4_dequantize` to the stored dtype on every fixture that has bitsandbytes' output.
fn dequantize_fixtures<D: LaunchDevice>(dev: &D) {
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
        // The kind of scales not used is a placeholder of the right length, never read.
        let (absmax, mut dq) = match &t.scales {
            Nf4Scales::F32(a) => (
                a.clone(),
                DoubleQuant {
                    absmax_q: vec![0; a.len()],
                    nested_absmax: vec![0.0; a.len().div_ceil(256)],
                    offset: 0.0,
                    nested_blocksize: 256,
                    nested_code,
                },
            ),
            Nf4Scales::Double(dq) => (dequantize_absmax(dq), dq.clone()),
        };
        let double = matches!(t.scales, Nf4Scales::Double(_));
        dq.nested_code = nested_code;
        let d = DeviceQuant::upload(dev, &t.packed, &t.code, &absmax, &dq);
        let w = d.weight(dev, n, c.blocksize, double);
        if c.dtype == "bfloat16" {
            let got = dev
                .download(&dequantize::<D, bf16>(dev, &w).unwrap())
                .unwrap();
            let got: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
            let want: Vec<u16> = fx.bf16s(&key).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{cfg}: bf16 dequant");
        } else {
            let got = dev
                .download(&dequantize::<D, f32>(dev, &w).unwrap())
                .unwrap();
            assert_same_bits(&got, &fx.f32s(&key), cfg);
        }
    }
}
qlora::device_test!(
    dequantize_reproduces_every_bitsandbytes_fixture,
    dequantize_fixtures
);

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

fn dequantize_bad_arguments<D: LaunchDevice>(dev: &D) {
    let x = vec![0.5f32; 100];
    let (packed, absmax) = quantize_nf4(&x, 64).unwrap();
    let mut dq = double_quantize(&absmax, 256).unwrap();
    dq.nested_code = dynamic_map_signed();
    let d = DeviceQuant::upload(dev, &packed, &NF4_CODE, &absmax, &dq);
    let is_invalid = |r: qlora::Result<D::Buffer<f32>>, what: &str| match r {
        Err(Error::InvalidArgument { .. }) => {}
        Err(e) => panic!("{what}: {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    let valid = d.weight(dev, 100, 64, false);
    assert!(dequantize::<D, f32>(dev, &valid).is_ok(), "valid");
    let short = Nf4Weight {
        packed: dev.slice(&d.packed, 0..packed.len() - 1).unwrap(),
        ..d.weight(dev, 100, 64, false)
    };
    is_invalid(dequantize(dev, &short), "short packed");
    let short_scales = Nf4Weight {
        scales: Scales::F32(dev.slice(&d.absmax, 0..1).unwrap()),
        ..d.weight(dev, 100, 64, false)
    };
    is_invalid(dequantize(dev, &short_scales), "short absmax");
    let short_code = Nf4Weight {
        code: dev.slice(&d.code, 0..15).unwrap(),
        ..d.weight(dev, 100, 64, false)
    };
    is_invalid(dequantize(dev, &short_code), "15-value code");
    let empty_nested = dev.zeros::<f32>(0).unwrap();
    let bad_nested = Nf4Weight {
        scales: Scales::Double {
            absmax_q: all(dev, &d.absmax_q),
            nested_absmax: all(dev, &empty_nested),
            nested_code: all(dev, &d.nested_code),
            offset: 0.0,
            nested_blocksize: 256,
        },
        ..d.weight(dev, 100, 64, true)
    };
    is_invalid(dequantize(dev, &bad_nested), "no nested absmax");
    is_invalid(
        dequantize(dev, &d.weight(dev, 100, 100, false)),
        "blocksize 100",
    );
    is_invalid(dequantize(dev, &d.weight(dev, 0, 64, false)), "n = 0");
    let mut wrong_out = dev.zeros::<f32>(99).unwrap();
    let err = dequantize_into(dev, &valid, &mut wrong_out).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}
qlora::device_test!(
    dequantize_rejects_bad_arguments_before_launching,
    dequantize_bad_arguments
);

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;

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
}
