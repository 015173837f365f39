//! The causal-LM loss and its gradient through the chunked cross-entropy kernels
//! (`kernels/cross_entropy.cu`): lm_head's logits are made a chunk of rows at a time, their loss
//! taken and overwritten with dL/dlogits in place, and pulled back to dL/d(final norm output), so
//! the whole `[B · T, V]` logits never exist at once.

use candle_core::{DType, Tensor};
use half::bf16;

use crate::kernels::cross_entropy::{self as ce, IGNORE_INDEX};
use crate::model::fused::{on_device, FusedElement, Kernels, TensorDevice};
use crate::model::llama::LlamaModel;
use crate::model::matmul::{matmul, Weight};
use crate::{Error, Result};

/// The most bytes one chunk's f32 logits `[rows, V]` take: 64 MiB is 512 rows of a 32000-token
/// vocabulary, large enough that lm_head's GEMMs stay efficient.
pub(crate) const LOSS_CHUNK_BYTES: usize = 64 << 20;

/// Rows per chunk for a vocabulary of `vocab`: as many as fit [`LOSS_CHUNK_BYTES`], at least one.
pub(crate) fn chunk_rows(vocab: usize) -> usize {
    (LOSS_CHUNK_BYTES / (vocab.max(1) * std::mem::size_of::<f32>())).max(1)
}

/// The mean loss over the label tokens, their count, and dL/dnormed `[B, T, hidden]` (f32).
pub(crate) struct ChunkedLoss {
    pub loss: f32,
    pub label_tokens: usize,
    pub dnormed: Tensor,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("chunked loss", reason)
}

/// Each row's target: row `i − 1` predicts label `i` of the same sequence, as
/// [`LlamaModel::loss`]; a sequence's last row and rows before an [`IGNORE_INDEX`] label get
/// [`IGNORE_INDEX`]. Every label must be [`IGNORE_INDEX`] or below `vocab`.
fn shifted_targets(labels: &Tensor, vocab: usize) -> Result<Vec<i32>> {
    let (_, t) = labels.dims2()?;
    if labels.dtype() != DType::I64 {
        return Err(invalid(format!("labels are {:?}, not i64", labels.dtype())));
    }
    let labels = labels.flatten_all()?.to_vec1::<i64>()?;
    let mut targets = vec![IGNORE_INDEX; labels.len()];
    for (i, &label) in labels.iter().enumerate() {
        if label == i64::from(IGNORE_INDEX) {
            continue;
        }
        if label < 0 || label as u64 >= vocab as u64 {
            return Err(invalid(format!(
                "label {label} at {i} is neither {IGNORE_INDEX} nor below vocab {vocab}"
            )));
        }
        if i % t != 0 {
            targets[i - 1] = label as i32;
        }
    }
    Ok(targets)
}

