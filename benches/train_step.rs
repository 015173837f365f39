//! One QLoRA training step on the CPU on a random ~100M-parameter Llama at batch 1 × seq 512,
//! beside PyTorch + PEFT when `QLORA_PEFT_PYTHON` names a python with torch, transformers, peft
//! and bitsandbytes; the measurement is `qlora::bench::train_step` (also `qlora bench train-step`).
//! `cargo bench --bench train_step`; knobs: QLORA_BENCH_STEPS (timed steps, 3), QLORA_BENCH_WARMUP
//! (1), QLORA_BENCH_SEQ (512), QLORA_BENCH_BASES ("nf4,dense"), QLORA_BENCH_PRESET ("100m"; "tiny"
//! for a smoke test), QLORA_PEFT_CHECKPOINTING ("on": torch recomputes each layer as we do; "off"
//! keeps its activations), RAYON_NUM_THREADS.

use std::process::ExitCode;

use qlora::bench::train_step;

fn main() -> ExitCode {
    if let Some(code) = train_step::child_from_env() {
        return code;
    }
    match train_step::TrainStepOptions::from_env().and_then(|o| train_step::run(&o, &[])) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_step: {e}");
            ExitCode::FAILURE
        }
    }
}
