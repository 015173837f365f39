//! A whole Hugging Face Llama folder turned into a bitsandbytes pre-quantized NF4 folder, as
//! transformers' `save_pretrained` writes a model loaded with `BitsAndBytesConfig(load_in_4bit)`:
//! the seven linears `[out, in]` of every layer as bnb NF4 tensors, everything else copied as
//! stored, `quantization_config` added to `config.json`, the tokenizer files copied.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::hf::checkpoint::{widen, Checkpoint};
use crate::hf::folder::{
    ordered_names, prepare_output_dir, write_checkpoint, write_config, OutTensor,
    DEFAULT_MAX_SHARD_BYTES,
};
use crate::model::config::{checkpoint_tensor_names, torch_dtype_name, LlamaConfig, TorchDtype};
use crate::model::gguf::{gguf_name, hf_tensor_shape, GgufFile};
use crate::model::source::ModelSource;
use crate::model::weights::is_linear;
use crate::quant::bnb::{nf4_to_tensors, quant_state_json, OwnedTensor, QUANT_STATE_SUFFIX};
use crate::quant::dynamic8;
use crate::quant::nf4::{nf4_absmax, nf4_scales, Nf4Scales, Nf4Tensor, NF4_CODE};
use crate::{Error, Result};

/// One linear's checkpoint tensors (`nf4_to_tensors`), by module prefix.
type QuantizedModule = (String, Vec<(String, OwnedTensor)>);

