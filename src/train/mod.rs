//! Training: JSONL datasets turned into token ids with response-only labels, padding into batches
//! and optional packing (`data`).

pub mod data;
