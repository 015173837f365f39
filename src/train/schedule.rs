//! Learning-rate schedules with linear warmup, as transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (a `LambdaLR` factor of
//! the optimizer's base lr, computed in f64 as Python floats).

use std::f64::consts::PI;

use crate::{Error, Result};

/// The shape of the schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    /// The base lr.
    Constant,
    /// Linear decay to 0 at `total_steps`.
    Linear,
    /// Cosine decay over `num_cycles` cycles (transformers' default 0.5: one half-wave to 0).
    Cosine { num_cycles: f64 },
}

/// A warmup-then-decay schedule over `total_steps` optimizer updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// No warmup, no decay.
    pub const CONSTANT: LrSchedule = LrSchedule {
        kind: ScheduleKind::Constant,
        warmup_steps: 0,
        total_steps: 0,
    };

    pub fn validate(&self) -> Result<()> {
        if let ScheduleKind::Cosine { num_cycles } = self.kind {
            if !num_cycles.is_finite() {
                return Err(Error::invalid(
                    "lr schedule",
                    format!("num_cycles must be finite, got {num_cycles}"),
                ));
            }
        }
        Ok(())
    }

    /// The multiplier of the base lr for the update after `step` earlier ones (0-based, as
    /// `LambdaLR`'s `last_epoch` when HF's Trainer calls `optimizer.step()`; so with warmup the
    /// first update runs at lr 0, as there).
    pub fn factor(&self, step: u64) -> f64 {
        let step_f = step as f64;
        let warmup = self.warmup_steps as f64;
        if step < self.warmup_steps {
            return step_f / warmup.max(1.0);
        }
        // `max(1, total - warmup)` on Python ints: the difference can be negative.
        let decay_steps = (self.total_steps as f64 - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((self.total_steps as f64 - step_f) / decay_steps).max(0.0),
            ScheduleKind::Cosine { num_cycles } => {
                let progress = (step_f - warmup) / decay_steps;
                (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// `base_lr · factor(step)`, as `LambdaLR` sets the group's lr.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}
