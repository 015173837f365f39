//! Merging a LoRA adapter into its base model for export: `W' = W + s·(B·A)` for every adapted
//! linear `[out, in]` (A `[r, in]`, B `[out, r]`), computed in f32 from the base's stored values
//! (dense f32/bf16/f16 widened, or NF4 dequantized to its original dtype as the forward uses it),
//! and written one tensor at a time as a dense Hugging Face model folder in f32, f16 or bf16.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::hf::checkpoint::widen;
use crate::hf::folder::{
    ordered_names, prepare_output_dir, state_dict_order, write_checkpoint, write_config, OutTensor,
    DEFAULT_MAX_SHARD_BYTES,
};
use crate::model::config::{checkpoint_tensor_names, torch_dtype_name, LlamaConfig, TorchDtype};
use crate::model::gguf::{gguf_name, hf_tensor_shape};
use crate::model::source::ModelSource;
use crate::model::weights::{is_linear, quantize_as_loaded, NF4_LOAD_BLOCKSIZE};
use crate::peft::base_record::{BaseLinears, BaseRecord, BASE_RECORD_FILE};
use crate::peft::lora::{LoraAdapter, LoraPair, TargetModule};
use crate::quant::bnb::{nf4_from_safetensors, weight_key, QUANT_STATE_SUFFIX};
use crate::quant::nf4::Nf4Tensor;
use crate::{Error, Result};

/// How to write the merged model.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Dtype of every floating-point tensor written (and the config's `torch_dtype`).
    pub dtype: TorchDtype,
    /// Shard size limit in bytes (huggingface_hub's rule; see `hf_folder::plan_shards`).
    pub max_shard_bytes: u64,
    /// Measure what re-quantizing each merged linear to NF4 would cost (see [`RequantizeReport`]).
    pub requantize_report: bool,
    /// Which base weights a dense base's linears are merged into when the adapter's
    /// [`BaseRecord`] says it trained against NF4 quantized on load.
    pub base_weights: BaseWeights,
}

/// The base weights an adapter is merged into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BaseWeights {
    /// Those the adapter was trained against ([`BaseRecord`]): a dense base quantized to NF4
    /// and dequantized exactly as the training run's loader did, when it trained on NF4.
    #[default]
    Trained,
    /// The base folder's weights as stored, whatever the adapter trained against.
    Original,
}

impl Default for MergeOptions {
    /// bf16, 5 GB shards, no report.
    fn default() -> Self {
        Self {
            dtype: TorchDtype::BF16,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            requantize_report: false,
            base_weights: BaseWeights::Trained,
        }
    }
}

/// Error of re-quantizing merged weights `w` to NF4 and back, `q`: relative Frobenius error
/// `‖q − w‖ / ‖w‖` and the largest `|q − w|`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequantError {
    pub relative_error: f64,
    pub max_abs_error: f64,
}

/// [`RequantError`] of one linear of the merged model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModuleRequantError {
    /// The weight's checkpoint name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Whether the adapter changed it (an untargeted linear is the base's own weight).
    pub merged: bool,
    pub numel: usize,
    #[serde(flatten)]
    pub error: RequantError,
}

/// What `qlora quantize` (NF4, blocks of 64, double quant) would lose on the merged model: each
/// linear of every layer as written (in the output dtype) quantized, dequantized to that dtype
/// and compared with itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequantizeReport {
    pub quant_type: &'static str,
    pub blocksize: usize,
    pub double_quant: bool,
    /// The merged weights' dtype.
    pub dtype: &'static str,
    pub modules: Vec<ModuleRequantError>,
    pub overall: RequantError,
}

