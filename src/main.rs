//! The `qlora` binary. With no arguments (or `qlora train --demo`) it runs the built-in demo: QLoRA
//! on a tiny random NF4 Llama learning a synthetic multiple-choice task on the CPU. `qlora
//! quantize` writes bitsandbytes-format NF4 (src/cli/quantize.rs); `qlora merge` folds a LoRA
//! adapter into its base model (src/cli/merge.rs).

mod demo;

use clap::{Parser, Subcommand};
use qlora::cli::merge::MergeArgs;
use qlora::cli::quantize::QuantizeArgs;
use qlora::Error;

#[derive(Parser)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA fine-tuning of Llama-family models on custom CUDA kernels",
    long_about = "QLoRA fine-tuning of Llama-family models on custom CUDA kernels.\n\n\
        With no subcommand, runs the built-in demo (the same as `qlora train --demo`): a tiny \
        random Llama with NF4 linears learns a synthetic multiple-choice task with LoRA on the \
        CPU in about a minute, and the adapter is saved in the Hugging Face PEFT format."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA adapter. Today only the built-in demo (`--demo`) is available.
    Train {
        /// Run the built-in demo: a tiny random NF4 Llama, a synthetic multiple-choice task and
        /// held-out accuracy before and after training, all on the CPU.
        #[arg(long)]
        demo: bool,
        #[command(flatten)]
        options: demo::DemoOptions,
    },
    // Help text: the doc comments and `long_about` of the Args structs in src/cli/.
    Quantize(QuantizeArgs),
    Merge(MergeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo::run(&demo::DemoOptions::default()),
        Some(Command::Train { demo, options }) => match demo {
            true => demo::run(&options),
            false => Err(Error::invalid(
                "train",
                "training from a model folder and a dataset is not built yet; \
                 run `qlora train --demo` for the built-in demo",
            )),
        },
        Some(Command::Quantize(args)) => qlora::cli::quantize::run(&args),
        Some(Command::Merge(args)) => qlora::cli::merge::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
