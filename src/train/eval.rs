//! Evaluation on the CPU with or without a LoRA adapter: the mean causal-LM loss over every label
//! token of a set of examples (batches `[B, T]`, right-padded) and its perplexity, and
//! multiple-choice accuracy where each choice is scored by the log-likelihood of its answer letter
//! after the prompt listing the choices (the highest sum of token log-probabilities wins; ties go
//! to the first choice).

use candle_core::{DType, Tensor};

use crate::model::llama::LlamaModel;
use crate::model::tokenizer::Tokenizer;
use crate::peft::{LoraAdapter, LoraMode};
use crate::train::data::{collate, Example, Record, IGNORE_INDEX};
use crate::{Error, Result};

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("eval", reason)
}

/// Mean loss over `label_tokens` predicted tokens, and `exp(loss)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossReport {
    pub loss: f64,
    pub perplexity: f64,
    pub label_tokens: usize,
    pub examples: usize,
}

/// Logits `[B, T, V]` of a padded batch, with the adapter when given.
fn batch_logits(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    examples: &[Example],
    pad_id: u32,
) -> Result<(Tensor, usize)> {
    let batch = collate(examples, pad_id)?;
    let shape = (batch.batch_size, batch.seq_len);
    let ids = Tensor::from_vec(batch.input_ids, shape, model.device())?;
    let mask = Tensor::from_vec(batch.attention_mask, shape, model.device())?;
    let logits = match adapter {
        Some(adapter) => model.forward_with_adapter(&ids, Some(&mask), adapter, &LoraMode::Eval)?,
        None => model.forward(&ids, Some(&mask))?,
    };
    Ok((logits, batch.seq_len))
}

/// For each `(row, position)` the log-probability of `targets[i]` under the logits predicting
/// that position (position − 1), in f64 from f32 logits.
fn target_logprobs(
    logits: &Tensor,
    seq_len: usize,
    picks: &[(usize, usize)],
    targets: &[u32],
) -> Result<Vec<f64>> {
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = logits.dim(2)?;
    let rows: Vec<u32> = picks
        .iter()
        .map(|&(row, pos)| (row * seq_len + pos - 1) as u32)
        .collect();
    let flat = logits.reshape(((), vocab))?;
    let index = Tensor::from_vec(rows, picks.len(), logits.device())?;
    let picked = flat
        .index_select(&index, 0)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    Ok(picked
        .iter()
        .zip(targets)
        .map(|(row, &target)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            row[target as usize] as f64 - max - sum.ln()
        })
        .collect())
}

/// Positions (after the first) carrying a label, with their targets.
fn labelled(examples: &[Example]) -> (Vec<(usize, usize)>, Vec<u32>) {
    let mut picks = Vec::new();
    let mut targets = Vec::new();
    for (row, example) in examples.iter().enumerate() {
        for (pos, &label) in example.labels.iter().enumerate().skip(1) {
            if label != IGNORE_INDEX {
                picks.push((row, pos));
                targets.push(label as u32);
            }
        }
    }
    (picks, targets)
}

/// The mean causal-LM loss over every label token of `examples` (not the mean of per-batch
/// means), run `batch_size` examples at a time.
pub fn evaluate_loss(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<LossReport> {
    if batch_size == 0 {
        return Err(invalid("batch_size must be at least 1"));
    }
    let mut sum = 0f64;
    let mut count = 0usize;
    for chunk in examples.chunks(batch_size) {
        let (picks, targets) = labelled(chunk);
        if picks.is_empty() {
            continue;
        }
        let (logits, seq_len) = batch_logits(model, adapter, chunk, pad_id)?;
        let logprobs = target_logprobs(&logits, seq_len, &picks, &targets)?;
        sum -= logprobs.iter().sum::<f64>();
        count += logprobs.len();
    }
    if count == 0 {
        return Err(invalid("the examples hold no label token to evaluate"));
    }
    let loss = sum / count as f64;
    Ok(LossReport {
        loss,
        perplexity: loss.exp(),
        label_tokens: count,
        examples: examples.len(),
    })
}

/// One question's candidates: the prompt listing the choices followed by each answer letter
/// (" A", " B", ...), as the training examples teach it, labels only on the letter's tokens (the
/// EOS the training examples append is left out of the score).
fn candidates(tokenizer: &Tokenizer, question: &str, choices: &[String]) -> Result<Vec<Example>> {
    let eos = tokenizer.eos().map(|t| t.id);
    (0..choices.len())
        .map(|answer| {
            let record = Record::MultipleChoice {
                question: question.to_string(),
                choices: choices.to_vec(),
                answer,
            };
            let mut example = record.tokenize(tokenizer)?;
            if eos.is_some() && example.input_ids.last().copied() == eos {
                example.input_ids.pop();
                example.labels.pop();
            }
            Ok(example)
        })
        .collect()
}

/// Multiple-choice results.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceReport {
    pub accuracy: f64,
    pub correct: usize,
    pub questions: usize,
    /// The picked choice per question.
    pub predictions: Vec<usize>,
}

/// The log-likelihood of each candidate of one question (sum over its label tokens).
pub fn choice_logprobs(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    tokenizer: &Tokenizer,
    question: &str,
    choices: &[String],
) -> Result<Vec<f64>> {
    let examples = candidates(tokenizer, question, choices)?;
    let pad_id = tokenizer.pad_id()?;
    let (logits, seq_len) = batch_logits(model, adapter, &examples, pad_id)?;
    let (picks, targets) = labelled(&examples);
    let logprobs = target_logprobs(&logits, seq_len, &picks, &targets)?;
    let mut scores = vec![0f64; examples.len()];
    for (&(row, _), lp) in picks.iter().zip(logprobs) {
        scores[row] += lp;
    }
    Ok(scores)
}

/// Accuracy over `records`' multiple-choice questions (other records are an error): the choice
/// with the highest [`choice_logprobs`] is the prediction.
pub fn multiple_choice_accuracy(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    tokenizer: &Tokenizer,
    records: &[Record],
) -> Result<ChoiceReport> {
    let mut predictions = Vec::with_capacity(records.len());
    let mut correct = 0usize;
    for (i, record) in records.iter().enumerate() {
        let Record::MultipleChoice {
            question,
            choices,
            answer,
        } = record
        else {
            return Err(invalid(format!(
                "record {i} is not a multiple-choice question"
            )));
        };
        let scores = choice_logprobs(model, adapter, tokenizer, question, choices)?;
        let mut best = 0;
        for (j, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = j;
            }
        }
        correct += usize::from(best == *answer);
        predictions.push(best);
    }
    if records.is_empty() {
        return Err(invalid("no multiple-choice question to score"));
    }
    Ok(ChoiceReport {
        accuracy: correct as f64 / records.len() as f64,
        correct,
        questions: records.len(),
        predictions,
    })
}