/// The causal-LM loss of `normed` `[B, T, hidden]` (the final norm's output, in the compute
/// dtype) against `labels` `[B, T]` (i64) through lm_head, `chunk` rows at a time:
/// logits_c = normed_c · lm_headᵀ rounded to the compute dtype, the per-row losses (summed in f64
/// in row order), dlogits_c = (softmax − onehot) / count in place, and dnormed_c = dlogits_c ·
/// lm_head. Chunks without a label token are skipped (their gradient is zero).
pub(crate) fn causal_lm_loss(
    model: &LlamaModel,
    normed: &Tensor,
    labels: &Tensor,
    chunk: usize,
) -> Result<ChunkedLoss> {
    let (b, t, h) = normed.dims3()?;
    if labels.dims() != [b, t] {
        return Err(invalid(format!(
            "labels are {:?}, expected [{b}, {t}]",
            labels.dims()
        )));
    }
    let vocab = model.config().vocab_size;
    let targets = shifted_targets(labels, vocab)?;
    let count = ce::label_tokens(&targets);
    if count == 0 {
        return Err(invalid("the labels hold no token to predict"));
    }
    let grad_scale = 1.0 / count as f32;
    let rows = b * t;
    let normed = normed.reshape((rows, h))?;
    let lm_head = model.weights().lm_head();
    let (k, dtype) = (model.kernels(), model.dtype());
    // Per-row losses stay where they were made (no host sync per chunk); read once at the end.
    let mut losses = Vec::with_capacity(rows.div_ceil(chunk.max(1)));
    let mut pieces = Vec::with_capacity(rows.div_ceil(chunk.max(1)));
    for start in (0..rows).step_by(chunk.max(1)) {
        let n = chunk.max(1).min(rows - start);
        let labels_c = &targets[start..start + n];
        if labels_c.iter().all(|&l| l == IGNORE_INDEX) {
            pieces.push(Tensor::zeros((n, h), normed.dtype(), normed.device())?);
            continue;
        }
        let logits = model.dense_linear(&normed.narrow(0, start, n)?, lm_head)?;
        let (chunk_losses, dlogits) = match dtype {
            DType::F32 => chunk_t::<f32>(k, &logits, labels_c, vocab, grad_scale)?,
            DType::BF16 => chunk_t::<bf16>(k, &logits, labels_c, vocab, grad_scale)?,
            other => {
                return Err(invalid(format!(
                    "compute dtype {other:?} is not f32 or bf16"
                )))
            }
        };
        losses.push(chunk_losses);
        pieces.push(matmul(&dlogits, lm_head, Weight::Plain)?);
    }
    let sum: f64 = Tensor::cat(&losses, 0)?
        .to_vec1::<f32>()?
        .iter()
        .map(|&l| f64::from(l))
        .sum();
    Ok(ChunkedLoss {
        loss: (sum / count as f64) as f32,
        label_tokens: count,
        dnormed: Tensor::cat(&pieces, 0)?.reshape((b, t, h))?,
    })
}

/// One chunk's per-row losses `[n]` f32 (0 on ignored rows) and dlogits `[n, V]` (in `T`), both where the logits are.
fn chunk_t<T: FusedElement>(
    k: &Kernels,
    logits: &Tensor,
    labels: &[i32],
    vocab: usize,
    grad_scale: f32,
) -> Result<(Tensor, Tensor)> {
    on_device!(k, |dev| chunk_on::<_, T>(
        dev, logits, labels, vocab, grad_scale
    ))
}

