//! Pins the plain-Rust NF4 reference (`qlora::quant`) to bitsandbytes 0.50.2's CPU output, read
//! from tests/fixtures/nf4/ (written by scripts/make_fixtures.py): packed bytes, scales, double
//! quantization, the dynamic 8-bit map, quant-state JSON and a bnb-saved Linear4bit module.

mod common;

use common::{assert_same_bits, fixture_bytes, Fixtures};
use half::bf16;
use qlora::quant::bnb::{self, nf4_from_safetensors, nf4_to_tensors, OwnedTensor};
use qlora::quant::dynamic8::{self, dynamic_map_signed};
use qlora::quant::nf4::{
    self, dequantize_absmax, dequantize_nf4, double_quantize, double_quantize_with_offset,
    quantize_nf4, Nf4Scales, Nf4Tensor, NF4_CODE,
};
use qlora::Error;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

fn assert_invalid_argument<T: std::fmt::Debug>(result: qlora::Result<T>, what: &str) {
    match result {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn dequant_of_bnb_state_matches_bnb_output_bit_for_bit() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    let mut checked = 0;
    for c in &fx.configs {
        let key = format!("{}.dequant", c.config);
        if !fx.has(&key) {
            continue;
        }
        let t = fx.bnb_tensor(c);
        if c.dtype == "bfloat16" {
            let got: Vec<u16> = t
                .dequantize_bf16()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u16> = fx.bf16s(&key).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{}", c.config);
        } else {
            assert_same_bits(&t.dequantize().unwrap(), &fx.f32s(&key), &c.config);
        }
        checked += 1;
    }
    assert!(
        checked >= 14,
        "only {checked} configs carry a dequant output"
    );
}

#[test]
fn quantize_matches_bnb_packed_bytes_and_absmax() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    for c in &fx.configs {
        let (packed, absmax) = quantize_nf4(&fx.input(c), c.blocksize).unwrap();
        assert_eq!(
            packed,
            fx.u8s(&format!("{}.packed", c.config)),
            "{}",
            c.config
        );
        let absmax_key = if c.double_quant {
            "absmax_f32"
        } else {
            "absmax"
        };
        let want = fx.f32s(&format!("{}.{absmax_key}", c.config));
        assert_same_bits(&absmax, &want, &c.config);
    }
}

#[test]
fn double_quant_with_bnb_offset_matches_bnb_bytes_and_scales() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    for c in fx.configs.iter().filter(|c| c.double_quant) {
        let cfg = &c.config;
        let absmax = fx.f32s(&format!("{cfg}.absmax_f32"));
        let offset = fx.f32s(&format!("{cfg}.offset"))[0];
        let dq = double_quantize_with_offset(&absmax, nf4::NESTED_BLOCKSIZE, offset).unwrap();
        let Nf4Scales::Double(bnb_dq) = fx.bnb_tensor(c).scales else {
            unreachable!()
        };
        assert_eq!(dq, bnb_dq, "{cfg}");
        assert_same_bits(
            &dequantize_absmax(&bnb_dq),
            &fx.f32s(&format!("{cfg}.scales")),
            cfg,
        );
    }
}

