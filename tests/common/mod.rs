//! Shared by the integration tests: the bitsandbytes NF4 fixtures written by
//! scripts/make_fixtures.py (tests/fixtures/nf4/cases.safetensors) and bitwise comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use half::bf16;
use qlora::quant::nf4::{self, DoubleQuant, Nf4Scales, Nf4Tensor};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::Deserialize;

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nf4")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One quantization config of one input, as listed in the fixture metadata.
#[derive(Debug, Deserialize)]
pub struct Config {
    pub case: String,
    pub config: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub blocksize: usize,
    pub double_quant: bool,
}

/// The single metadata entry ("fixture", sorted JSON) of tests/fixtures/nf4/cases.safetensors.
#[derive(Debug, Deserialize)]
pub struct Meta {
    bitsandbytes: String,
    cases: Vec<Config>,
}

pub struct Fixtures<'a> {
    pub st: SafeTensors<'a>,
    pub configs: Vec<Config>,
}

impl<'a> Fixtures<'a> {
    pub fn load(buffer: &'a [u8]) -> Self {
        let (_, meta) = SafeTensors::read_metadata(buffer).unwrap();
        let meta: &HashMap<String, String> = meta.metadata().as_ref().unwrap();
        let meta: Meta = serde_json::from_str(&meta["fixture"]).unwrap();
        assert_eq!(meta.bitsandbytes, "0.50.2");
        let configs = meta.cases;
        Self {
            st: SafeTensors::deserialize(buffer).unwrap(),
            configs,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.st.tensor(key).is_ok()
    }

    pub fn bytes(&self, key: &str) -> &'a [u8] {
        self.st
            .tensor(key)
            .unwrap_or_else(|e| panic!("{key}: {e}"))
            .data()
    }

    pub fn u8s(&self, key: &str) -> Vec<u8> {
        assert_eq!(self.st.tensor(key).unwrap().dtype(), Dtype::U8, "{key}");
        self.bytes(key).to_vec()
    }

    pub fn f32s(&self, key: &str) -> Vec<f32> {
        assert_eq!(self.st.tensor(key).unwrap().dtype(), Dtype::F32, "{key}");
        self.bytes(key)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    pub fn bf16s(&self, key: &str) -> Vec<bf16> {
        assert_eq!(self.st.tensor(key).unwrap().dtype(), Dtype::BF16, "{key}");
        self.bytes(key)
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    /// The input as f32 (bf16 widens exactly, as bitsandbytes' `.float()` does).
    pub fn input(&self, c: &Config) -> Vec<f32> {
        let key = format!("{}.input", c.case);
        match c.dtype.as_str() {
            "float32" => self.f32s(&key),
            "bfloat16" => self.bf16s(&key).iter().map(|v| v.to_f32()).collect(),
            other => panic!("unexpected fixture dtype {other}"),
        }
    }

    pub fn nested_map(&self) -> [f32; 256] {
        self.f32s("dynamic_map_signed").try_into().unwrap()
    }

    /// bitsandbytes' own quant state for a config, as an `Nf4Tensor`.
    pub fn bnb_tensor(&self, c: &Config) -> Nf4Tensor {
        let cfg = &c.config;
        let scales = if c.double_quant {
            Nf4Scales::Double(DoubleQuant {
                absmax_q: self.u8s(&format!("{cfg}.absmax_u8")),
                nested_absmax: self.f32s(&format!("{cfg}.nested_absmax")),
                offset: self.f32s(&format!("{cfg}.offset"))[0],
                nested_blocksize: nf4::NESTED_BLOCKSIZE,
                nested_code: self.nested_map(),
            })
        } else {
            Nf4Scales::F32(self.f32s(&format!("{cfg}.absmax")))
        };
        Nf4Tensor {
            shape: c.shape.clone(),
            blocksize: c.blocksize,
            code: self.f32s("nf4_quant_map").try_into().unwrap(),
            packed: self.u8s(&format!("{cfg}.packed")),
            scales,
            dtype: c.dtype.clone(),
        }
    }
}

/// Bitwise equality, with any NaN matching any NaN (payloads are not part of the format).
pub fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| {
            !(got[i].to_bits() == want[i].to_bits() || (got[i].is_nan() && want[i].is_nan()))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} values differ, first at {}: got {:e} want {:e}",
        bad.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}
pub mod llama;
pub mod nf4_weight;
