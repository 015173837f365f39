//! The `qlora` binary. With no arguments (or `qlora train --demo`) it runs the built-in demo: QLoRA
//! on a tiny random NF4 Llama learning a synthetic multiple-choice task on the CPU. `qlora train`,
//! `eval` and `generate` work on a Hugging Face Llama folder and JSONL data (src/cli/). `qlora
//! quantize` turns a weight (a built-in Llama-shaped example, or every linear weight of a
//! safetensors file) into bitsandbytes-format NF4 and reports sizes and error. `qlora bench` measures the kernels
//! and the training step (src/bench/).

mod demo;

use clap::{Parser, Subcommand};
use half::{bf16, f16};
use qlora::cli::bench::BenchArgs;
use qlora::cli::eval::EvalArgs;
use qlora::cli::generate::GenerateArgs;
use qlora::cli::train::TrainArgs;
use qlora::kernels::nf4::{dequantize_emulated, quantize_emulated, Scales};
use qlora::quant::bnb::nf4_to_tensors;
use qlora::quant::nf4::{Nf4Scales, Nf4Tensor, NF4_CODE};
use qlora::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA fine-tuning of Llama-family models on custom CUDA kernels",
    long_about = "QLoRA fine-tuning of Llama-family models on custom CUDA kernels.\n\n\
        With no subcommand, runs the built-in demo (the same as `qlora train --demo`): a tiny \
        random Llama with NF4 linears learns a synthetic multiple-choice task with LoRA on the \
        CPU in about a minute, and the adapter is saved in the Hugging Face PEFT format.\n\n\
        On your own model: `qlora train --model DIR --data train.jsonl` fine-tunes a LoRA \
        adapter, `qlora eval` reports loss, perplexity and multiple-choice accuracy, and \
        `qlora generate` writes completions; `qlora <command> --help` explains each. These run \
        on the CPU. `qlora bench kernels` times the CUDA kernels on a GPU and `qlora bench \
        train-step` a CPU training step."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

// One value, parsed once at startup: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA adapter on a Hugging Face Llama folder and a JSONL dataset (QLoRA: the
    /// base linears in NF4), or run the built-in demo with --demo.
    Train(TrainArgs),
    /// Loss, perplexity and (for multiple-choice data) accuracy of a model, with or without an
    /// adapter, on a JSONL dataset.
    Eval(EvalArgs),
    /// Generate completions for prompts with a model and an optional adapter.
    Generate(GenerateArgs),
    /// Measure the kernels on the GPU (`bench kernels`) or a training step on the CPU
    /// (`bench train-step`).
    Bench(BenchArgs),
    /// Quantize weights to NF4 exactly as bitsandbytes stores them, and report sizes and error.
    ///
    /// With no --input, quantizes a built-in 4096×4096 Llama-shaped weight and checks the emulated
    /// CUDA kernel against the Rust reference on its first rows.
    Quantize {
        /// A safetensors file; every 2-D `*_proj.weight` tensor is quantized, others are copied.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where to write the bitsandbytes-format safetensors file.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Elements per quantization block.
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Keep f32 block scales instead of double-quantizing them to 8 bits.
        #[arg(long)]
        no_double_quant: bool,
        /// Rows of the built-in example also run through the emulated CUDA kernels (0 to skip).
        #[arg(long, default_value_t = 16)]
        kernel_rows: usize,
    },
}

/// `qlora train`: the demo with --demo (which takes only --steps, --output and --seed), else a
/// run on the user's model and data.
fn train(args: &TrainArgs) -> Result<()> {
    if !args.demo {
        return qlora::cli::train::run(args);
    }
    if args.has_non_demo_flags() {
        return Err(Error::invalid(
            "train --demo",
            "the demo takes only --steps, --output and --seed; drop --demo to train on your own \
             --model and --data",
        ));
    }
    let defaults = demo::DemoOptions::default();
    demo::run(&demo::DemoOptions {
        steps: args.steps.unwrap_or(defaults.steps),
        output: args.output.clone().unwrap_or(defaults.output),
        seed: args.seed.unwrap_or(defaults.seed),
    })
}

