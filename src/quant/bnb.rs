//! The safetensors tensors of a bitsandbytes pre-quantized NF4 linear module `m`, as bnb's
//! `Linear4bit._save_to_state_dict` (and so transformers' `save_pretrained`) writes them:
//! `m.weight` U8 `[(n+1)/2, 1]`, `m.weight.absmax`, `m.weight.quant_map` F32[16],
//! `m.weight.nested_absmax`, `m.weight.nested_quant_map` F32[256] and
//! `m.weight.quant_state.bitsandbytes__nf4` (U8 bytes of a JSON object).

use std::borrow::Cow;

use safetensors::tensor::{Dtype, TensorView, View};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hf::checkpoint::TensorSource;
use crate::hf::json::python_float_repr;
use crate::quant::dynamic8;
use crate::quant::nf4::{self, DoubleQuant, Nf4Scales, Nf4Tensor, NF4_CODE};

/// Suffix (after `m.weight`) of the packed JSON quant state of an NF4 weight.
pub const QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// An owned tensor ready for `safetensors::serialize` (little-endian bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            dtype: Dtype::U8,
            shape,
            data,
        }
    }

    fn f32(values: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape: vec![values.len()],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl View for OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The checkpoint key `{prefix}.weight{suffix}` (`weight{suffix}` for an empty prefix).
pub fn weight_key(prefix: &str, suffix: &str) -> String {
    if prefix.is_empty() {
        format!("weight{suffix}")
    } else {
        format!("{prefix}.weight{suffix}")
    }
}

/// The tensors bitsandbytes saves for module `prefix` holding `t` (the bias, if any, is saved
/// separately as a plain tensor). Serialize them with `safetensors::serialize`.
pub fn nf4_to_tensors(prefix: &str, t: &Nf4Tensor) -> Result<Vec<(String, OwnedTensor)>> {
    t.validate()?;
    let mut out = vec![
        (
            weight_key(prefix, ""),
            OwnedTensor::u8(vec![t.packed.len(), 1], t.packed.clone()),
        ),
        (weight_key(prefix, ".quant_map"), OwnedTensor::f32(&t.code)),
    ];
    match &t.scales {
        Nf4Scales::F32(absmax) => {
            out.push((weight_key(prefix, ".absmax"), OwnedTensor::f32(absmax)))
        }
        Nf4Scales::Double(dq) => {
            out.push((
                weight_key(prefix, ".absmax"),
                OwnedTensor::u8(vec![dq.absmax_q.len()], dq.absmax_q.clone()),
            ));
            out.push((
                weight_key(prefix, ".nested_absmax"),
                OwnedTensor::f32(&dq.nested_absmax),
            ));
            out.push((
                weight_key(prefix, ".nested_quant_map"),
                OwnedTensor::f32(&dq.nested_code),
            ));
        }
    }
    let json = quant_state_json(t).into_bytes();
    out.push((
        weight_key(prefix, QUANT_STATE_SUFFIX),
        OwnedTensor::u8(vec![json.len()], json),
    ));
    Ok(out)
}

/// The JSON bitsandbytes packs into `quant_state.bitsandbytes__nf4`, byte for byte: Python's
/// `json.dumps` of `{quant_type, blocksize, dtype, shape[, nested_blocksize, nested_dtype,
/// nested_offset]}` in that order, with `", "` / `": "` separators and the offset written as
/// Python's `repr` of the f32 widened to f64.
pub fn quant_state_json(t: &Nf4Tensor) -> String {
    let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let mut json = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        t.blocksize,
        t.dtype,
        shape.join(", ")
    );
    if let Nf4Scales::Double(dq) = &t.scales {
        json.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            dq.nested_blocksize,
            python_float_repr(f64::from(dq.offset))
        ));
    }
    json.push('}');
    json
}

/// The non-tensor quant state fields bitsandbytes packs as JSON.
#[derive(Debug, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Option<Vec<usize>>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::BadTensor {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn get<'data>(st: &impl TensorSource<'data>, key: &str) -> Result<TensorView<'data>> {
    st.tensor_view(key)
}

/// Reads a tensor with the expected dtype and shape.
fn get_checked<'data>(
    st: &impl TensorSource<'data>,
    key: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'data [u8]> {
    let view = get(st, key)?;
    if view.dtype() != dtype {
        return Err(bad(
            key,
            format!("dtype {:?}, expected {dtype:?}", view.dtype()),
        ));
    }
    if view.shape() != shape {
        return Err(bad(
            key,
            format!("shape {:?}, expected {shape:?}", view.shape()),
        ));
    }
    Ok(view.data())
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// True when module `prefix` holds a bitsandbytes NF4 weight (its packed quant state exists).
pub fn is_bnb_nf4<'data>(st: &impl TensorSource<'data>, prefix: &str) -> bool {
    st.tensor_view(&weight_key(prefix, QUANT_STATE_SUFFIX))
        .is_ok()
}

