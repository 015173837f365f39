//! `qlora generate`: completions from a Llama folder (optionally with a PEFT adapter) for one or
//! more prompts, run as one left-padded batch with a KV cache; greedy by default, or sampled with
//! temperature / top-k / top-p; each row stops at EOS or after `--max-new-tokens`.

use std::path::PathBuf;

use serde_json::json;

use crate::cli::{load_adapter, load_model, ComputeDtype, DeviceName, Quantize};
use crate::model::generate::{generate_with_adapter, GenerationConfig};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::{Error, Result};

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("generate", reason)
}

/// `qlora generate` flags.
#[derive(clap::Args, Clone, Debug)]
#[command(after_help = "EXAMPLES:\n  \
    qlora generate --model ./Llama-3.2-1B --prompt \"The capital of France is\"\n  \
    qlora generate --model ./Llama-3.2-1B-Instruct --adapter run1/adapter --chat \\\n      \
        --prompt \"Write a haiku about rust\" --temperature 0.7 --top-p 0.9 --seed 1\n  \
    qlora generate --model ./Llama-3.2-1B --prompts prompts.txt --json\n\n\
All prompts run as one batch (left-padded). Greedy decoding unless --temperature > 0.")]
pub struct GenerateArgs {
    /// Hugging Face Llama folder, or a llama.cpp GGUF file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder (e.g. the adapter/ of a `qlora train` run).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// A prompt; repeat the flag for several.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file of prompts. Plain text: one prompt per line (blank lines skipped). `.jsonl`: one
    /// JSON value per line, a string (a prompt, `\n` for newlines) or `{"messages": [{"role",
    /// "content"}, ...]}` (a conversation, rendered by the chat template with the assistant
    /// generation prompt).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Render each prompt as a user message with the tokenizer's chat template (and the
    /// assistant generation prompt) instead of using it as raw text.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_new_tokens: usize,
    /// 0 decodes greedily; above 0 samples from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// When sampling, keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// When sampling, keep the smallest set of likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "bf16")]
    pub compute_dtype: ComputeDtype,
    /// Storage of the base linears: nf4 (as trained with QLoRA) or none.
    #[arg(long, value_enum, default_value = "nf4")]
    pub quantize: Quantize,
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceName,
    /// Print one JSON object per prompt (prompt, completion, token ids) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One prompt: text (rendered as a user message with `--chat`), or a whole conversation.
#[derive(Clone, Debug, PartialEq)]
enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// A `.jsonl` prompts line: a JSON string or `{"messages": [...]}`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PromptLine {
    Text(String),
    Chat { messages: Vec<ChatMessage> },
}

/// The prompts of `args`: the `--prompt` flags, then those of `--prompts` (see its help).
fn collect_prompts(args: &GenerateArgs) -> Result<Vec<Prompt>> {
    let mut prompts: Vec<Prompt> = args.prompt.iter().cloned().map(Prompt::Text).collect();
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if !jsonl {
                prompts.push(Prompt::Text(line.to_string()));
                continue;
            }
            let bad = |reason: String| Error::Dataset {
                path: path.clone(),
                line: i + 1,
                reason,
            };
            let parsed: PromptLine = serde_json::from_str(line).map_err(|e| {
                bad(format!(
                    "not a JSON string or {{\"messages\": [...]}} object ({e})"
                ))
            })?;
            prompts.push(match parsed {
                PromptLine::Text(t) => Prompt::Text(t),
                PromptLine::Chat { messages } if messages.is_empty() => {
                    return Err(bad("`messages` is empty".into()))
                }
                PromptLine::Chat { messages } => Prompt::Chat(messages),
            });
        }
    }
    if prompts.is_empty() {
        return Err(invalid(
            "no prompt: pass --prompt TEXT (repeatable) or --prompts FILE",
        ));
    }
    Ok(prompts)
}

/// Token ids of `prompt`: raw text with the tokenizer's special tokens (BOS), or a one-message
/// chat rendered by the template, which writes its own special tokens.
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    match chat {
        true => {
            let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
            tokenizer.encode(&text, false)
        }
        false => tokenizer.encode(prompt, true),
    }
}

/// Runs `qlora generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let prompts = collect_prompts(args)?;
    let loaded = load_model(&args.model, args.compute_dtype, args.quantize, args.device)?;
    let adapter = args
        .adapter
        .as_ref()
        .map(|dir| load_adapter(dir, &loaded.model))
        .transpose()?;
    let tokenizer = &loaded.tokenizer;
    let ids = prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) => encode_prompt(tokenizer, t, args.chat),
            Prompt::Chat(messages) => {
                let text = tokenizer.apply_chat_template(messages, true)?;
                tokenizer.encode(&text, false)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut stop = loaded.model.config().eos_token_ids.clone();
    if let Some(eos) = tokenizer.eos() {
        if !stop.contains(&eos.id) {
            stop.push(eos.id);
        }
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop_token_ids: Some(stop.clone()),
        pad_token_id: Some(tokenizer.pad_id()?),
        seed: args.seed,
    };
    if !args.json {
        println!("{}", loaded.summary);
    }
    let outputs = generate_with_adapter(&loaded.model, adapter.as_ref(), &ids, &config)?;
    for (prompt, new_ids) in prompts.iter().zip(&outputs) {
        let stopped = new_ids.last().is_some_and(|t| stop.contains(t));
        let text_ids = match stopped {
            true => &new_ids[..new_ids.len() - 1],
            false => &new_ids[..],
        };
        let completion = tokenizer.decode(text_ids, true)?;
        let prompt = match prompt {
            Prompt::Text(t) => json!(t),
            Prompt::Chat(messages) => json!(messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect::<Vec<_>>()),
        };
        if args.json {
            let line = json!({
                "prompt": prompt,
                "completion": completion,
                "token_ids": new_ids,
                "stopped_at_eos": stopped,
            });
            println!("{line}");
        } else {
            match &prompt {
                serde_json::Value::String(t) => println!("--- prompt: {t}"),
                other => println!("--- chat: {other}"),
            }
            println!("{completion}");
            if !stopped {
                println!("[stopped after {} tokens]", new_ids.len());
            }
        }
    }
    Ok(())
}
