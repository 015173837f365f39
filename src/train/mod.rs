//! Training: JSONL datasets turned into token ids with response-only labels, padding into batches
//! and optional packing (`data`); learning-rate schedules (`schedule`); the training step
//! (`trainer`); the device-memory plan of a step (`plan`).

pub mod checkpoint;
pub mod data;
pub mod plan;
pub mod schedule;
pub mod trainer;
