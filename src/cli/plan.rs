//! `qlora plan`: the device-memory plan of one QLoRA training step for a model (a `config.json` or
//! a built-in Llama shape) and settings, as a table by category or JSON, whether it fits a budget,
//! and the longest sequence that does (`train::plan`).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::model::config::{LlamaConfig, RopeScaling, TorchDtype};
use crate::model::gguf::{is_gguf, GgufFile};
use crate::peft::TargetModule;
use crate::train::plan::{
    dtype_name, format_bytes, MemoryPlan, Phase, PlanSettings, Target, MAX_PLAN_SEQ_LEN,
};
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Built-in model shapes (Hugging Face `config.json` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// meta-llama/Llama-2-7b-hf.
    #[value(name = "llama2-7b")]
    Llama2_7b,
    /// meta-llama/Llama-2-13b-hf.
    #[value(name = "llama2-13b")]
    Llama2_13b,
    /// meta-llama/Llama-2-70b-hf (the QLoRA paper's headline size: 8 key/value heads).
    #[value(name = "llama2-70b")]
    Llama2_70b,
    /// meta-llama/Meta-Llama-3-8B.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// The demo's shape: 2 layers, hidden 64, 4 heads sharing 2 key/value heads, vocab 256.
    Tiny,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Llama2_7b => "llama2-7b",
            Preset::Llama2_13b => "llama2-13b",
            Preset::Llama2_70b => "llama2-70b",
            Preset::Llama3_8b => "llama3-8b",
            Preset::Tiny => "tiny",
        }
    }

    /// The model's config.
    pub fn config(self) -> LlamaConfig {
        // (hidden, intermediate, layers, heads, kv heads, vocab, max positions, rope theta)
        let (h, m, l, heads, kv, v, max_pos, theta) = match self {
            Preset::Llama2_7b => (4096, 11008, 32, 32, 32, 32000, 4096, 10_000.0),
            Preset::Llama2_13b => (5120, 13824, 40, 40, 40, 32000, 4096, 10_000.0),
            Preset::Llama2_70b => (8192, 28672, 80, 64, 8, 32000, 4096, 10_000.0),
            Preset::Llama3_8b => (4096, 14336, 32, 32, 8, 128_256, 8192, 500_000.0),
            Preset::Tiny => (64, 128, 2, 4, 2, 256, 2048, 10_000.0),
        };
        LlamaConfig {
            hidden_size: h,
            intermediate_size: m,
            num_hidden_layers: l,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: h / heads,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: false,
            vocab_size: v,
            max_position_embeddings: max_pos,
            torch_dtype: Some(TorchDtype::BF16),
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            quantization: None,
        }
    }
}

/// f32 or bf16, as the command line names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    fn torch(self) -> TorchDtype {
        match self {
            DtypeArg::F32 => TorchDtype::F32,
            DtypeArg::Bf16 => TorchDtype::BF16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// The kernel path on a CUDA device.
    Cuda,
    /// The tensor-op path on the CPU (measured by tests/plan.rs).
    Cpu,
    /// The kernel path on the CPU emulator (measured by tests/plan.rs).
    Emulated,
}

