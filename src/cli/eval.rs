//! `qlora eval`: the loss and perplexity of a Llama folder (optionally with a PEFT adapter) on a
//! JSONL dataset, and for multiple-choice data the accuracy, each choice scored by the
//! log-likelihood of its answer letter after the prompt. Printed as a table, or as JSON.

use std::path::PathBuf;

use serde_json::json;

use crate::cli::config::{DataFormat, TrainConfig};
use crate::cli::{check_format, load_adapter, load_model, ComputeDtype, DeviceName, Quantize};
use crate::train::data::{load_jsonl, read_records, Record, RecordKind};
use crate::train::eval::{evaluate_loss, multiple_choice_accuracy};
use crate::{Error, Result};

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("eval", reason)
}

/// `qlora eval` flags.
#[derive(clap::Args, Clone, Debug)]
#[command(after_help = "EXAMPLES:\n  \
    qlora eval --model ./Llama-3.2-1B --data test.jsonl\n  \
    qlora eval --model ./Llama-3.2-1B --adapter run1/adapter --data mcqa.jsonl --json\n\n\
Loss is the mean cross-entropy over the response tokens (as in training), perplexity its exp.\n\
For multiple-choice data ({\"question\", \"choices\", \"answer\"}) each choice's answer letter\n\
(\" A\", \" B\", ...) is scored by its log-likelihood after the prompt; the highest wins.")]
pub struct EvalArgs {
    /// Hugging Face Llama folder, or a llama.cpp GGUF file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder (e.g. the adapter/ of a `qlora train` run).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// JSONL dataset (instruction, chat or multiple-choice lines).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Line shape of the data; mcqa also reports accuracy.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: DataFormat,
    /// Maximum tokens per example (longer ones are truncated as in training).
    #[arg(long, default_value_t = 512, value_name = "TOKENS")]
    pub seq_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "bf16")]
    pub compute_dtype: ComputeDtype,
    /// Storage of the base linears: nf4 (as trained with QLoRA) or none.
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quantize,
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceName,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs `qlora eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        return Err(invalid("--batch-size must be at least 1"));
    }
    // The data is checked before the model loads (minutes, on a real model).
    let records = read_records(&args.data)?;
    if records.is_empty() {
        return Err(invalid(format!(
            "{}: no examples (the file is empty or blank)",
            args.data.display()
        )));
    }
    check_format(&args.data, &records, args.format)?;
    let loaded = load_model(&args.model, args.compute_dtype, args.quantize, args.device)?;
    let adapter = args
        .adapter
        .as_ref()
        .map(|dir| load_adapter(dir, &loaded.model))
        .transpose()?;
    let data_config = TrainConfig {
        seq_len: args.seq_len,
        ..TrainConfig::default()
    }
    .data();
    let dataset = load_jsonl(&args.data, &loaded.tokenizer, &data_config)?;
    if !args.json {
        println!("{}", loaded.summary);
        println!("data: {}: {}", args.data.display(), dataset.stats);
    }
    let all_mcqa = records
        .iter()
        .all(|(_, r)| r.kind() == RecordKind::MultipleChoice);
    let pad_id = loaded.tokenizer.pad_id()?;
    let loss = evaluate_loss(
        &loaded.model,
        adapter.as_ref(),
        &dataset.examples,
        args.batch_size,
        pad_id,
    )?;
    let choices = match all_mcqa {
        true => {
            let questions: Vec<Record> = records.into_iter().map(|(_, r)| r).collect();
            Some(multiple_choice_accuracy(
                &loaded.model,
                adapter.as_ref(),
                &loaded.tokenizer,
                &questions,
            )?)
        }
        false => None,
    };
    let report = json!({
        "model": args.model.display().to_string(),
        "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
        "data": args.data.display().to_string(),
        "examples": loss.examples,
        "label_tokens": loss.label_tokens,
        "loss": loss.loss,
        "perplexity": loss.perplexity,
        "accuracy": choices.as_ref().map(|c| c.accuracy),
        "correct": choices.as_ref().map(|c| c.correct),
        "questions": choices.as_ref().map(|c| c.questions),
        "mcqa_scoring": choices.as_ref().map(|_| "answer-letter log-likelihood"),
    });
    let text =
        serde_json::to_string_pretty(&report).map_err(|e| Error::encode("the eval report", e))?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{text}\n")).map_err(|e| Error::io(path, e))?;
    }
    if args.json {
        println!("{text}");
        return Ok(());
    }
    println!();
    println!("| metric       | value              |");
    println!("|--------------|--------------------|");
    println!("| examples     | {:>18} |", loss.examples);
    println!("| label tokens | {:>18} |", loss.label_tokens);
    println!("| loss         | {:>18.6} |", loss.loss);
    println!("| perplexity   | {:>18.4} |", loss.perplexity);
    if let Some(c) = &choices {
        println!(
            "| accuracy     | {:>18} |",
            format!("{:.2}% ({}/{})", c.accuracy * 100.0, c.correct, c.questions)
        );
    }
    Ok(())
}
