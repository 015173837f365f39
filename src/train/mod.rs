//! Training: JSONL datasets turned into token ids with response-only labels, padding into batches
//! and optional packing (`data`); learning-rate schedules (`schedule`); the training step
//! (`trainer`).

pub mod checkpoint;
pub mod data;
pub mod schedule;
pub mod trainer;
