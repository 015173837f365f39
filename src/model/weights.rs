//! Llama weights from a Hugging Face checkpoint directory: `model.safetensors`, or the shards
//! named by `model.safetensors.index.json`, memory-mapped and read one tensor at a time by HF name
//! (`model.layers.{i}.self_attn.q_proj.weight` `[heads·head_dim, hidden]`, ...).
//!
//! Memory: shards are mapped, not read, so their pages are file-backed and reclaimable. Each
//! tensor is converted (and, with [`LoadOptions::quantize`], NF4-quantized) on its own, so the heap
//! peak is the loaded result plus one tensor's converted copy — for a quantized model, the NF4
//! linears, the dense embeddings/norms/lm_head and one linear in f32 — never the bf16 model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};

use crate::hf::checkpoint::{map_file, shard_files, widen, Checkpoint};
use crate::model::adapter::TargetModule;
use crate::model::config::LlamaConfig;
use crate::model::gguf::GgufFile;
use crate::quant::bnb::{is_bnb_nf4, nf4_from_safetensors};
use crate::quant::nf4::Nf4Tensor;
use crate::{Error, Result};

/// Block size of quantize-on-load (bitsandbytes' default for `load_in_4bit`).
pub const NF4_LOAD_BLOCKSIZE: usize = 64;

/// A frozen linear weight `[out, in]`: dense, or NF4 as bitsandbytes stores it. Seven per layer,
/// so the inline 1 KiB nested map of `Nf4Tensor` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Linear {
    Dense(Tensor),
    Nf4(Nf4Tensor),
}

impl Linear {
    /// This linear with a dense weight on `device`; NF4 data stays in host memory (a model on a
    /// CUDA device keeps its own device copy, see `LlamaModel::new`).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            Linear::Dense(w) => Linear::Dense(w.to_device(device)?),
            Linear::Nf4(t) => Linear::Nf4(t.clone()),
        })
    }
}

/// One decoder layer's weights.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl LayerWeights {
    /// The frozen linear `module`.
    pub fn linear(&self, module: TargetModule) -> &Linear {
        match module {
            TargetModule::QProj => &self.q_proj,
            TargetModule::KProj => &self.k_proj,
            TargetModule::VProj => &self.v_proj,
            TargetModule::OProj => &self.o_proj,
            TargetModule::GateProj => &self.gate_proj,
            TargetModule::UpProj => &self.up_proj,
            TargetModule::DownProj => &self.down_proj,
        }
    }

    /// The frozen linear `module`, to replace (e.g. by its NF4 quantization).
    pub fn linear_mut(&mut self, module: TargetModule) -> &mut Linear {
        match module {
            TargetModule::QProj => &mut self.q_proj,
            TargetModule::KProj => &mut self.k_proj,
            TargetModule::VProj => &mut self.v_proj,
            TargetModule::OProj => &mut self.o_proj,
            TargetModule::GateProj => &mut self.gate_proj,
            TargetModule::UpProj => &mut self.up_proj,
            TargetModule::DownProj => &mut self.down_proj,
        }
    }

    /// These weights with every dense tensor on `device` ([`Linear::to_device`]).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            input_layernorm: self.input_layernorm.to_device(device)?,
            post_attention_layernorm: self.post_attention_layernorm.to_device(device)?,
            q_proj: self.q_proj.to_device(device)?,
            k_proj: self.k_proj.to_device(device)?,
            v_proj: self.v_proj.to_device(device)?,
            o_proj: self.o_proj.to_device(device)?,
            gate_proj: self.gate_proj.to_device(device)?,
            up_proj: self.up_proj.to_device(device)?,
            down_proj: self.down_proj.to_device(device)?,
        })
    }
}

/// Every weight of a Llama causal LM.
#[derive(Clone, Debug)]
pub struct LlamaWeights {
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `[hidden]`.
    pub norm: Tensor,
    /// `[vocab, hidden]`; `None` when tied to the embeddings.
    pub lm_head: Option<Tensor>,
}

/// Whether `name` is the weight of one of the seven linears of a decoder layer.
pub fn is_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((index, rest)) = rest.split_once('.') else {
        return false;
    };
    index.parse::<usize>().is_ok()
        && TargetModule::ALL
            .iter()
            .any(|m| rest == format!("{}.{}.weight", m.block(), m.name()))
}

