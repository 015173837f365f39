//! The training loop shared by `qlora train`, the built-in demo and the training-step bench:
//! each step takes its micro-batches from a [`MicroBatches`] source, runs one
//! [`Trainer::train_step`] (gradient accumulation over the micro-batches, the non-finite check,
//! clipping, the optimizer update at the scheduled learning rate) and hands a [`StepReport`] to
//! the caller's hook (metrics, evaluation, progress, checkpoints). [`DataStream`] is the seeded,
//! resumable order `qlora train` draws its rows in.

use std::ops::RangeInclusive;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::train::checkpoint::DataPosition;
use crate::train::data::{collate, Batch, Example};
use crate::train::trainer::{Optimizer, StepMetrics, Trainer};
use crate::Result;

/// Where each step's micro-batches come from.
pub trait MicroBatches {
    /// The micro-batches of the next step (their gradients are accumulated into one update).
    fn next_micro_batches(&mut self) -> Result<Vec<Batch>>;
}

/// `grad_accum` micro-batches of `batch_size` rows per step from a [`DataStream`], each collated
/// (right-padded with `pad_id`) on its own.
pub struct StreamBatches<'a> {
    pub stream: DataStream<'a>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub pad_id: u32,
}

impl MicroBatches for StreamBatches<'_> {
    fn next_micro_batches(&mut self) -> Result<Vec<Batch>> {
        (0..self.grad_accum)
            .map(|_| collate(&self.stream.next_examples(self.batch_size), self.pad_id))
            .collect()
    }
}

/// The same batch every step, as one micro-batch (the training-step bench).
pub struct RepeatBatch(pub Batch);

impl MicroBatches for RepeatBatch {
    fn next_micro_batches(&mut self) -> Result<Vec<Batch>> {
        Ok(vec![self.0.clone()])
    }
}

/// What one step of [`run_steps`] did, for the caller's hook.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The loop's step number (from the range [`run_steps`] was given).
    pub step: u64,
    pub metrics: StepMetrics,
    /// Non-padding input tokens of every step of this call so far, this one included.
    pub tokens: usize,
    /// Seconds since this call's loop started, at the end of this step's update.
    pub elapsed_s: f64,
    /// Seconds of this step's `train_step` alone (no batch preparation, no hook).
    pub step_s: f64,
}

impl StepReport {
    /// Throughput of this call's loop so far.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.elapsed_s.max(1e-9)
    }
}

/// What a whole [`run_steps`] call did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopSummary {
    /// Non-padding input tokens of every step.
    pub tokens: usize,
    /// Seconds of the whole loop, hooks included.
    pub seconds: f64,
}

/// The training loop: for each step in `steps`, the next micro-batches from `source`, one
/// [`Trainer::train_step`] on them, then `hook` with the trainer, the source (where a checkpoint
/// reads the data position) and the step's [`StepReport`]. An error from the source, the step or
/// the hook ends the loop and is returned.
pub fn run_steps<'m, O, S, H>(
    trainer: &mut Trainer<'m, O>,
    steps: RangeInclusive<u64>,
    source: &mut S,
    mut hook: H,
) -> Result<LoopSummary>
where
    O: Optimizer,
    S: MicroBatches,
    H: FnMut(&Trainer<'m, O>, &S, &StepReport) -> Result<()>,
{
    let started = Instant::now();
    let mut tokens = 0usize;
    for step in steps {
        let micro_batches = source.next_micro_batches()?;
        let t0 = Instant::now();
        let metrics = trainer.train_step(&micro_batches)?;
        let step_s = t0.elapsed().as_secs_f64();
        tokens += metrics.tokens;
        let report = StepReport {
            step,
            metrics,
            tokens,
            elapsed_s: started.elapsed().as_secs_f64(),
            step_s,
        };
        hook(trainer, source, &report)?;
    }
    Ok(LoopSummary {
        tokens,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The training rows in a fixed per-epoch order: epoch e visits the rows in a permutation drawn
/// from the run's seed and e alone, so a position (epoch, index) resumes the stream exactly.
pub struct DataStream<'a> {
    rows: &'a [Example],
    seed: u64,
    pub position: DataPosition,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl<'a> DataStream<'a> {
    pub fn new(rows: &'a [Example], seed: u64, position: DataPosition) -> Self {
        DataStream {
            rows,
            seed,
            position,
            order: (0..rows.len()).collect(),
            order_epoch: None,
        }
    }

    fn epoch_order(&mut self) -> &[usize] {
        if self.order_epoch != Some(self.position.epoch) {
            let mix = (self.position.epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = StdRng::seed_from_u64(self.seed ^ mix);
            self.order = (0..self.rows.len()).collect();
            self.order.shuffle(&mut rng);
            self.order_epoch = Some(self.position.epoch);
        }
        &self.order
    }

    pub fn next_examples(&mut self, n: usize) -> Vec<Example> {
        let mut picked = Vec::with_capacity(n);
        while picked.len() < n {
            if self.position.index as usize >= self.rows.len() {
                self.position = DataPosition {
                    epoch: self.position.epoch + 1,
                    index: 0,
                };
            }
            let i = self.position.index as usize;
            let row = self.epoch_order()[i];
            picked.push(self.rows[row].clone());
            self.position.index += 1;
        }
        picked
    }

    /// Passes completed, fractional.
    pub fn epochs_done(&self) -> f64 {
        self.position.epoch as f64 + self.position.index as f64 / self.rows.len().max(1) as f64
    }
}