/// Arguments of `qlora plan`.
#[derive(Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("shape").required(true).args(["model", "preset"])))]
pub struct PlanArgs {
    /// A model directory (its config.json gives the shapes) or a GGUF file (its metadata).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A built-in model shape.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// Adapted linears, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Device memory in GiB (2^30 bytes; a "24 GB" card has 24 GiB).
    #[arg(long, default_value_t = 24.0)]
    pub budget_gb: f64,
    /// Page AdamW states of tensors with at least 1e5 elements to host memory.
    #[arg(long)]
    pub paged: bool,
    /// Dtype of the dense weights and activations.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub compute_dtype: DtypeArg,
    /// Dtype of LoRA A and B.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub adapter_dtype: DtypeArg,
    /// Which implementation's memory layout to plan.
    #[arg(long, value_enum, default_value_t = TargetArg::Cuda)]
    pub target: TargetArg,
    /// Keep the linears dense in the compute dtype instead of NF4.
    #[arg(long)]
    pub no_quantize: bool,
    /// NF4 block size.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Keep f32 NF4 scales instead of double-quantizing them.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// GiB set aside for what the plan does not compute (CUDA context, fragmentation).
    #[arg(long, default_value_t = 0.0)]
    pub reserve_gb: f64,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn gib_to_bytes(what: &'static str, gib: f64) -> Result<u128> {
    if !gib.is_finite() || !(0.0..=1e6).contains(&gib) {
        return Err(Error::invalid(
            "plan",
            format!("{what} {gib} is not a GiB amount in 0..=1e6"),
        ));
    }
    Ok((gib * GIB).round() as u128)
}

/// The config and a name for it.
fn model_config(args: &PlanArgs) -> Result<(LlamaConfig, String)> {
    match (&args.model, args.preset) {
        (Some(path), None) if is_gguf(path) => {
            Ok((GgufFile::open(path)?.config()?, path.display().to_string()))
        }
        (Some(dir), None) => Ok((
            LlamaConfig::from_file(dir.join("config.json"))?,
            dir.display().to_string(),
        )),
        (None, Some(preset)) => Ok((preset.config(), preset.name().to_string())),
        _ => Err(Error::invalid(
            "plan",
            "give exactly one of --model DIR and --preset NAME",
        )),
    }
}

fn settings(args: &PlanArgs, config: &LlamaConfig) -> Result<PlanSettings> {
    let targets = args
        .targets
        .iter()
        .map(|t| t.trim().parse::<TargetModule>())
        .collect::<Result<Vec<_>>>()?;
    // A bitsandbytes checkpoint says how its scales are stored; quantize-on-load double-quantizes.
    let double_quant = match &config.quantization {
        Some(q) => q.double_quant,
        None => !args.no_double_quant,
    };
    Ok(PlanSettings {
        target: match args.target {
            TargetArg::Cuda => Target::Cuda,
            TargetArg::Cpu => Target::Cpu,
            TargetArg::Emulated => Target::Emulated,
        },
        r: args.r,
        targets,
        adapter_dtype: args.adapter_dtype.torch(),
        batch: args.batch,
        seq_len: args.seq_len,
        compute_dtype: args.compute_dtype.torch(),
        quantized: !args.no_quantize || config.quantization.is_some(),
        blocksize: args.blocksize,
        double_quant,
        paged_states: args.paged,
        grad_accumulation: args.grad_accum,
        reserve_bytes: gib_to_bytes("--reserve-gb", args.reserve_gb)?,
    })
}

/// Runs `qlora plan`: prints the plan as a table (or JSON with `--json`).
pub fn run(args: &PlanArgs) -> Result<()> {
    let (config, name) = model_config(args)?;
    let settings = settings(args, &config)?;
    let budget = gib_to_bytes("--budget-gb", args.budget_gb)?;
    let plan = MemoryPlan::new(&config, &settings)?;
    let max_seq = MemoryPlan::max_seq_len(&config, &settings, budget)?;
    if args.json {
        let value = json!({
            "model": name,
            "plan": plan,
            "total_device_bytes": plan.total_device_bytes(),
            "budget_bytes": budget,
            "fits": plan.fits(budget),
            "max_seq_len": max_seq,
            "max_position_embeddings": config.max_position_embeddings,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(|e| Error::encode("the plan", e))?
        );
        return Ok(());
    }
    print!("{}", render(&plan, &config, &name, budget, max_seq));
    Ok(())
}

fn render(
    plan: &MemoryPlan,
    config: &LlamaConfig,
    name: &str,
    budget: u128,
    max_seq: Option<usize>,
) -> String {
    let s = &plan.settings;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "model {name}: hidden {}, intermediate {}, {} layers, {} heads ({} kv), vocab {}",
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size
    ));
    let targets: Vec<&str> = s.targets.iter().map(|t| t.name()).collect();
    line(format!(
        "settings: batch {} x seq {}, LoRA r {} on {}, {} NF4, paged states {}",
        s.batch,
        s.seq_len,
        s.r,
        targets.join(","),
        match (s.quantized, s.double_quant) {
            (false, _) => "no".to_string(),
            (true, true) => format!("blocksize {} + double quant", s.blocksize),
            (true, false) => format!("blocksize {}", s.blocksize),
        },
        if s.paged_states { "on" } else { "off" }
    ));
    line(match s.target {
        Target::Cuda | Target::Emulated => format!(
            "target {} (the kernel path, replayed allocation by allocation{}): activations and \
             their gradients in {}, fused attention, logits in chunks of {} rows",
            match s.target {
                Target::Cuda => "cuda",
                _ => "emulated",
            },
            match s.target {
                Target::Cuda => "; not yet measured on a GPU",
                _ => "; checked against allocated bytes",
            },
            dtype_name(s.compute_dtype),
            plan.logits_chunk_rows
        ),
        Target::Cpu => format!(
            "target cpu (the tensor-op path, checked against allocated bytes): {0} weights \
             and checkpointed layer inputs, other activations and gradients in f32, eager \
             attention, whole-vocabulary logits",
            dtype_name(s.compute_dtype)
        ),
    });
    line(String::new());
    line(format!("{:<28} {:>12}  {}", "category", "bytes", "what"));
    for (label, bytes, note) in plan.rows() {
        line(format!("{label:<28} {:>12}  {note}", format_bytes(bytes)));
    }
    let total = plan.total_device_bytes();
    line(format!(
        "{:<28} {:>12}  peak during the {}",
        "total (device)",
        format_bytes(total),
        match plan.peak_phase {
            Phase::Forward => "checkpointed forward's last layer",
            Phase::Loss => "loss and dL/dlogits",
            Phase::Backward => "backward (one layer recomputed and pulled back)",
        }
    ));
    if plan.paged_host_bytes > 0 {
        line(format!(
            "{:<28} {:>12}  host memory, not in the total",
            "paged optimizer states",
            format_bytes(plan.paged_host_bytes)
        ));
    }
    line(String::new());
    line(format!(
        "budget {}: {}",
        format_bytes(budget),
        if plan.fits(budget) {
            format!("fits, {} to spare", format_bytes(budget - total))
        } else {
            format!("does not fit, {} over", format_bytes(total - budget))
        }
    ));
    line(match max_seq {
        None => format!("no sequence length fits {}", format_bytes(budget)),
        Some(t) if t == MAX_PLAN_SEQ_LEN => format!(
            "longest sequence that fits {}: at least {t} tokens (the search limit)",
            format_bytes(budget)
        ),
        Some(t) => format!(
            "longest sequence that fits {}: {t} tokens at batch {}{}",
            format_bytes(budget),
            s.batch,
            if t > config.max_position_embeddings {
                format!(
                    " (beyond the model's max_position_embeddings {})",
                    config.max_position_embeddings
                )
            } else {
                String::new()
            }
        ),
    });
    line(format!(
        "gradient accumulation ({}) does not raise the peak beyond one accumulator of gradients",
        s.grad_accumulation,
    ));
    out
}