/// How to load: dense tensors' dtype and device, and whether to quantize the seven linears. NF4
/// linears are read into host memory whatever the device; `LlamaModel::new` on a CUDA device
/// uploads them there once.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Dtype of dense tensors (F32, F16 or BF16); quantize-on-load quantizes values in this dtype,
    /// as bitsandbytes quantizes the weights `from_pretrained(torch_dtype=...)` loaded.
    pub dtype: DType,
    pub device: Device,
    /// Quantize every layer's seven linears to NF4 (blocksize 64, double quant); embeddings,
    /// norms and lm_head stay dense. Linears stored pre-quantized by bitsandbytes are NF4
    /// whatever this says, and are never requantized.
    pub quantize: bool,
}

impl LlamaWeights {
    /// The output projection: `lm_head`, or the embeddings when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// These weights with every dense tensor on `device` ([`Linear::to_device`]).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            embed_tokens: self.embed_tokens.to_device(device)?,
            layers: self
                .layers
                .iter()
                .map(|l| l.to_device(device))
                .collect::<Result<_>>()?,
            norm: self.norm.to_device(device)?,
            lm_head: self
                .lm_head
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
        })
    }

    /// Loads the checkpoint in `dir` for `config`. A missing tensor gives
    /// [`Error::MissingTensor`]; a wrong shape or dtype gives [`Error::BadTensor`], both naming it.
    pub fn load(
        dir: impl AsRef<Path>,
        config: &LlamaConfig,
        options: &LoadOptions,
    ) -> Result<Self> {
        check_load_dtype(options.dtype)?;
        let files = shard_files(dir.as_ref())?;
        let maps = files
            .iter()
            .map(|path| map_file(path))
            .collect::<Result<Vec<_>>>()?;
        let checkpoint = Checkpoint::new(&files, &maps)?;
        Loader {
            source: Source::Safetensors(checkpoint),
            config,
            options,
        }
        .load()
    }

    /// Loads the weights of the GGUF file `gguf` for `config` (its [`GgufFile::config`]): each
    /// tensor dequantized from its GGML type, converted to `options.dtype` and, with
    /// `options.quantize`, quantized to NF4 exactly as a safetensors checkpoint's would be.
    pub fn load_gguf(gguf: &GgufFile, config: &LlamaConfig, options: &LoadOptions) -> Result<Self> {
        check_load_dtype(options.dtype)?;
        Loader {
            source: Source::Gguf(gguf),
            config,
            options,
        }
        .load()
    }
}

