//! Training: JSONL datasets turned into token ids with response-only labels, padding into batches
//! and optional packing (`data`); learning-rate schedules (`schedule`); the training step
//! (`trainer`) and, under `cuda`, its device optimizer (`cuda_adamw`); the loop over steps that
//! `qlora train`, the demo and the bench share (`train_loop`); checkpoints (`checkpoint`),
//! evaluation (`eval`), metrics files (`metrics`) and the device-memory plan of a step (`plan`).

pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda_adamw;
pub mod data;
pub mod eval;
pub mod metrics;
pub mod plan;
pub mod schedule;
pub mod train_loop;
pub mod trainer;