/// How to quantize a model folder.
#[derive(Clone, Debug)]
pub struct QuantizeDirOptions {
    /// NF4 block size (transformers always uses 64; the loader reads any bnb size).
    pub blocksize: usize,
    /// Double-quantize the block scales (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`, the dtype bitsandbytes' forward runs the linears in.
    pub compute_dtype: TorchDtype,
    /// Shard size limit in bytes.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeDirOptions {
    /// Blocks of 64, double quant, bf16 compute (QLoRA's setting), 5 GB shards.
    fn default() -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
            compute_dtype: TorchDtype::BF16,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What [`quantize_model_dir`] wrote.
#[derive(Clone, Debug)]
pub struct QuantizeDirSummary {
    pub files: Vec<PathBuf>,
    /// Linears quantized.
    pub quantized: usize,
    /// Tensors copied as stored.
    pub copied: usize,
    /// Bytes of tensors read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Relative Frobenius error of all quantized linears together, `‖deq − w‖ / ‖w‖`, with the
    /// dequantized weights in their original dtype.
    pub relative_error: f64,
    pub copied_files: Vec<String>,
}

/// The `quantization_config` transformers 5.23 writes for this setting: `BitsAndBytesConfig.
/// to_dict()` of `load_in_4bit=True, bnb_4bit_quant_type="nf4"` with the double quant and compute
/// dtype chosen (every other field at its default).
pub fn bnb_quantization_config(double_quant: bool, compute_dtype: TorchDtype) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": torch_dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

/// The torch name of a stored floating-point tensor's dtype.
fn stored_dtype_name(key: &str, view: &TensorView<'_>) -> Result<&'static str> {
    match view.dtype() {
        Dtype::F32 => Ok("float32"),
        Dtype::BF16 => Ok("bfloat16"),
        Dtype::F16 => Ok("float16"),
        other => Err(Error::BadTensor {
            key: key.to_string(),
            reason: format!("dtype {other:?} is not F32, F16 or BF16"),
        }),
    }
}

/// Quantizes a stored linear as bitsandbytes quantizes the tensor `from_pretrained` loaded in its
/// stored dtype (the loader's quantize-on-load does the same): bf16 and f16 widen exactly to f32,
/// and the quant state records the stored dtype.
pub fn quantize_view(
    key: &str,
    view: &TensorView<'_>,
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    let dtype = stored_dtype_name(key, view)?;
    let values: Vec<f32> = widen(view.dtype(), view.data()).collect();
    let mut t = Nf4Tensor::quantize(&values, view.shape(), blocksize, double_quant)?;
    t.dtype = dtype.to_string();
    Ok(t)
}

/// An NF4 weight without its codes (`packed` empty): shape, block size, dtype and the stored
/// scales, from one pass of block maxima. Enough for the quant state JSON and the scale tensors.
fn nf4_header(
    key: &str,
    view: &TensorView<'_>,
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    let dtype = stored_dtype_name(key, view)?;
    let values: Vec<f32> = widen(view.dtype(), view.data()).collect();
    Ok(Nf4Tensor {
        shape: view.shape().to_vec(),
        blocksize,
        code: NF4_CODE,
        packed: Vec::new(),
        scales: nf4_scales(nf4_absmax(&values, blocksize)?, double_quant)?,
        dtype: dtype.to_string(),
    })
}

/// The tensors `nf4_to_tensors` writes for `header`'s weight, in its order: `(suffix, dtype,
/// shape)`.
fn nf4_layout(header: &Nf4Tensor) -> Vec<(&'static str, Dtype, Vec<usize>)> {
    let numel = header.numel();
    let mut out = vec![
        ("", Dtype::U8, vec![numel.div_ceil(2), 1]),
        (".quant_map", Dtype::F32, vec![16]),
    ];
    match &header.scales {
        Nf4Scales::Double(dq) => {
            out.push((".absmax", Dtype::U8, vec![dq.absmax_q.len()]));
            out.push((".nested_absmax", Dtype::F32, vec![dq.nested_absmax.len()]));
            out.push((".nested_quant_map", Dtype::F32, vec![256]));
        }
        Nf4Scales::F32(absmax) => out.push((".absmax", Dtype::F32, vec![absmax.len()])),
    }
    let json_len = quant_state_json(header).len();
    out.push((QUANT_STATE_SUFFIX, Dtype::U8, vec![json_len]));
    out
}

/// Where [`quantize_model_dir`] reads tensors: a folder's checkpoint (views into its mapped
/// shards) or a GGUF file (each tensor dequantized to f32, Q/K rows in Hugging Face order, when
/// it is read).
enum Tensors<'a> {
    Folder(Checkpoint<'a>),
    Gguf(&'a GgufFile, &'a LlamaConfig),
}

impl Tensors<'_> {
    /// The tensor names in state-dict order.
    fn names(&self) -> Vec<String> {
        match self {
            Tensors::Folder(c) => ordered_names(c),
            Tensors::Gguf(_, config) => checkpoint_tensor_names(config),
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Tensors::Folder(c) => c.shard_of.contains_key(name),
            Tensors::Gguf(g, _) => gguf_name(name).is_some_and(|n| g.has_tensor(&n)),
        }
    }

    /// `f` of the tensor `name` (checked to be finite when `finite`; a GGUF tensor always is).
    fn with<R>(
        &self,
        name: &str,
        finite: bool,
        f: impl FnOnce(&TensorView<'_>) -> Result<R>,
    ) -> Result<R> {
        match self {
            Tensors::Folder(c) if finite => f(&c.finite_view(name)?),
            Tensors::Folder(c) => f(&c.view(name)?),
            Tensors::Gguf(g, config) => {
                let shape = hf_tensor_shape(config, name);
                let bytes = f32_bytes(&g.tensor_f32(name, &shape, config)?);
                let view =
                    TensorView::new(Dtype::F32, shape, &bytes).map_err(|e| Error::BadTensor {
                        key: name.to_string(),
                        reason: e.to_string(),
                    })?;
                f(&view)
            }
        }
    }
}

/// Quantizes the model `input` into the folder `output` (see the module docs): a dense Hugging
/// Face folder (a `quantization_config` already there is refused), or a llama.cpp GGUF file, whose
/// tensors are dequantized (the linears quantized from those f32 values, the rest written in f32)
/// and whose config and tokenizer files are those `qlora convert` writes. Linears are checked
/// against the config's shapes before anything is written.
///
/// Memory: one tensor at a time. safetensors orders a file's tensors by dtype, so a linear's F32
/// scales are written before its U8 codes: the layout and the F32 scales come from passes of
/// block maxima, and the codes are computed once, when the U8 tensors are written.
pub fn quantize_model_dir(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    options: &QuantizeDirOptions,
) -> Result<QuantizeDirSummary> {
    let (input, output) = (input.as_ref(), output.as_ref());
    crate::quant::nf4::check_blocksize("quantize_model_dir", options.blocksize)?;
    let source = ModelSource::open(input)?;
    let (mut raw_config, config) = source.config()?;
    if config.quantization.is_some() {
        return Err(Error::Config {
            field: "quantization_config",
            reason: "the model is already quantized".to_string(),
        });
    }
    let tensors_in = match &source {
        ModelSource::Folder(folder) => Tensors::Folder(folder.checkpoint()?),
        ModelSource::Gguf(g) => {
            raw_config.insert(
                "torch_dtype".into(),
                json!(torch_dtype_name(TorchDtype::F32)),
            );
            Tensors::Gguf(g, &config)
        }
    };
    // Every tensor the config implies must be there before anything is written: a folder with
    // one missing would otherwise quantize "successfully" into a model that cannot load.
    let missing: Vec<String> = checkpoint_tensor_names(&config)
        .into_iter()
        .filter(|name| !tensors_in.contains(name))
        .collect();
    if let Some(first) = missing.first() {
        return Err(Error::CorruptFile {
            path: input.to_path_buf(),
            reason: format!(
                "the checkpoint lacks {} tensor(s) its config implies, first `{first}`",
                missing.len()
            ),
        });
    }
    let names = tensors_in.names();

    // One quantized linear at a time, with the error sums of every linear seen so far.
    let cache: RefCell<Option<QuantizedModule>> = RefCell::new(None);
    let error_sums: RefCell<BTreeMap<String, (f64, f64)>> = RefCell::new(BTreeMap::new());
    let (tensors_in, cache, error_sums) = (&tensors_in, &cache, &error_sums);
    let (bs, dq) = (options.blocksize, options.double_quant);

    let mut tensors: Vec<OutTensor<'_>> = Vec::new();
    let (mut quantized, mut copied, mut bytes_in, mut parameters) = (0, 0, 0u64, 0u64);
    for name in &names {
        let linear = is_linear(name);
        // The dtype, shape and size of each tensor, and a linear's NF4 header (scales and quant
        // state, from a cheap pass of block maxima: enough to lay out its tensors now; the codes
        // are computed when the shard reaches them).
        let (dtype, shape, len, header) = tensors_in.with(name, true, |view| {
            let header = match linear {
                true => {
                    let module = name.trim_end_matches(".weight").rsplit('.').next();
                    let expected =
                        crate::model::config::linear_shape(&config, module.unwrap_or_default());
                    if view.shape() != expected {
                        return Err(Error::BadTensor {
                            key: name.clone(),
                            reason: format!(
                                "shape {:?}, the config gives {expected:?}",
                                view.shape()
                            ),
                        });
                    }
                    Some(nf4_header(name, view, bs, dq)?)
                }
                false => None,
            };
            Ok((
                view.dtype(),
                view.shape().to_vec(),
                view.data().len(),
                header,
            ))
        })?;
        bytes_in += len as u64;
        parameters += shape.iter().product::<usize>() as u64;
        let Some(header) = header else {
            copied += 1;
            let source = name.clone();
            tensors.push(OutTensor {
                name: name.clone(),
                dtype,
                shape,
                produce: Box::new(move || {
                    tensors_in.with(&source, false, |view| Ok(view.data().to_vec()))
                }),
            });
            continue;
        };
        let prefix = name.trim_end_matches(".weight").to_string();
        quantized += 1;
        for (suffix, dtype, shape) in nf4_layout(&header) {
            let key = format!("{name}{suffix}");
            let (prefix, source) = (prefix.clone(), name.clone());
            let produce: Box<dyn Fn() -> Result<Vec<u8>> + '_> = match suffix {
                ".quant_map" => Box::new(|| Ok(f32_bytes(&NF4_CODE))),
                ".nested_quant_map" => {
                    Box::new(|| Ok(f32_bytes(dynamic8::dynamic_map_signed_ref())))
                }
                ".nested_absmax" | ".absmax" if dtype == Dtype::F32 => Box::new(move || {
                    tensors_in.with(&source, false, |view| {
                        Ok(match nf4_header(&source, view, bs, dq)?.scales {
                            Nf4Scales::Double(d) => f32_bytes(&d.nested_absmax),
                            Nf4Scales::F32(absmax) => f32_bytes(&absmax),
                        })
                    })
                }),
                _ => Box::new(move || {
                    let mut slot = cache.borrow_mut();
                    if slot.as_ref().is_none_or(|(p, _)| *p != prefix) {
                        let (t, errors) = tensors_in.with(&source, false, |view| {
                            let t = quantize_view(&source, view, bs, dq)?;
                            let errors = nf4_error(&t, view)?;
                            Ok((t, errors))
                        })?;
                        error_sums.borrow_mut().insert(prefix.clone(), errors);
                        *slot = Some((prefix.clone(), nf4_to_tensors(&prefix, &t)?));
                    }
                    slot.iter()
                        .flat_map(|(_, parts)| parts)
                        .find(|(k, _)| *k == key)
                        .map(|(_, t)| t.data.clone())
                        .ok_or_else(|| Error::MissingTensor { key: key.clone() })
                }),
            };
            tensors.push(OutTensor {
                name: format!("{name}{suffix}"),
                dtype,
                shape,
                produce,
            });
        }
    }

    raw_config.insert(
        "quantization_config".to_string(),
        bnb_quantization_config(dq, options.compute_dtype),
    );
    prepare_output_dir(output, &[input])?;
    let written = write_checkpoint(output, tensors, options.max_shard_bytes, parameters)?;
    write_config(output, &raw_config)?;
    let copied_files = source.write_side_files(output)?;
    let (se, norm) = error_sums
        .borrow()
        .values()
        .fold((0.0, 0.0), |acc, v| (acc.0 + v.0, acc.1 + v.1));
    Ok(QuantizeDirSummary {
        files: written.files,
        quantized,
        copied,
        bytes_in,
        bytes_out: written.total_bytes,
        relative_error: if norm > 0.0 { (se / norm).sqrt() } else { 0.0 },
        copied_files,
    })
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    TorchDtype::F32.encode(values)
}

/// Squared error and squared norm of `t` dequantized to its original dtype against `view`.
fn nf4_error(t: &Nf4Tensor, view: &TensorView<'_>) -> Result<(f64, f64)> {
    let back = t.dequantize_original()?;
    let (mut se, mut norm) = (0f64, 0f64);
    for (w, b) in widen(view.dtype(), view.data()).zip(&back) {
        let d = f64::from(*b) - f64::from(w);
        se += d * d;
        norm += f64::from(w) * f64::from(w);
    }
    Ok((se, norm))
}