fn check_load_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::invalid(
            "LlamaWeights::load",
            format!("dtype {other:?} is not f32, f16 or bf16"),
        )),
    }
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::BadTensor {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// One tensor's values converted to the load dtype.
enum HostValues {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// Converts `view` (F32, F16 or BF16) to `dtype` with round-to-nearest-even, as torch's `.to()`.
fn host_values(key: &str, view: &TensorView<'_>, dtype: DType) -> Result<HostValues> {
    let src = view.dtype();
    if !matches!(src, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(bad(key, format!("dtype {src:?} is not F32, F16 or BF16")));
    }
    let bytes = view.data();
    Ok(match dtype {
        DType::F16 => HostValues::F16(widen(src, bytes).map(f16::from_f32).collect()),
        DType::BF16 => HostValues::BF16(widen(src, bytes).map(bf16::from_f32).collect()),
        _ => HostValues::F32(widen(src, bytes).collect()),
    })
}

/// Where the loader reads tensors by Hugging Face name.
enum Source<'a> {
    /// `model.safetensors` or its shards.
    Safetensors(Checkpoint<'a>),
    /// A llama.cpp GGUF file (dequantized per tensor).
    Gguf(&'a GgufFile),
}

/// Quantize-on-load of one linear's values (already in the load dtype): blocks of
/// [`NF4_LOAD_BLOCKSIZE`], double quant, as bitsandbytes quantizes the tensor
/// `from_pretrained(torch_dtype=...)` loaded.
fn quantize_host(values: HostValues, shape: &[usize]) -> Result<Nf4Tensor> {
    let (bs, dq) = (NF4_LOAD_BLOCKSIZE, true);
    Ok(match values {
        HostValues::F32(v) => Nf4Tensor::quantize(&v, shape, bs, dq)?,
        HostValues::BF16(v) => Nf4Tensor::quantize_bf16(&v, shape, bs, dq)?,
        HostValues::F16(v) => {
            // f16 widens to f32 exactly, so this is bitsandbytes quantizing the f16 tensor.
            let widened: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
            drop(v);
            let mut t = Nf4Tensor::quantize(&widened, shape, bs, dq)?;
            t.dtype = "float16".to_string();
            t
        }
    })
}

/// The NF4 weight quantize-on-load makes of a linear whose stored values are `values` (widened to
/// f32) when the model loads in `dtype`: the codes and scales a training run with that dtype
/// trained against (what `qlora merge` merges into by default).
pub fn quantize_as_loaded(values: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Nf4Tensor> {
    check_load_dtype(dtype)?;
    let host = match dtype {
        DType::F16 => HostValues::F16(values.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => HostValues::BF16(values.into_iter().map(bf16::from_f32).collect()),
        _ => HostValues::F32(values),
    };
    quantize_host(host, shape)
}

struct Loader<'a, 'c> {
    source: Source<'a>,
    config: &'c LlamaConfig,
    options: &'c LoadOptions,
}

impl Loader<'_, '_> {
    fn load(&self) -> Result<LlamaWeights> {
        let c = self.config;
        let embed_tokens =
            self.dense("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| self.layer(i))
            .collect::<Result<Vec<_>>>()?;
        let norm = self.dense("model.norm.weight", &[c.hidden_size])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(self.dense("lm_head.weight", &[c.vocab_size, c.hidden_size])?)
        };
        Ok(LlamaWeights {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    fn layer(&self, i: usize) -> Result<LayerWeights> {
        let c = self.config;
        let (h, m) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let p = format!("model.layers.{i}");
        Ok(LayerWeights {
            input_layernorm: self.dense(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_attention_layernorm: self
                .dense(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            q_proj: self.linear(&format!("{p}.self_attn.q_proj"), [q, h])?,
            k_proj: self.linear(&format!("{p}.self_attn.k_proj"), [kv, h])?,
            v_proj: self.linear(&format!("{p}.self_attn.v_proj"), [kv, h])?,
            o_proj: self.linear(&format!("{p}.self_attn.o_proj"), [h, q])?,
            gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), [m, h])?,
            up_proj: self.linear(&format!("{p}.mlp.up_proj"), [m, h])?,
            down_proj: self.linear(&format!("{p}.mlp.down_proj"), [h, m])?,
        })
    }

    /// The values of `key`, checked to have `shape` and to be finite, in the load dtype.
    fn values(&self, key: &str, shape: &[usize]) -> Result<HostValues> {
        let checkpoint = match &self.source {
            Source::Safetensors(c) => c,
            Source::Gguf(g) => {
                let v = g.tensor_f32(key, shape, self.config)?;
                return Ok(match self.options.dtype {
                    DType::F16 => HostValues::F16(v.into_iter().map(f16::from_f32).collect()),
                    DType::BF16 => HostValues::BF16(v.into_iter().map(bf16::from_f32).collect()),
                    _ => HostValues::F32(v),
                });
            }
        };
        let view = checkpoint.finite_view(key)?;
        if view.shape() != shape {
            return Err(bad(
                key,
                format!("shape {:?}, expected {shape:?}", view.shape()),
            ));
        }
        host_values(key, &view, self.options.dtype)
    }

    fn dense(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = match self.values(key, shape)? {
            HostValues::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
            HostValues::F16(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
            HostValues::BF16(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
        };
        Ok(tensor.to_device(&self.options.device)?)
    }

    fn linear(&self, prefix: &str, shape: [usize; 2]) -> Result<Linear> {
        let key = format!("{prefix}.weight");
        if let Source::Safetensors(checkpoint) = &self.source {
            if is_bnb_nf4(checkpoint, prefix) {
                return self.bnb_nf4(checkpoint, prefix, &key, shape);
            }
        }
        if !self.options.quantize {
            return Ok(Linear::Dense(self.dense(&key, &shape)?));
        }
        Ok(Linear::Nf4(quantize_host(
            self.values(&key, &shape)?,
            &shape,
        )?))
    }

    /// A linear stored NF4 by bitsandbytes, as stored.
    fn bnb_nf4(
        &self,
        checkpoint: &Checkpoint<'_>,
        prefix: &str,
        key: &str,
        shape: [usize; 2],
    ) -> Result<Linear> {
        // The codes are integers; a NaN can only hide in the f32 scales and code tables.
        for suffix in [
            ".absmax",
            ".nested_absmax",
            ".quant_map",
            ".nested_quant_map",
        ] {
            let scale_key = format!("{key}{suffix}");
            if checkpoint.shard_of.contains_key(&scale_key) {
                checkpoint.finite_view(&scale_key)?;
            }
        }
        let t = nf4_from_safetensors(checkpoint, prefix)?;
        if t.shape != shape {
            return Err(bad(
                key,
                format!("NF4 shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        Ok(Linear::Nf4(t))
    }
}
