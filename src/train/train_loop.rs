//! The training loop shared by `qlora train`, the built-in demo and the training-step bench:
//! each step takes its micro-batches from a [`MicroBatches`] source, runs one
//! [`Trainer::train_step`] (gradient accumulation over the micro-batches, the non-finite check,
//! clipping, the optimizer update at the scheduled learning rate) and hands a [`StepReport`] to
//! the caller's hook (metrics, evaluation, progress, checkpoints). [`DataStream`] is the seeded,
//! resumable order `qlora train` draws its rows in.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::train::checkpoint::DataPosition;
use crate::train::data::Example;

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
