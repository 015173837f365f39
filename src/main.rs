//! The `qlora` binary. With no arguments (or `qlora train --demo`) it runs the built-in demo: QLoRA
//! on a tiny random NF4 Llama learning a synthetic multiple-choice task on the CPU. `qlora train`,
//! `eval` and `generate` work on a Hugging Face Llama folder and JSONL data; `quantize` writes
//! bitsandbytes-format NF4, `merge` folds a LoRA adapter into its base model, `convert` writes a
//! GGUF model as a Hugging Face folder, `plan` plans a training step's device memory, and `bench`
//! measures the kernels (GPU) and a training step (CPU).
//! Each subcommand's Args struct and `run` live in src/cli/.

mod demo;

use clap::{Parser, Subcommand};
use qlora::cli::bench::BenchArgs;
use qlora::cli::convert::ConvertArgs;
use qlora::cli::eval::EvalArgs;
use qlora::cli::export::ExportArgs;
use qlora::cli::generate::GenerateArgs;
use qlora::cli::merge::MergeArgs;
use qlora::cli::plan::PlanArgs;
use qlora::cli::quantize::QuantizeArgs;
use qlora::cli::train::TrainArgs;
use qlora::{Error, Result};

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
    // Help text: the doc comments and `long_about` of the Args structs in src/cli/.
    Quantize(QuantizeArgs),
    Merge(MergeArgs),
    Convert(ConvertArgs),
    Export(ExportArgs),
    /// Plan the device memory of a QLoRA training step, by category, against a budget.
    Plan(PlanArgs),
    /// Measure the kernels on the GPU (`bench kernels`) or a training step on the CPU
    /// (`bench train-step`).
    Bench(BenchArgs),
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

/// Lets a closed stdout or stderr end the process quietly, as it ends Unix tools: the Rust runtime
/// ignores SIGPIPE, so `qlora generate … | head -1` would otherwise panic in `println!` with
/// "failed printing to stdout: Broken pipe" and exit 101.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists; restoring a signal's
    // default disposition has no other effect on the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    default_sigpipe();
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
        Some(Command::Quantize(args)) => qlora::cli::quantize::run(&args),
        Some(Command::Merge(args)) => qlora::cli::merge::run(&args),
        Some(Command::Convert(args)) => qlora::cli::convert::run(&args),
        Some(Command::Export(args)) => qlora::cli::export::run(&args),
        Some(Command::Plan(args)) => qlora::cli::plan::run(&args),
        Some(Command::Bench(args)) => qlora::cli::bench::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