/// Our offset is the correctly rounded mean; bitsandbytes' is `torch.mean` (an f32 cascade sum
/// whose order depends on the host). They may differ by an ulp, and a 1-ulp shift of the offset
/// can only move a value across an 8-bit bin edge, so a differing code is off by one index.
#[test]
fn double_quant_mean_offset_is_within_one_ulp_of_torch_mean() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    let mut report = Vec::new();
    for c in fx.configs.iter().filter(|c| c.double_quant) {
        let cfg = &c.config;
        let absmax = fx.f32s(&format!("{cfg}.absmax_f32"));
        let bnb_offset = fx.f32s(&format!("{cfg}.offset"))[0];
        let ours = double_quantize(&absmax, nf4::NESTED_BLOCKSIZE).unwrap();
        let ulps = (i64::from(ours.offset.to_bits()) - i64::from(bnb_offset.to_bits())).abs();
        assert!(
            ulps <= 1,
            "{cfg}: offset {} vs torch {bnb_offset}",
            ours.offset
        );
        let bnb_q = fx.u8s(&format!("{cfg}.absmax_u8"));
        let differing: Vec<usize> = (0..bnb_q.len())
            .filter(|&i| ours.absmax_q[i] != bnb_q[i])
            .collect();
        for &i in &differing {
            assert_eq!(
                (i32::from(ours.absmax_q[i]) - i32::from(bnb_q[i])).abs(),
                1,
                "{cfg}: block {i}"
            );
        }
        if ulps == 0 {
            assert!(differing.is_empty(), "{cfg}: same offset, different codes");
            assert_eq!(ours.nested_absmax, fx.f32s(&format!("{cfg}.nested_absmax")));
        }
        report.push(format!(
            "{cfg}: {ulps} ulp, {} codes differ",
            differing.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn dynamic_map_matches_bnb_nested_quant_map_bit_for_bit() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    assert_same_bits(&dynamic_map_signed(), &fx.nested_map(), "dynamic map");
    let module = fixture_bytes("module.safetensors");
    let st = SafeTensors::deserialize(&module).unwrap();
    let stored = st
        .tensor("model.layers.0.mlp.down_proj.weight.nested_quant_map")
        .unwrap();
    let stored: Vec<f32> = stored
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_same_bits(
        &dynamic_map_signed(),
        &stored,
        "checkpoint nested_quant_map",
    );
}

#[test]
fn nf4_code_matches_bnb_quant_map_bit_for_bit() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    assert_same_bits(&NF4_CODE, &fx.f32s("nf4_quant_map"), "quant_map");
}

#[test]
fn blockwise8_matches_bnb_codes_absmax_and_dequant() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    let map = dynamic_map_signed();
    let (q, absmax) =
        dynamic8::quantize_blockwise8(&fx.f32s("dyn8.input"), &map, 256, 0.0).unwrap();
    assert_eq!(q, fx.u8s("dyn8.q"));
    assert_same_bits(&absmax, &fx.f32s("dyn8.absmax"), "dyn8 absmax");
    // -0.0 is the identity offset: bnb's plain dequant keeps code[0] * 0 == -0.0.
    let out = dynamic8::dequantize_blockwise8(&q, &absmax, &map, 256, -0.0).unwrap();
    assert_same_bits(&out, &fx.f32s("dyn8.dequant"), "dyn8 dequant");
}

#[test]
fn quant_state_json_matches_bnb_bytes() {
    let buffer = fixture_bytes("cases.safetensors");
    let fx = Fixtures::load(&buffer);
    for c in &fx.configs {
        let t = fx.bnb_tensor(c);
        let want = fx.u8s(&format!("{}.quant_state", c.config));
        assert_eq!(
            bnb::quant_state_json(&t),
            String::from_utf8(want).unwrap(),
            "{}",
            c.config
        );
    }
}

#[test]
fn nibble_order_puts_the_first_value_in_the_high_nibble() {
    // Absmax 1.0: -1.0 is code 0, 1.0 code 15, 0.0 code 7.
    let (packed, absmax) = quantize_nf4(&[-1.0, 1.0, 0.0, -1.0], 64).unwrap();
    assert_eq!(packed, vec![0x0f, 0x70]);
    assert_eq!(absmax, vec![1.0]);
    let out = dequantize_nf4(&packed, &absmax, 4, 64, &NF4_CODE).unwrap();
    assert_eq!(out, vec![-1.0, 1.0, 0.0, -1.0]);
}

/// bitsandbytes pads an odd-length input with 0.0 before packing, and 0.0 is code 7, so the
/// last low nibble is 7 (not 0); dequantization never reads it.
#[test]
fn odd_length_pads_the_last_low_nibble_with_code_7() {
    let (packed, absmax) = quantize_nf4(&[1.0, -1.0, 1.0], 64).unwrap();
    assert_eq!(packed, vec![0xf0, 0xf7]);
    let out = dequantize_nf4(&packed, &absmax, 3, 64, &NF4_CODE).unwrap();
    assert_eq!(out, vec![1.0, -1.0, 1.0]);
    let (packed, _) = quantize_nf4(&[0.25], 64).unwrap();
    assert_eq!(packed.len(), 1);
    assert_eq!(packed[0] & 0x0f, nf4::PAD_CODE);
}

/// Empty inputs: the free functions return empty results (as bnb does); an `Nf4Tensor` must hold
/// at least one value, and double quantization needs at least one scale.
#[test]
fn empty_input_quantizes_to_empty_and_tensors_reject_it() {
    let (packed, absmax) = quantize_nf4(&[], 64).unwrap();
    assert!(packed.is_empty() && absmax.is_empty());
    assert!(dequantize_nf4(&[], &[], 0, 64, &NF4_CODE)
        .unwrap()
        .is_empty());
    assert_invalid_argument(Nf4Tensor::quantize(&[], &[0, 4], 64, false), "empty tensor");
    assert_invalid_argument(double_quantize(&[], 256), "empty scales");
}