fn main() -> std::process::ExitCode {
    // `qlora bench train-step` re-runs this binary for each measured configuration.
    if let Some(code) = qlora::bench::train_step::child_from_env() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo::run(&demo::DemoOptions::default()),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Eval(args)) => qlora::cli::eval::run(&args),
        Some(Command::Generate(args)) => qlora::cli::generate::run(&args),
        Some(Command::Bench(args)) => qlora::cli::bench::run(&args),
        Some(Command::Quantize {
            input,
            output,
            blocksize,
            no_double_quant,
            kernel_rows,
        }) => match input {
            Some(path) => quantize_file(&path, output.as_deref(), blocksize, !no_double_quant),
            None => quantize_demo(output.as_deref(), blocksize, !no_double_quant, kernel_rows),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Error statistics of a dequantized weight against the original.
struct ErrorStats {
    rmse: f64,
    max_abs: f64,
    rel_frobenius: f64,
}

fn error_stats(orig: &[f32], deq: &[f32]) -> ErrorStats {
    let (mut se, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in orig.iter().zip(deq) {
        let d = (a - b) as f64;
        se += d * d;
        norm += (a as f64) * (a as f64);
        max_abs = max_abs.max(d.abs());
    }
    ErrorStats {
        rmse: (se / orig.len().max(1) as f64).sqrt(),
        max_abs,
        rel_frobenius: (se / norm.max(f64::MIN_POSITIVE)).sqrt(),
    }
}

fn scale_bytes(t: &Nf4Tensor) -> usize {
    match &t.scales {
        Nf4Scales::F32(a) => a.len() * 4,
        Nf4Scales::Double(dq) => dq.absmax_q.len() + dq.nested_absmax.len() * 4 + 256 * 4 + 4,
    }
}

fn quantize_demo(
    output: Option<&Path>,
    blocksize: usize,
    double_quant: bool,
    kernel_rows: usize,
) -> Result<()> {
    let (rows, cols) = (4096usize, 4096usize);
    let weight: Vec<bf16> = qlora::testing::normal_vector(rows * cols, 0.02, 7)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let widened: Vec<f32> = weight.iter().map(|x| x.to_f32()).collect();
    println!("built-in weight: [{rows}, {cols}] bf16, normal(0, 0.02) like a Llama-7B projection");

    let t0 = Instant::now();
    let q = Nf4Tensor::quantize_bf16(&weight, &[rows, cols], blocksize, double_quant)?;
    let quant_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let deq = q.dequantize()?;
    let dequant_s = t1.elapsed().as_secs_f64();

    let n = rows * cols;
    let nf4_bytes = q.packed.len() + scale_bytes(&q);
    println!(
        "  bf16 original         {:>8.2} MiB  16.000 bits/param",
        (n * 2) as f64 / MIB
    );
    println!(
        "  NF4 (bs {blocksize}, {})  {:>8.2} MiB  {:6.3} bits/param",
        if double_quant {
            "double quant"
        } else {
            "f32 scales  "
        },
        nf4_bytes as f64 / MIB,
        nf4_bytes as f64 * 8.0 / n as f64
    );
    let e = error_stats(&widened, &deq);
    println!(
        "  error                 rmse {:.3e}, max |err| {:.3e}, relative (Frobenius) {:.4}",
        e.rmse, e.max_abs, e.rel_frobenius
    );
    println!(
        "  reference speed       quantize {:.3} s ({:.2} GB/s of bf16 read), dequantize {:.3} s ({:.2} GB/s of f32 written)",
        quant_s,
        (n * 2) as f64 / quant_s / 1e9,
        dequant_s,
        (n * 4) as f64 / dequant_s / 1e9
    );

    if kernel_rows > 0 {
        check_emulated_kernels(&weight[..kernel_rows.min(rows) * cols], blocksize)?;
    }
    if let Some(path) = output {
        write_bnb(
            path,
            vec![("model.layers.0.mlp.down_proj".to_string(), q)],
            Vec::new(),
        )?;
        println!(
            "  wrote {} (bitsandbytes NF4 keys under model.layers.0.mlp.down_proj)",
            path.display()
        );
    }
    Ok(())
}

/// Runs the NF4 kernels of kernels/nf4.cu through the CPU emulation and compares with the reference.
fn check_emulated_kernels(weight: &[bf16], blocksize: usize) -> Result<()> {
    let widened: Vec<f32> = weight.iter().map(|x| x.to_f32()).collect();
    let (want_packed, want_absmax) = qlora::quant::nf4::quantize_nf4(&widened, blocksize)?;
    let t0 = Instant::now();
    let (packed, absmax) = quantize_emulated(weight, blocksize, &NF4_CODE)?;
    let out: Vec<f32> = dequantize_emulated(
        &packed,
        Scales::F32(&absmax),
        weight.len(),
        blocksize,
        &NF4_CODE,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let want = qlora::quant::nf4::dequantize_nf4(
        &want_packed,
        &want_absmax,
        weight.len(),
        blocksize,
        &NF4_CODE,
    )?;
    let same_bytes = packed == want_packed
        && absmax
            .iter()
            .zip(&want_absmax)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    let same_out = out
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "  emulated CUDA kernels  {} elements in {:.2} s: packed bytes {}, dequantized values {}",
        weight.len(),
        secs,
        if same_bytes {
            "identical to the reference"
        } else {
            "DIFFER"
        },
        if same_out { "bit-identical" } else { "DIFFER" }
    );
    if same_bytes && same_out {
        Ok(())
    } else {
        Err(Error::invalid(
            "quantize",
            "emulated kernels disagree with the reference",
        ))
    }
}

const LINEAR_NAMES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn quantize_file(
    input: &Path,
    output: Option<&Path>,
    blocksize: usize,
    double_quant: bool,
) -> Result<()> {
    let file = std::fs::File::open(input).map_err(|e| Error::io(input, e))?;
    // SAFETY: the mapping is read-only and lives until the end of this function; like every
    // safetensors reader we assume no other process truncates the file while we read it.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(input, e))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut quantized = Vec::new();
    let mut copied = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name)?;
        let is_linear = view.shape().len() == 2
            && name.ends_with(".weight")
            && LINEAR_NAMES
                .iter()
                .any(|l| name.ends_with(&format!("{l}.weight")));
        let values = match (is_linear, view.dtype()) {
            (true, Dtype::F32) => Some((
                decode(view.data(), 4, |b| {
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                }),
                "float32",
            )),
            (true, Dtype::BF16) => Some((
                decode(view.data(), 2, |b| {
                    bf16::from_le_bytes([b[0], b[1]]).to_f32()
                }),
                "bfloat16",
            )),
            (true, Dtype::F16) => Some((
                decode(view.data(), 2, |b| {
                    f16::from_le_bytes([b[0], b[1]]).to_f32()
                }),
                "float16",
            )),
            _ => None,
        };
        before += view.data().len();
        match values {
            Some((v, dtype)) => {
                let mut q = Nf4Tensor::quantize(&v, view.shape(), blocksize, double_quant)?;
                q.dtype = dtype.to_string();
                let e = error_stats(&v, &q.dequantize()?);
                let size = q.packed.len() + scale_bytes(&q);
                after += size;
                println!(
                    "  {name:<48} {:?} -> NF4 {:>9} bytes, relative error {:.4}",
                    view.shape(),
                    size,
                    e.rel_frobenius
                );
                quantized.push((name.trim_end_matches(".weight").to_string(), q));
            }
            None => {
                after += view.data().len();
                copied.push((
                    name.clone(),
                    view.dtype(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ));
            }
        }
    }
    println!(
        "{} tensors quantized, {} copied: {:.2} MiB -> {:.2} MiB",
        quantized.len(),
        copied.len(),
        before as f64 / MIB,
        after as f64 / MIB
    );
    if let Some(path) = output {
        write_bnb(path, quantized, copied)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn decode(data: &[u8], width: usize, f: impl Fn(&[u8]) -> f32) -> Vec<f32> {
    data.chunks_exact(width).map(f).collect()
}

type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn write_bnb(
    path: &Path,
    quantized: Vec<(String, Nf4Tensor)>,
    copied: Vec<RawTensor>,
) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, q) in &quantized {
        tensors.extend(nf4_to_tensors(prefix, q)?);
    }
    for (name, dtype, shape, data) in copied {
        tensors.push((name, qlora::quant::bnb::OwnedTensor { dtype, shape, data }));
    }
    let bytes = safetensors::serialize(tensors, None)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
