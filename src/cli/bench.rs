//! `qlora bench`: `kernels` times every GPU kernel family of `bench::kernels` at Llama-2 shapes
//! and prints one table (or why there is no GPU, exiting 0); `train-step` times one CPU training
//! step of a random Llama per base, optionally beside PyTorch + PEFT.

use std::path::PathBuf;

use crate::bench::kernels::{self, BenchOptions, KernelBench, ModelShape};
use crate::bench::train_step::{self, Base, Preset, TrainStepOptions};
use crate::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Time the CUDA kernels at Llama-2 shapes: NF4 dequantize/quantize, GEMV, tensor-core GEMM
    /// beside dequantize + cuBLAS and dense cuBLAS bf16, AdamW, RMSNorm, RoPE, SwiGLU, causal
    /// attention and cross-entropy.
    ///
    /// Prints one table: kernel, shape, time per call, GB/s and % of the device's theoretical
    /// DRAM bandwidth for memory-bound kernels, TFLOP/s and the ratio to cuBLAS bf16 on the dense
    /// weight for products (above 1 is faster than cuBLAS). Without the `cuda` feature or without
    /// a GPU it says why and exits 0.
    Kernels(KernelsArgs),
    /// Time one QLoRA training step (forward, backward, clipping, AdamW) on the CPU on a random
    /// Llama, each base in a fresh process: tokens/s, s/step and peak RSS.
    TrainStep(TrainStepArgs),
}

#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Model whose shapes to use: 13b (hidden 5120, intermediate 13824, 40 heads) or 7b (4096,
    /// 11008, 32).
    #[arg(long, default_value = "13b", value_parser = ["13b", "7b"])]
    pub shapes: String,
    /// Token counts M (rows of the activations), comma-separated; the GEMV takes those ≤ 16.
    #[arg(long, value_delimiter = ',', default_values_t = kernels::DEFAULT_MS)]
    pub m: Vec<usize>,
    /// Only these kernel families, comma-separated (default all): nf4, gemv, gemm, adamw, llama,
    /// attention (each M ≥ 128 as the sequence length), cross-entropy.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Also write the rows and the device as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the measured NF4 matmul dispatch table here (read with QLORA_NF4_GEMM_TABLE).
    #[arg(long)]
    pub dispatch_table: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct TrainStepArgs {
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Tokens per sequence (batch 1).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Base linears to measure, comma-separated: nf4 (QLoRA) and/or dense.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Base::Nf4, Base::Dense])]
    pub base: Vec<Base>,
    /// Model size: 100m (12 layers of hidden 768, 100.1M parameters) or tiny (a smoke test).
    #[arg(long, value_enum, default_value_t = Preset::Llama100m)]
    pub preset: Preset,
    /// A python with torch, transformers, peft and bitsandbytes: runs the same step in PyTorch +
    /// PEFT (benches/train_step_peft.py) beside each row.
    #[arg(long)]
    pub peft_python: Option<PathBuf>,
    /// Whether PyTorch recomputes each layer in the backward as qlora does (on) or keeps its
    /// activations (off).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub peft_checkpointing: String,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.command {
        BenchCommand::Kernels(a) => run_kernels(a),
        BenchCommand::TrainStep(a) => run_train_step(a),
    }
}

fn run_kernels(a: &KernelsArgs) -> Result<()> {
    let names: Vec<&str> = a.only.iter().map(String::as_str).collect();
    let families = kernels::select(&names)?;
    let opts = BenchOptions {
        shape: ModelShape::by_name(&a.shapes)?,
        ms: a.m.clone(),
        dispatch_table: a.dispatch_table.clone(),
    };
    let mut printed_header = false;
    let outcome = kernels::run(&families, &opts, &mut |row, device| {
        if !std::mem::replace(&mut printed_header, true) {
            println!("{}\n{}", device.description, kernels::table_header());
        }
        println!("{}", kernels::table_row(row, device.peak_bandwidth_gbs));
    })?;
    match outcome {
        KernelBench::Skipped(why) => {
            println!("no GPU to benchmark: {why}; nothing measured");
            Ok(())
        }
        KernelBench::Ran(report) => match &a.json {
            Some(path) => {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| Error::invalid("bench --json", e.to_string()))?;
                std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
                println!("rows written to {}", path.display());
                Ok(())
            }
            None => Ok(()),
        },
    }
}

fn run_train_step(a: &TrainStepArgs) -> Result<()> {
    let options = TrainStepOptions {
        preset: a.preset,
        seq_len: a.seq_len,
        steps: a.steps,
        warmup: a.warmup,
        bases: a.base.clone(),
        peft_python: a.peft_python.clone(),
        peft_checkpointing: a.peft_checkpointing.clone(),
    };
    // The children are this binary again, which hands them to `child_from_env` in main.
    train_step::run(&options, &["bench", "train-step"])
}