#[test]
fn checkpoint_round_trip_through_safetensors_serialize() {
    let data: Vec<f32> = (0..48 * 100)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0)
        .collect();
    for double_quant in [false, true] {
        let t = Nf4Tensor::quantize(&data, &[48, 100], 64, double_quant).unwrap();
        let tensors = nf4_to_tensors("model.layers.3.self_attn.q_proj", &t).unwrap();
        let bytes = safetensors::serialize(tensors, None).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert!(bnb::is_bnb_nf4(&st, "model.layers.3.self_attn.q_proj"));
        assert!(!bnb::is_bnb_nf4(&st, "model.layers.3.self_attn.k_proj"));
        let back = nf4_from_safetensors(&st, "model.layers.3.self_attn.q_proj").unwrap();
        assert_eq!(back, t);
        assert_same_bits(
            &back.dequantize().unwrap(),
            &t.dequantize().unwrap(),
            "round trip",
        );
    }
}

#[test]
fn reads_the_bnb_written_module_file() {
    let prefix = "model.layers.0.mlp.down_proj";
    let module = fixture_bytes("module.safetensors");
    let source = fixture_bytes("module_source.safetensors");
    let st = SafeTensors::deserialize(&module).unwrap();
    let src = SafeTensors::deserialize(&source).unwrap();
    assert!(bnb::is_bnb_nf4(&st, prefix));
    let t = nf4_from_safetensors(&st, prefix).unwrap();
    assert_eq!(
        (t.shape.clone(), t.dtype.as_str(), t.blocksize),
        (vec![48, 160], "bfloat16", 64)
    );

    let want: Vec<u16> = src
        .tensor("dequant")
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let got: Vec<u16> = t
        .dequantize_bf16()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, want);

    // Quantizing the source weight reproduces the file's packed weight, and writing bnb's own
    // state back gives the file's tensors byte for byte.
    let weight: Vec<bf16> = src
        .tensor("weight")
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
        .collect();
    let ours = Nf4Tensor::quantize_bf16(&weight, &[48, 160], 64, true).unwrap();
    assert_eq!(ours.packed, t.packed);
    for (key, tensor) in nf4_to_tensors(prefix, &t).unwrap() {
        let stored = st.tensor(&key).unwrap();
        let stored = OwnedTensor {
            dtype: stored.dtype(),
            shape: stored.shape().to_vec(),
            data: stored.data().to_vec(),
        };
        assert_eq!(tensor, stored, "{key}");
    }
}

/// Serializes bnb's module file with one tensor replaced (or removed when `with` is None).
fn module_with(key: &str, with: Option<OwnedTensor>) -> Vec<u8> {
    let module = fixture_bytes("module.safetensors");
    let st = SafeTensors::deserialize(&module).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != key)
        .map(|(name, view)| {
            let owned = OwnedTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            (name, owned)
        })
        .collect();
    if let Some(t) = with {
        tensors.push((key.to_string(), t));
    }
    safetensors::serialize(tensors, None).unwrap()
}

#[test]
fn missing_key_gives_missing_tensor_error() {
    let prefix = "model.layers.0.mlp.down_proj";
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        bnb::QUANT_STATE_SUFFIX,
    ] {
        let key = bnb::weight_key(prefix, suffix);
        let bytes = module_with(&key, None);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        match nf4_from_safetensors(&st, prefix) {
            Err(Error::MissingTensor { key: k }) => assert_eq!(k, key),
            other => panic!("{key}: expected MissingTensor, got {other:?}"),
        }
    }
}

#[test]
fn wrong_dtype_or_shape_gives_bad_tensor_error() {
    let prefix = "model.layers.0.mlp.down_proj";
    let absmax_key = bnb::weight_key(prefix, ".absmax");
    let weight_key = bnb::weight_key(prefix, "");
    let state_key = bnb::weight_key(prefix, bnb::QUANT_STATE_SUFFIX);
    let bad_json =
        br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 160]}"#;
    let cases = [
        // absmax stored as F32 although the state says double quant.
        (
            absmax_key.clone(),
            OwnedTensor {
                dtype: Dtype::F32,
                shape: vec![120],
                data: vec![0; 480],
            },
        ),
        // absmax with one block too few.
        (
            absmax_key.clone(),
            OwnedTensor {
                dtype: Dtype::U8,
                shape: vec![119],
                data: vec![0; 119],
            },
        ),
        // packed weight as a flat vector instead of [(n+1)/2, 1].
        (
            weight_key.clone(),
            OwnedTensor {
                dtype: Dtype::U8,
                shape: vec![3840],
                data: vec![0; 3840],
            },
        ),
        // not JSON.
        (
            state_key.clone(),
            OwnedTensor {
                dtype: Dtype::U8,
                shape: vec![3],
                data: b"{x}".to_vec(),
            },
        ),
        // fp4, which this reader does not handle.
        (
            state_key.clone(),
            OwnedTensor {
                dtype: Dtype::U8,
                shape: vec![bad_json.len()],
                data: bad_json.to_vec(),
            },
        ),
    ];
    for (key, tensor) in cases {
        let what = format!("{key} {:?} {:?}", tensor.dtype, tensor.shape);
        let bytes = module_with(&key, Some(tensor));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        match nf4_from_safetensors(&st, prefix) {
            Err(Error::BadTensor { key: k, .. }) => assert_eq!(k, key, "{what}"),
            other => panic!("{what}: expected BadTensor, got {other:?}"),
        }
    }
}