/// What a merge wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    /// The safetensors files, in shard order (an index is beside them when there are several).
    pub files: Vec<PathBuf>,
    pub total_bytes: u64,
    /// Linears that received `s·B·A`.
    pub merged_modules: usize,
    /// Linears the base stored in NF4 (all dequantized in the output).
    pub nf4_modules: usize,
    /// Tokenizer and generation files copied from the base.
    pub copied_files: Vec<String>,
    pub report: Option<RequantizeReport>,
    /// What the adapter's [`BaseRecord`] says it trained against (`None`: no record).
    pub record: Option<BaseRecord>,
    /// Dense linears merged into their NF4-on-load form (the default for an adapter trained so).
    pub requantized_modules: usize,
    /// With [`BaseWeights::Original`] on an adapter trained against NF4: the relative RMS
    /// difference between the merged linears' original weights and the NF4 weights training saw.
    pub original_vs_trained: Option<f64>,
}

/// `s·(B·A)` `[out, in]` row-major: the product summed in f32, then scaled, as PEFT's
/// `get_delta_weight` computes it on the CPU; for a bf16 or f16 adapter (whose A and B it widens
/// to f32 first) the delta is then rounded back to the adapter's dtype before it is added.
pub fn lora_delta(pair: &LoraPair, scaling: f64) -> Result<Vec<f32>> {
    let a = pair.a.to_dtype(DType::F32)?;
    let b = pair.b.to_dtype(DType::F32)?;
    let ba = b.matmul(&a)?;
    let s = scaling as f32;
    let mut delta: Vec<f32> = ba
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v * s)
        .collect();
    match pair.b.dtype() {
        DType::BF16 => round_to(TorchDtype::BF16, &mut delta),
        DType::F16 => round_to(TorchDtype::F16, &mut delta),
        _ => {}
    }
    Ok(delta)
}

/// Rounds `values` to `dtype` in place (round-to-nearest-even, as torch's `.to()`).
fn round_to(dtype: TorchDtype, values: &mut [f32]) {
    match dtype {
        TorchDtype::F32 => {}
        TorchDtype::BF16 => values
            .iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        TorchDtype::F16 => values
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v).to_f32()),
    }
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Sums for the report: squared error, squared norm and max |error| per module.
#[derive(Default)]
struct ReportSums {
    modules: Vec<(ModuleRequantError, f64, f64)>,
}

fn requant_error(values: &[f32], shape: &[usize], dtype: TorchDtype) -> Result<(f64, f64, f64)> {
    let mut q = Nf4Tensor::quantize(values, shape, NF4_LOAD_BLOCKSIZE, true)?;
    q.dtype = torch_dtype_name(dtype).to_string();
    let back = q.dequantize_original()?;
    let (mut se, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
    for (&w, &b) in values.iter().zip(&back) {
        let d = f64::from(b) - f64::from(w);
        se += d * d;
        norm += f64::from(w) * f64::from(w);
        max_abs = max_abs.max(d.abs());
    }
    Ok((se, norm, max_abs))
}

fn relative(se: f64, norm: f64) -> f64 {
    if norm > 0.0 {
        (se / norm).sqrt()
    } else if se > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Where a linear's base values come from.
#[derive(Clone)]
enum BaseLinear {
    /// Stored dense (a folder's F32/F16/BF16 tensor, or a GGUF tensor dequantized), by name.
    Stored(String),
    /// A folder's bitsandbytes NF4 weight, by module prefix.
    Nf4(String),
}

/// A merged model ready to be written: its config and its tensors in Hugging Face names and
/// order, each produced (merged, converted) when the writer asks for it.
pub struct MergedModel<'a> {
    pub base: &'a ModelSource,
    pub config: &'a LlamaConfig,
    /// `config.json` without `quantization_config`, with `torch_dtype` set to the output dtype.
    pub raw_config: Map<String, Value>,
    pub tensors: Vec<OutTensor<'a>>,
    /// Elements over all tensors.
    pub parameters: u64,
}

/// What merging did, whatever was written.
#[derive(Clone, Debug, Default)]
pub struct MergeStats {
    pub merged_modules: usize,
    pub nf4_modules: usize,
    pub report: Option<RequantizeReport>,
    pub record: Option<BaseRecord>,
    pub requantized_modules: usize,
    pub original_vs_trained: Option<f64>,
}

/// Reads the PEFT adapter in `adapter_dir` and merges it into the model in `base_dir`, writing
/// the merged model folder `out_dir` (see [`merge_adapter`]).
pub fn merge_adapter_dir(
    base_dir: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    options: &MergeOptions,
) -> Result<MergeSummary> {
    let adapter_dir = adapter_dir.as_ref();
    let (adapter, record) = read_adapter(adapter_dir)?;
    let base = ModelSource::open(base_dir.as_ref())?;
    write_folder(
        &base,
        &adapter,
        out_dir.as_ref(),
        options,
        record,
        &[adapter_dir],
    )
}

/// The adapter in `dir` and its [`BaseRecord`] (`None`: it has none).
pub fn read_adapter(dir: &Path) -> Result<(LoraAdapter, Option<BaseRecord>)> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the adapter folder does not exist",
            ),
        ));
    }
    let adapter = LoraAdapter::load_pretrained(dir, &Device::Cpu)?;
    Ok((adapter, BaseRecord::read(dir)?))
}

