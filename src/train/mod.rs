//! Training: JSONL datasets turned into token ids with response-only labels, padding into batches
//! and optional packing (`data`); learning-rate schedules (`schedule`); the training step
//! (`trainer`); checkpoints (`checkpoint`), evaluation (`eval`) and metrics files (`metrics`).

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod metrics;
pub mod schedule;
pub mod trainer;