/// Reads module `prefix`'s NF4 weight. Missing tensors give [`Error::MissingTensor`]; a wrong
/// dtype or shape, unparsable or unsupported quant state, or a quant map other than NF4 gives
/// [`Error::BadTensor`].
pub fn nf4_from_safetensors<'data>(
    st: &impl TensorSource<'data>,
    prefix: &str,
) -> Result<Nf4Tensor> {
    let state_key = weight_key(prefix, QUANT_STATE_SUFFIX);
    let state_view = get(st, &state_key)?;
    if state_view.dtype() != Dtype::U8 || state_view.shape().len() != 1 {
        return Err(bad(&state_key, "expected a 1-D U8 tensor of JSON bytes"));
    }
    let state: QuantStateJson = serde_json::from_slice(state_view.data())
        .map_err(|e| bad(&state_key, format!("quant state JSON: {e}")))?;
    if state.quant_type != "nf4" {
        return Err(bad(
            &state_key,
            format!("quant_type {:?} is not nf4", state.quant_type),
        ));
    }
    nf4::check_blocksize("nf4_from_safetensors", state.blocksize)
        .map_err(|e| bad(&state_key, e.to_string()))?;
    if !nf4::SUPPORTED_DTYPES.contains(&state.dtype.as_str()) {
        return Err(bad(
            &state_key,
            format!("unsupported dtype {:?}", state.dtype),
        ));
    }
    let shape = state
        .shape
        .ok_or_else(|| bad(&state_key, "quant state has no shape"))?;
    let numel = nf4::checked_numel(&shape)
        .filter(|&n| n > 0)
        .ok_or_else(|| bad(&state_key, format!("shape {shape:?} is empty or overflows")))?;
    let blocks = numel.div_ceil(state.blocksize);

    let weight_key_ = weight_key(prefix, "");
    let packed = get_checked(st, &weight_key_, Dtype::U8, &[numel.div_ceil(2), 1])?.to_vec();

    let map_key = weight_key(prefix, ".quant_map");
    let code = f32_values(get_checked(st, &map_key, Dtype::F32, &[16])?);
    if code
        .iter()
        .zip(&NF4_CODE)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        // bitsandbytes ignores the stored map and dequantizes with its built-in NF4 table.
        return Err(bad(&map_key, "quant map is not the NF4 code book"));
    }

    let absmax_key = weight_key(prefix, ".absmax");
    let scales = match (state.nested_blocksize, state.nested_offset) {
        (Some(nested_blocksize), Some(offset)) => {
            if !dynamic8::SUPPORTED_BLOCKSIZES.contains(&nested_blocksize) {
                return Err(bad(
                    &state_key,
                    format!("unsupported nested_blocksize {nested_blocksize}"),
                ));
            }
            if let Some(d) = state.nested_dtype.as_deref().filter(|d| *d != "float32") {
                return Err(bad(&state_key, format!("unsupported nested_dtype {d:?}")));
            }
            let absmax_q = get_checked(st, &absmax_key, Dtype::U8, &[blocks])?.to_vec();
            let nested_key = weight_key(prefix, ".nested_absmax");
            let nested = blocks.div_ceil(nested_blocksize);
            let nested_absmax = f32_values(get_checked(st, &nested_key, Dtype::F32, &[nested])?);
            let nested_map_key = weight_key(prefix, ".nested_quant_map");
            let nested_map = f32_values(get_checked(st, &nested_map_key, Dtype::F32, &[256])?);
            let mut nested_code = [0f32; 256];
            nested_code.copy_from_slice(&nested_map);
            Nf4Scales::Double(DoubleQuant {
                absmax_q,
                nested_absmax,
                // bitsandbytes reads it back as `torch.tensor(float(offset))`, an f32.
                offset: offset as f32,
                nested_blocksize,
                nested_code,
            })
        }
        (None, None) => Nf4Scales::F32(f32_values(get_checked(
            st,
            &absmax_key,
            Dtype::F32,
            &[blocks],
        )?)),
        _ => {
            return Err(bad(
                &state_key,
                "nested_blocksize and nested_offset must both be present or both absent",
            ))
        }
    };

    let mut quant_code = [0f32; 16];
    quant_code.copy_from_slice(&code);
    let tensor = Nf4Tensor {
        shape,
        blocksize: state.blocksize,
        code: quant_code,
        packed,
        scales,
        dtype: state.dtype,
    };
    tensor
        .validate()
        .map_err(|e| bad(&state_key, e.to_string()))?;
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_keys_follow_the_module_prefix() {
        assert_eq!(weight_key("m.q_proj", ".absmax"), "m.q_proj.weight.absmax");
        assert_eq!(weight_key("", ""), "weight");
    }
}