/// Merges `adapter` into the model in `base_dir` (a folder or a GGUF file) and writes `out_dir`:
/// every floating-point tensor in `options.dtype` (each adapted linear `W + s·B·A`, NF4 linears
/// dequantized, other tensors converted, non-float tensors copied), sharded by
/// `options.max_shard_bytes`, `config.json` without `quantization_config` and with `torch_dtype`
/// set, and the tokenizer files.
///
/// Everything is checked before the first byte is written: an adapter whose layer count or
/// shapes do not fit gives [`Error::AdapterMismatch`], a missing base tensor
/// [`Error::MissingTensor`], a malformed one [`Error::BadTensor`].
pub fn merge_adapter(
    base_dir: impl AsRef<Path>,
    adapter: &LoraAdapter,
    out_dir: impl AsRef<Path>,
    options: &MergeOptions,
) -> Result<MergeSummary> {
    let base = ModelSource::open(base_dir.as_ref())?;
    write_folder(&base, adapter, out_dir.as_ref(), options, None, &[])
}

fn write_folder(
    base: &ModelSource,
    adapter: &LoraAdapter,
    out_dir: &Path,
    options: &MergeOptions,
    record: Option<BaseRecord>,
    other_inputs: &[&Path],
) -> Result<MergeSummary> {
    let ((written, copied_files), stats) =
        merge_with(base, Some(adapter), options, record, |merged| {
            let mut inputs = vec![merged.base.path()];
            inputs.extend_from_slice(other_inputs);
            prepare_output_dir(out_dir, &inputs)?;
            let written = write_checkpoint(
                out_dir,
                merged.tensors,
                options.max_shard_bytes,
                merged.parameters,
            )?;
            write_config(out_dir, &merged.raw_config)?;
            let copied = merged.base.write_side_files(out_dir)?;
            Ok((written, copied))
        })?;
    Ok(MergeSummary {
        files: written.files,
        total_bytes: written.total_bytes,
        merged_modules: stats.merged_modules,
        nf4_modules: stats.nf4_modules,
        copied_files,
        report: stats.report,
        record: stats.record,
        requantized_modules: stats.requantized_modules,
        original_vs_trained: stats.original_vs_trained,
    })
}