/// [`chunk_t`] on one launch device: the logits and the per-row losses stay where they were made
/// (on CUDA, on the device); only the chunk's labels go up.
fn chunk_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    logits: &Tensor,
    labels: &[i32],
    vocab: usize,
    grad_scale: f32,
) -> Result<(Tensor, Tensor)> {
    let labels_d = dev.upload(labels)?;
    let mut values = dev.writable::<T>(logits)?;
    let (losses, lse) = ce::cross_entropy_forward(dev, &values, &labels_d, vocab)?;
    ce::cross_entropy_backward(dev, &mut values, &labels_d, &lse, vocab, grad_scale)?;
    Ok((
        dev.tensor(losses, &[labels.len()])?,
        dev.tensor(values, logits.dims())?,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::fused::KernelPath;
    use crate::tolerance::Dtype;
    use candle_core::Device;

    #[test]
    fn targets_shift_within_each_sequence() {
        let labels = Tensor::new(&[[5i64, -100, 2, 3], [1, 4, -100, 0]], &Device::Cpu).unwrap();
        let got = shifted_targets(&labels, 6).unwrap();
        assert_eq!(got, vec![-100, 2, 3, -100, 4, -100, 0, -100]);
        let bad = Tensor::new(&[[5i64, 6]], &Device::Cpu).unwrap();
        assert!(shifted_targets(&bad, 6).is_err());
        let bad = Tensor::new(&[[-1i64, 2]], &Device::Cpu).unwrap();
        assert!(shifted_targets(&bad, 6).is_err());
    }

    /// A tiny random model (head_dim 8, GQA, vocab 53) in `dtype` on the emulated kernels, an
    /// adapter with non-zero B on q_proj and down_proj, and a padded batch of 2 × 5.
    pub(crate) fn tiny(dtype: DType) -> (LlamaModel, crate::peft::LoraAdapter, [Tensor; 3]) {
        use crate::model::{LlamaConfig, LlamaWeights, RopeScaling};
        use crate::peft::{LoraAdapter, LoraConfig, LoraPair, TargetModule};
        let config = LlamaConfig {
            hidden_size: 32,
            intermediate_size: 40,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: true,
            vocab_size: 53,
            max_position_embeddings: 16,
            torch_dtype: None,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            quantization: None,
        };
        let weights = LlamaWeights::random(&config, 0.2, 5, dtype, &Device::Cpu).unwrap();
        let model = LlamaModel::new(config.clone(), weights)
            .unwrap()
            .with_kernel_path(KernelPath::Emulated)
            .unwrap();
        let lora = LoraConfig {
            r: 4,
            target_modules: vec![TargetModule::QProj, TargetModule::DownProj],
            ..LoraConfig::default()
        };
        let mut adapter = LoraAdapter::init(lora, &config, DType::F32, &Device::Cpu, 1).unwrap();
        for (i, module) in [TargetModule::QProj, TargetModule::DownProj]
            .into_iter()
            .enumerate()
        {
            let [out, inp] = module.shape(&config);
            let m = |rows, cols, seed| {
                let v = crate::testing::normal_vector(rows * cols, 0.1, seed);
                Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            let pair = LoraPair {
                a: m(4, inp, 10 + i as u64),
                b: m(out, 4, 20 + i as u64),
            };
            adapter.set_pair(0, module, pair).unwrap();
        }
        let ids = Tensor::new(&[[3u32, 9, 51, 7, 20], [4, 4, 30, 0, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(
            &[[3i64, 9, -100, 7, 20], [4, 4, 30, -100, -100]],
            &Device::Cpu,
        )
        .unwrap();
        (model, adapter, [ids, mask, labels])
    }

    #[test]
    fn small_chunks_give_the_one_chunk_loss_and_gradients() {
        // The kernels work row by row and the losses are summed in row order whatever the chunks,
        // so three-row chunks (the last one short, one with no label) give one chunk's loss bit
        // for bit; the gradients pass through GEMMs of 3 rows instead of 10, which candle's CPU
        // backend blocks (and so sums) differently.
        let (model, adapter, [ids, mask, labels]) = tiny(DType::F32);
        let run = |chunk| {
            crate::model::backward::lora_gradients_chunked(
                &model,
                &adapter,
                &ids,
                Some(&mask),
                &labels,
                chunk,
                &crate::peft::LoraMode::Eval,
            )
            .unwrap()
        };
        let before = crate::kernels::emu::launches_on_this_thread("k_cross_entropy_fwd");
        let small = run(3);
        let after = crate::kernels::emu::launches_on_this_thread("k_cross_entropy_fwd");
        let whole = run(10);
        assert_eq!(
            crate::kernels::emu::launches_on_this_thread("k_cross_entropy_fwd") - after,
            1
        );
        // Rows 0..3, 3..6 and 6..9 hold labels, row 9 (the padded tail) none: three launches.
        assert_eq!(after - before, 3);
        assert_eq!(small.loss.to_bits(), whole.loss.to_bits());
        assert_eq!(small.label_tokens, 5);
        assert_eq!(small.lora.len(), 2);
        let tol = crate::tolerance::lookup(crate::tolerance::Op::Reduction, Dtype::F32);
        for (key, want) in &whole.lora {
            let got = &small.lora[key];
            for (g, w) in [(&got.a, &want.a), (&got.b, &want.b)] {
                let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(w.iter().any(|&v| v != 0.0), "{key:?}");
                if let Err(e) = tol.check(&g, &w) {
                    panic!("{key:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn chunks_fit_the_byte_budget() {
        assert_eq!(chunk_rows(32000), LOSS_CHUNK_BYTES / (32000 * 4));
        assert!(chunk_rows(32000) * 32000 * 4 <= LOSS_CHUNK_BYTES);
        assert_eq!(chunk_rows(usize::MAX / 4), 1);
    }
}
