//! The KV cache of generation: per decoder layer, the keys (after RoPE) and values
//! `[B, kv_heads, S, head_dim]` of every token seen so far, stored in the compute dtype. The
//! forward (`model::llama`) appends to it; `model::generate` owns one per call.

use candle_core::{DType, Tensor};

use crate::Result;

/// One layer's cached keys and values `[B, kv_heads, S, head_dim]` in the compute dtype.
#[derive(Clone, Debug, Default)]
pub struct LayerKvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKvCache {
    /// Appends this step's keys and values `[B, kv_heads, T, head_dim]` (f32 holding compute-dtype
    /// values) and returns all of them, cached and new, in f32. Storing them in the compute dtype
    /// is exact, as they are already rounded to it.
    pub(crate) fn append(
        &mut self,
        keys: &Tensor,
        values: &Tensor,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (keys, values) = (keys.to_dtype(dtype)?, values.to_dtype(dtype)?);
        let (keys, values) = match self.kv.take() {
            Some((k, v)) => (
                Tensor::cat(&[&k, &keys], 2)?,
                Tensor::cat(&[&v, &values], 2)?,
            ),
            None => (keys, values),
        };
        let all = (keys.to_dtype(DType::F32)?, values.to_dtype(DType::F32)?);
        self.kv = Some((keys, values));
        Ok(all)
    }
}

/// The KV cache of a whole model: one [`LayerKvCache`] per decoder layer, all holding the same
/// batch and length.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKvCache::default(); num_layers],
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The cached keys and values `[B, kv_heads, S, head_dim]` of `layer`, None while empty.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.kv.as_ref().map(|(k, v)| (k, v))
    }

    /// The number of tokens cached (S), 0 while empty.
    pub fn seq_len(&self) -> usize {
        self.layer(0).map_or(0, |(k, _)| k.dims()[2])
    }

    /// The batch the cache holds, None while empty.
    pub fn batch_size(&self) -> Option<usize> {
        self.layer(0).map(|(k, _)| k.dims()[0])
    }

    pub(crate) fn layers_mut(&mut self) -> &mut [LayerKvCache] {
        &mut self.layers
    }
}