/// Merges `adapter` (none: the base as it is) into `base` and hands the merged model to `sink`,
/// which writes it (a folder, a GGUF file); the tensors are produced while `sink` runs, so the
/// returned [`MergeStats`] are complete only after it.
pub fn merge_with<R>(
    base: &ModelSource,
    adapter: Option<&LoraAdapter>,
    options: &MergeOptions,
    record: Option<BaseRecord>,
    sink: impl FnOnce(MergedModel<'_>) -> Result<R>,
) -> Result<(R, MergeStats)> {
    // The load dtype in which a dense linear is quantized to rebuild the NF4 weights training
    // saw, for an adapter whose record says it trained on NF4 quantized on load.
    let trained_nf4 = match &record {
        Some(r) if r.linears == BaseLinears::Nf4OnLoad => {
            if r.blocksize != Some(NF4_LOAD_BLOCKSIZE) || r.double_quant == Some(false) {
                return Err(Error::AdapterConfig {
                    field: "blocksize",
                    reason: format!(
                        "{BASE_RECORD_FILE} records NF4 blocks of {:?}, double quant {:?}; qlora \
                         quantizes on load in blocks of {NF4_LOAD_BLOCKSIZE} with double quant",
                        r.blocksize, r.double_quant
                    ),
                });
            }
            Some(match r.quantized_from.as_deref() {
                Some("bfloat16") => DType::BF16,
                Some("float16") => DType::F16,
                Some("float32") => DType::F32,
                other => {
                    return Err(Error::AdapterConfig {
                        field: "quantized_from",
                        reason: format!("{other:?} in {BASE_RECORD_FILE} is not a float dtype"),
                    })
                }
            })
        }
        _ => None,
    };
    let requantize_in = trained_nf4.filter(|_| options.base_weights == BaseWeights::Trained);
    let compare_in = trained_nf4.filter(|_| options.base_weights == BaseWeights::Original);
    let requantized = RefCell::new(0usize);
    let change = RefCell::new((0f64, 0f64));
    let (mut raw_config, config) = base.config()?;
    if let Some(adapter) = adapter {
        adapter.check_fits(&config).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => Error::AdapterMismatch { reason },
            other => other,
        })?;
    }
    let (checkpoint, gguf) = match base {
        ModelSource::Folder(f) => (Some(f.checkpoint()?), None),
        ModelSource::Gguf(g) => (None, Some(g)),
    };
    let names = match &checkpoint {
        Some(c) => ordered_names(c),
        None => checkpoint_tensor_names(&config),
    };

    let mut nf4_prefixes = BTreeSet::new();
    for name in &names {
        if let Some(prefix) = name.strip_suffix(&weight_key("", QUANT_STATE_SUFFIX)) {
            nf4_prefixes.insert(prefix.trim_end_matches('.').to_string());
        } else if name.contains(".weight.quant_state.") {
            return Err(Error::BadTensor {
                key: name.clone(),
                reason: "only bitsandbytes NF4 weights can be merged into".to_string(),
            });
        }
    }
    // Every NF4 weight is read back (and checked) now, so a malformed one fails before writing.
    let mut nf4_shapes = HashMap::new();
    if let Some(checkpoint) = &checkpoint {
        for prefix in &nf4_prefixes {
            nf4_shapes.insert(
                prefix.clone(),
                nf4_from_safetensors(checkpoint, prefix)?.shape,
            );
        }
    }

    let scaling = adapter.map_or(1.0, |a| a.config().scaling());
    let mut targets: HashMap<String, &LoraPair> = HashMap::new();
    for ((layer, module), pair) in adapter.iter().flat_map(|a| a.pairs()) {
        let prefix = linear_prefix(layer, module);
        let shape = module.shape(&config).to_vec();
        let base_shape = match (nf4_shapes.get(&prefix), &checkpoint) {
            (Some(s), _) => s.clone(),
            (None, Some(checkpoint)) => {
                let key = weight_key(&prefix, "");
                let view = checkpoint.view(&key)?;
                if !is_float(view.dtype()) {
                    return Err(Error::BadTensor {
                        key,
                        reason: format!("dtype {:?} is not F32, F16 or BF16", view.dtype()),
                    });
                }
                view.shape().to_vec()
            }
            (None, None) => {
                let key = weight_key(&prefix, "");
                let g = gguf.ok_or_else(|| Error::MissingTensor { key: key.clone() })?;
                let name = gguf_name(&key).unwrap_or_default();
                g.tensor_shape(&name)
                    .ok_or_else(|| Error::MissingTensor { key: key.clone() })?
                    .to_vec()
            }
        };
        if base_shape != shape {
            return Err(Error::BadTensor {
                key: weight_key(&prefix, ""),
                reason: format!("shape {base_shape:?}, the config gives {shape:?}"),
            });
        }
        targets.insert(prefix, pair);
    }

    let dtype = options.dtype;
    let report = RefCell::new(ReportSums::default());
    let want_report = options.requantize_report;
    let checkpoint = &checkpoint;
    let config_ref = &config;
    // A stored tensor's values widened to f32 (a GGUF tensor dequantized, rows unpermuted).
    let stored = move |key: &str, shape: &[usize]| -> Result<Vec<f32>> {
        match (checkpoint, gguf) {
            (Some(c), _) => {
                let view = c.view(key)?;
                Ok(widen(view.dtype(), view.data()).collect())
            }
            (None, Some(g)) => g.tensor_f32(key, shape, config_ref),
            (None, None) => Err(Error::MissingTensor { key: key.into() }),
        }
    };
    let report_ref = &report;
    let (requantized_ref, change_ref) = (&requantized, &change);
    let linear_tensor = |name: &str, source: BaseLinear, shape: Vec<usize>| -> OutTensor<'_> {
        let prefix = name.trim_end_matches(".weight").to_string();
        let pair = targets.get(&prefix).copied();
        let out_name = name.to_string();
        OutTensor {
            name: name.to_string(),
            dtype: dtype.safetensors(),
            shape: shape.clone(),
            produce: Box::new(move || {
                let mut w: Vec<f32> = match &source {
                    BaseLinear::Nf4(prefix) => match checkpoint {
                        Some(c) => nf4_from_safetensors(c, prefix)?.dequantize_original()?,
                        None => {
                            return Err(Error::MissingTensor {
                                key: prefix.clone(),
                            })
                        }
                    },
                    BaseLinear::Stored(key) => {
                        let w = stored(key, &shape)?;
                        match requantize_in {
                            Some(dtype) => {
                                *requantized_ref.borrow_mut() += 1;
                                quantize_as_loaded(w, &shape, dtype)?.dequantize_original()?
                            }
                            None if compare_in.is_some() => {
                                let dtype = compare_in.unwrap_or(DType::F32);
                                let q = quantize_as_loaded(w.clone(), &shape, dtype)?
                                    .dequantize_original()?;
                                let mut c = change_ref.borrow_mut();
                                for (a, b) in w.iter().zip(&q) {
                                    c.0 += f64::from(a - b).powi(2);
                                    c.1 += f64::from(*b).powi(2);
                                }
                                w
                            }
                            None => w,
                        }
                    }
                };
                if let Some(pair) = pair {
                    let delta = lora_delta(pair, scaling)?;
                    for (w, d) in w.iter_mut().zip(&delta) {
                        *w += *d;
                    }
                }
                round_to(dtype, &mut w);
                if want_report {
                    let (se, norm, max_abs) = requant_error(&w, &shape, dtype)?;
                    report_ref.borrow_mut().modules.push((
                        ModuleRequantError {
                            name: out_name.clone(),
                            merged: pair.is_some(),
                            numel: w.len(),
                            error: RequantError {
                                relative_error: relative(se, norm),
                                max_abs_error: max_abs,
                            },
                        },
                        se,
                        norm,
                    ));
                }
                Ok(dtype.encode(&w))
            }),
        }
    };

    let mut tensors = Vec::new();
    let mut parameters = 0u64;
    for name in &names {
        if let Some(i) = name.find(".weight.") {
            if nf4_prefixes.contains(&name[..i]) {
                continue; // an NF4 weight's state; the weight itself is written dense
            }
        }
        let prefix = name.strip_suffix(".weight");
        let tensor = match (prefix.filter(|p| nf4_prefixes.contains(*p)), checkpoint) {
            (Some(p), _) => {
                linear_tensor(name, BaseLinear::Nf4(p.to_string()), nf4_shapes[p].clone())
            }
            (None, Some(checkpoint)) => {
                let view = checkpoint.view(name)?;
                if !is_float(view.dtype()) {
                    copied_tensor(name, view)
                } else if prefix.is_some_and(|p| targets.contains_key(p)) || is_linear(name) {
                    linear_tensor(
                        name,
                        BaseLinear::Stored(name.clone()),
                        view.shape().to_vec(),
                    )
                } else {
                    converted_tensor(name, view, dtype)
                }
            }
            (None, None) => {
                let shape = hf_tensor_shape(&config, name);
                if is_linear(name) {
                    linear_tensor(name, BaseLinear::Stored(name.clone()), shape)
                } else {
                    let (key, stored) = (name.clone(), &stored);
                    OutTensor {
                        name: name.clone(),
                        dtype: dtype.safetensors(),
                        shape: shape.clone(),
                        produce: Box::new(move || {
                            let mut values = stored(&key, &shape)?;
                            round_to(dtype, &mut values);
                            Ok(dtype.encode(&values))
                        }),
                    }
                }
            }
        };
        parameters += tensor.shape.iter().product::<usize>() as u64;
        tensors.push(tensor);
    }

    let dtype_name = torch_dtype_name(dtype);
    raw_config.remove("quantization_config");
    let mut set = false;
    for key in ["torch_dtype", "dtype"] {
        if raw_config.contains_key(key) {
            raw_config.insert(key.to_string(), Value::from(dtype_name));
            set = true;
        }
    }
    if !set {
        raw_config.insert("torch_dtype".to_string(), Value::from(dtype_name));
    }

    let out = sink(MergedModel {
        base,
        config: &config,
        raw_config,
        tensors,
        parameters,
    })?;

    let report = want_report.then(|| {
        let mut modules = report.into_inner().modules;
        modules.sort_by(|a, b| {
            state_dict_order(&a.0.name)
                .cmp(&state_dict_order(&b.0.name))
                .then_with(|| a.0.name.cmp(&b.0.name))
        });
        let se: f64 = modules.iter().map(|m| m.1).sum();
        let norm: f64 = modules.iter().map(|m| m.2).sum();
        let max_abs = modules
            .iter()
            .map(|m| m.0.error.max_abs_error)
            .fold(0.0, f64::max);
        RequantizeReport {
            quant_type: "nf4",
            blocksize: NF4_LOAD_BLOCKSIZE,
            double_quant: true,
            dtype: dtype_name,
            modules: modules.into_iter().map(|m| m.0).collect(),
            overall: RequantError {
                relative_error: relative(se, norm),
                max_abs_error: max_abs,
            },
        }
    });
    let stats = MergeStats {
        merged_modules: targets.len(),
        nf4_modules: nf4_prefixes.len(),
        report,
        record,
        requantized_modules: requantized.into_inner(),
        original_vs_trained: compare_in.map(|_| {
            let (diff, norm) = change.into_inner();
            relative(diff, norm)
        }),
    };
    Ok((out, stats))
}

/// `model.layers.{layer}.{block}.{module}`.
pub fn linear_prefix(layer: usize, module: TargetModule) -> String {
    format!("model.layers.{layer}.{}.{}", module.block(), module.name())
}

fn copied_tensor<'a>(name: &str, view: TensorView<'a>) -> OutTensor<'a> {
    OutTensor {
        name: name.to_string(),
        dtype: view.dtype(),
        shape: view.shape().to_vec(),
        produce: Box::new(move || Ok(view.data().to_vec())),
    }
}

fn converted_tensor<'a>(name: &str, view: TensorView<'a>, dtype: TorchDtype) -> OutTensor<'a> {
    OutTensor {
        name: name.to_string(),
        dtype: dtype.safetensors(),
        shape: view.shape().to_vec(),
        produce: Box::new(move || {
            if view.dtype() == dtype.safetensors() {
                return Ok(view.data().to_vec()); // the round trip through f32 is the identity
            }
            let mut values: Vec<f32> = widen(view.dtype(), view.data()).collect();
            round_to(dtype, &mut values);
            Ok(dtype.encode(&values))
        }),
    }
}
