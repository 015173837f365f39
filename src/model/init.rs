//! Llama weights made in memory instead of read from a checkpoint: every matrix drawn from
//! normal(0, `initializer_range`) and every RMSNorm weight 1, as transformers' `_init_weights`
//! does for a fresh `LlamaForCausalLM`; optionally the seven linears of each layer quantized to NF4.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::model::config::LlamaConfig;
use crate::model::weights::{LayerWeights, Linear, LlamaWeights};
use crate::quant::nf4::Nf4Tensor;
use crate::{Error, Result};

/// transformers' `initializer_range` default for Llama.
pub const DEFAULT_INITIALIZER_RANGE: f32 = 0.02;

impl LlamaWeights {
    /// A randomly initialised model for `config`, dense in `dtype` (F32 or BF16) on `device`,
    /// matrices drawn with standard deviation `initializer_range` (see
    /// [`DEFAULT_INITIALIZER_RANGE`]). Values come from one `StdRng` seeded with `seed`, in
    /// checkpoint order: embeddings, then each layer's q, k, v, o, gate, up, down, then lm_head
    /// (absent when tied).
    pub fn random(
        config: &LlamaConfig,
        initializer_range: f32,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::invalid(
                "LlamaWeights::random",
                format!("dtype {dtype:?} is not f32 or bf16"),
            ));
        }
        let normal = Normal::new(0.0f32, initializer_range)
            .map_err(|e| Error::invalid("LlamaWeights::random", e.to_string()))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut matrix = |rows: usize, cols: usize| -> Result<Tensor> {
            let values: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
            Ok(Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype)?)
        };
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let q_out = config.num_attention_heads * config.head_dim;
        let kv_out = config.num_key_value_heads * config.head_dim;
        let embed_tokens = matrix(v, h)?;
        let ones = Tensor::ones(h, dtype, device)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            layers.push(LayerWeights {
                input_layernorm: ones.clone(),
                post_attention_layernorm: ones.clone(),
                q_proj: Linear::Dense(matrix(q_out, h)?),
                k_proj: Linear::Dense(matrix(kv_out, h)?),
                v_proj: Linear::Dense(matrix(kv_out, h)?),
                o_proj: Linear::Dense(matrix(h, q_out)?),
                gate_proj: Linear::Dense(matrix(i, h)?),
                up_proj: Linear::Dense(matrix(i, h)?),
                down_proj: Linear::Dense(matrix(h, i)?),
            });
        }
        let lm_head = match config.tie_word_embeddings {
            true => None,
            false => Some(matrix(v, h)?),
        };
        Ok(LlamaWeights {
            embed_tokens,
            layers,
            norm: ones,
            lm_head,
        })
    }

    /// Every dense linear of every layer quantized to NF4 (`blocksize`, optional double
    /// quantization), as quantize-on-load does; embeddings, norms and lm_head stay dense.
    pub fn quantize_linears(mut self, blocksize: usize, double_quant: bool) -> Result<Self> {
        for layer in &mut self.layers {
            for linear in [
                &mut layer.q_proj,
                &mut layer.k_proj,
                &mut layer.v_proj,
                &mut layer.o_proj,
                &mut layer.gate_proj,
                &mut layer.up_proj,
                &mut layer.down_proj,
            ] {
                if let Linear::Dense(w) = linear {
                    let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    let mut q = Nf4Tensor::quantize(&values, w.dims(), blocksize, double_quant)?;
                    if w.dtype() == DType::BF16 {
                        q.dtype = "bfloat16".to_string();
                    }
                    *linear = Linear::Nf4(q);
                }
            }
        }
        Ok(self)
    }
}