#[test]
fn invalid_blocksize_and_mismatched_lengths_give_invalid_argument() {
    let x = vec![0.5f32; 100];
    for bs in [0, 16, 48, 100, 8192] {
        assert_invalid_argument(quantize_nf4(&x, bs), "quantize blocksize");
        assert_invalid_argument(
            dequantize_nf4(&[0; 50], &[1.0; 2], 100, bs, &NF4_CODE),
            "dequantize blocksize",
        );
    }
    let (packed, absmax) = quantize_nf4(&x, 64).unwrap();
    assert_invalid_argument(
        dequantize_nf4(&packed[1..], &absmax, 100, 64, &NF4_CODE),
        "short packed",
    );
    assert_invalid_argument(
        dequantize_nf4(&packed, &absmax[1..], 100, 64, &NF4_CODE),
        "short absmax",
    );
    assert_invalid_argument(
        dequantize_nf4(&packed, &absmax, 101, 64, &NF4_CODE),
        "wrong n",
    );
    assert_invalid_argument(
        Nf4Tensor::quantize(&x, &[10, 11], 64, false),
        "shape mismatch",
    );
    assert_invalid_argument(
        Nf4Tensor::quantize(&x, &[usize::MAX, 2], 64, false),
        "shape overflow",
    );
    assert_invalid_argument(double_quantize(&absmax, 100), "nested blocksize");
    let map = dynamic_map_signed();
    assert_invalid_argument(
        dynamic8::quantize_blockwise8(&x, &map, 7, 0.0),
        "8-bit blocksize",
    );
    assert_invalid_argument(
        dynamic8::dequantize_blockwise8(&[0; 300], &[1.0], &map, 256, 0.0),
        "8-bit absmax count",
    );
    let mut t = Nf4Tensor::quantize(&x, &[100], 64, true).unwrap();
    if let Nf4Scales::Double(dq) = &mut t.scales {
        dq.nested_absmax.clear();
    }
    assert_invalid_argument(t.dequantize(), "inconsistent double quant");
    let mut out = vec![0f32; 99];
    assert_invalid_argument(t.dequantize_into(&mut out), "output length");
}

/// bitsandbytes' AVX-512 CPU kernel dequantizes a 2-D `[rows, cols]` weight reading the scale of
/// element (r, c) at `r * (cols / blocksize) + c / blocksize` (integer division), which is wrong
/// when `cols` is not a multiple of `blocksize` (here 160 vs 64); the flat layout (what the
/// checkpoint means, and what CUDA and bnb's other CPU paths compute) is `(r * cols + c) / bs`.
/// The fixture keeps that output: it must equal either the flat formula (a host without AVX-512)
/// or exactly the row-indexed one, never anything else.
#[test]
fn bnb_cpu_2d_dequant_differs_only_by_its_row_scale_indexing() {
    let prefix = "model.layers.0.mlp.down_proj";
    let module = fixture_bytes("module.safetensors");
    let source = fixture_bytes("module_source.safetensors");
    let st = SafeTensors::deserialize(&module).unwrap();
    let src = SafeTensors::deserialize(&source).unwrap();
    let t = nf4_from_safetensors(&st, prefix).unwrap();
    let (rows, cols, bs) = (t.shape[0], t.shape[1], t.blocksize);
    let scales = t.absmax_f32();
    let codes: Vec<u8> = t.packed.iter().flat_map(|b| [b >> 4, b & 0x0f]).collect();
    let row_indexed: Vec<u16> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let scale = scales[r * (cols / bs) + c / bs];
            bf16::from_f32(NF4_CODE[usize::from(codes[i])] * scale).to_bits()
        })
        .collect();
    let flat: Vec<u16> = t
        .dequantize_bf16()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let bnb_2d: Vec<u16> = src
        .tensor("dequant_bnb_2d")
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_ne!(row_indexed, flat);
    assert!(bnb_2d == row_indexed || bnb_2d == flat);
}
