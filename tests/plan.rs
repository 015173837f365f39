//! The memory planner (`train::plan`) against bytes actually allocated: a counting global allocator
//! measures a tiny NF4 Llama loaded with quantize-on-load, its LoRA adapter, gradients and AdamW
//! moments, and the peak of a checkpointed forward + backward on the CPU; `qlora plan` end to end.

use std::process::Command;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use qlora::kernels::adamw::AdamWConfig;
use qlora::model::backward::lora_gradients;
use qlora::model::llama::LlamaModel;
use qlora::model::KernelPath;
use qlora::model::{LlamaConfig, LlamaWeights, LoadOptions, RopeScaling, TorchDtype};
use qlora::peft::{LoraAdapter, LoraConfig, TargetModule};
use qlora::testing::alloc::{live, peak, reset_peak, CountingAllocator, Tracked};
use qlora::tolerance::{PLAN_METADATA_BYTES_PER_TENSOR, PLAN_STEP_PEAK_RTOL};
use qlora::train::plan::{dtype_name, MemoryPlan, Phase, PlanSettings, Target};
use qlora::train::trainer::{CpuAdamW, Optimizer};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Measuring tests hold this: they set RAYON_NUM_THREADS, which no other test may read meanwhile.
static MEASURING: Mutex<()> = Mutex::new(());

/// Two layers with grouped-query attention, sized so tensors of a few tens of KiB dominate the
/// per-tensor metadata: rows B·T = 128, hidden 128, intermediate 344, vocab 512.
fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: false,
        vocab_size: 512,
        max_position_embeddings: 256,
        torch_dtype: None,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: None,
        quantization: None,
    }
}

/// A measured case: compute dtype, batch, sequence length and vocabulary.
#[derive(Clone, Copy, Debug)]
struct Case {
    compute: TorchDtype,
    batch: usize,
    seq: usize,
    vocab: usize,
}

const BASE: Case = Case {
    compute: TorchDtype::F32,
    batch: 2,
    seq: 64,
    vocab: 512,
};
const RANK: usize = 8;

/// A random checkpoint of `config` written to a fresh directory, as transformers would save it.
fn write_checkpoint(config: &LlamaConfig, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-plan-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = LlamaWeights::random(config, 0.02, 5, DType::F32, &Device::Cpu).unwrap();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        w.embed_tokens.clone(),
    );
    tensors.insert("model.norm.weight".to_string(), w.norm.clone());
    tensors.insert("lm_head.weight".to_string(), w.lm_head().clone());
    for (i, layer) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.clone(),
        );
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.clone(),
        );
        for (module, linear) in TargetModule::ALL.into_iter().zip([
            &layer.q_proj,
            &layer.k_proj,
            &layer.v_proj,
            &layer.o_proj,
            &layer.gate_proj,
            &layer.up_proj,
            &layer.down_proj,
        ]) {
            let qlora::model::Linear::Dense(t) = linear else {
                unreachable!("random weights are dense")
            };
            tensors.insert(
                format!("{p}.{}.{}.weight", module.block(), module.name()),
                t.clone(),
            );
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn cpu_settings(case: Case) -> PlanSettings {
    settings(case, Target::Cpu)
}

fn settings(case: Case, target: Target) -> PlanSettings {
    PlanSettings {
        target,
        r: RANK,
        batch: case.batch,
        compute_dtype: case.compute,
        ..PlanSettings::cpu(case.seq)
    }
}

/// A batch with every position labelled (the planner's worst case for the loss).
fn batch(case: Case) -> (Tensor, Tensor, Tensor) {
    let v = case.vocab as u32;
    let ids: Vec<u32> = (0..case.batch * case.seq)
        .map(|i| (i as u32 * 37 + 11) % v)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&id| i64::from((id + 1) % v)).collect();
    let shape = (case.batch, case.seq);
    (
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap(),
        Tensor::ones(shape, DType::U8, &Device::Cpu).unwrap(),
        Tensor::from_vec(labels, shape, &Device::Cpu).unwrap(),
    )
}

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// `measured` is `planned` plus at most `tensors` tensors' worth of host metadata.
fn assert_payload_plus_metadata(what: &str, measured: isize, planned: u128, tensors: usize) {
    let planned = planned as isize;
    let slack = (tensors * PLAN_METADATA_BYTES_PER_TENSOR) as isize;
    eprintln!(
        "{what}: measured {measured} B, planned {planned} B, metadata {} B over {tensors} tensors",
        measured - planned
    );
    assert!(
        measured >= planned && measured <= planned + slack,
        "{what}: measured {measured} B, planned {planned} B (+ up to {slack} B of metadata)"
    );
}

/// Loads, adapts, steps and updates a tiny model, measuring each part against the plan; the step's
/// peak must be in `phase`.
fn check_cpu_step(case: Case, phase: Phase) {
    check_step(case, Target::Cpu, phase);
}

/// [`check_cpu_step`] for `target`: the tensor-op path ([`Target::Cpu`]) or the kernel path on
/// the emulator ([`Target::Emulated`]).
fn check_step(case: Case, target: Target, phase: Phase) {
    let _guard = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    // One thread (candle reads this variable at every op) runs every op on this, the counted,
    // thread; candle's GEMM keeps packing buffers per thread, which the warm-up step allocates.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let _tracked = Tracked::start();
    let config = LlamaConfig {
        vocab_size: case.vocab,
        ..tiny_config()
    };
    let compute = case.compute;
    let name = format!(
        "{target:?}-{}-{}-{}",
        dtype_name(compute),
        case.seq,
        case.vocab
    );
    let dir = write_checkpoint(&config, &name);
    let plan = MemoryPlan::new(&config, &settings(case, target)).unwrap();
    assert_eq!(plan.peak_phase, phase, "{case:?}");

    // (a) The frozen model, NF4 on load: codes, double-quantized scales, dense tensors.
    let before = live();
    let options = LoadOptions {
        dtype: compute.to_candle(),
        device: Device::Cpu,
        quantize: true,
    };
    let weights = LlamaWeights::load(&dir, &config, &options).unwrap();
    let model_bytes = live() - before;
    let layers = config.num_hidden_layers;
    // Dense tensors (embeddings, lm_head, final norm, two norms per layer) and NF4 linears.
    let tensors = 3 + 2 * layers + 7 * layers;
    assert_payload_plus_metadata("model", model_bytes, plan.model_bytes(), tensors);
    let model = LlamaModel::new(config.clone(), weights).unwrap();
    let model = match target {
        Target::Emulated => model.with_kernel_path(KernelPath::Emulated).unwrap(),
        _ => model,
    };

    // (b) Adapter, gradients, AdamW moments.
    let lora = LoraConfig {
        r: RANK,
        ..LoraConfig::default()
    };
    let before = live();
    let mut adapter = LoraAdapter::init(lora, &config, DType::F32, &Device::Cpu, 3).unwrap();
    let pairs = 7 * layers;
    assert_payload_plus_metadata("adapter", live() - before, plan.adapters, 2 * pairs);

    let (ids, mask, labels) = batch(case);
    // A first step warms up what the GEMM keeps between calls (its packing buffers).
    let warm = lora_gradients(&model, &adapter, &ids, Some(&mask), &labels).unwrap();
    drop(warm);

    // (c) The peak of a forward + backward above the model and adapter.
    let before = live();
    reset_peak();
    let grads = lora_gradients(&model, &adapter, &ids, Some(&mask), &labels).unwrap();
    let step_peak = peak() - before;
    assert_payload_plus_metadata("gradients", live() - before, plan.gradients, 2 * pairs);
    let planned = plan.step_bytes() as f64;
    let ratio = step_peak as f64 / planned;
    eprintln!(
        "{name}: step peak measured {step_peak} B ({:.3} MiB), planned {} B ({:.3} MiB), ratio \
         {ratio:.4}, peak phase {:?}",
        mib(step_peak),
        planned,
        planned / (1u64 << 20) as f64,
        plan.peak_phase
    );
    assert!(
        (ratio - 1.0).abs() <= PLAN_STEP_PEAK_RTOL,
        "step peak {step_peak} B vs planned {planned} B: ratio {ratio}"
    );

    let mut optimizer = CpuAdamW::new(AdamWConfig::default()).unwrap();
    let before = live();
    optimizer
        .step(&mut adapter, &grads.lora, 1e-4, 1.0)
        .unwrap();
    // New A and B replace the old ones, so only the moments remain.
    assert_payload_plus_metadata(
        "optimizer states",
        live() - before,
        plan.optimizer_device,
        4 * pairs,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn planned_bytes_match_allocated_bytes_of_an_f32_cpu_training_step() {
    check_cpu_step(BASE, Phase::Backward);
}

#[test]
fn planned_bytes_match_allocated_bytes_of_a_bf16_cpu_training_step() {
    let case = Case {
        compute: TorchDtype::BF16,
        ..BASE
    };
    check_cpu_step(case, Phase::Backward);
}

#[test]
fn planned_bytes_match_allocated_bytes_of_a_bf16_kernel_step_on_the_emulator() {
    // The kernel path stores bf16 activations and gradients; the plan replays its allocations
    // (the CUDA plan is the same replay with the device's products). Sequences of 128 keep the
    // bf16 payload large beside candle's per-tensor metadata, which the plan leaves out (and
    // which is larger in a `cuda` build).
    let case = Case {
        compute: TorchDtype::BF16,
        seq: 128,
        ..BASE
    };
    check_step(case, Target::Emulated, Phase::Backward);
}

#[test]
fn planned_peak_follows_long_sequences_into_the_attention_scores() {
    // One sequence of 256: the [B, heads, T, T] tensors outweigh the rest of the layer.
    let case = Case {
        batch: 1,
        seq: 256,
        ..BASE
    };
    check_cpu_step(case, Phase::Backward);
}

#[test]
fn planned_peak_moves_to_the_loss_with_a_large_vocabulary() {
    let case = Case {
        vocab: 8192,
        ..BASE
    };
    check_cpu_step(case, Phase::Loss);
}

fn qlora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

#[test]
fn plan_command_prints_the_13b_table_and_json_agrees_with_the_library() {
    let _guard = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let args = [
        "plan",
        "--preset",
        "llama2-13b",
        "--r",
        "16",
        "--seq-len",
        "2048",
        "--paged",
    ];
    let out = qlora().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "NF4 weights",
        "quantization state",
        "optimizer states (device)",
        "checkpointed activations",
        "recompute working set",
        "total (device)",
        "longest sequence that fits 24.00 GiB",
    ] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }

    let out = qlora().args(args).arg("--json").output().unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = qlora::cli::plan::Preset::Llama2_13b.config();
    let plan = MemoryPlan::new(&config, &PlanSettings::cuda(2048)).unwrap();
    assert_eq!(
        json["total_device_bytes"].as_u64().map(u128::from),
        Some(plan.total_device_bytes())
    );
    assert_eq!(json["fits"], serde_json::Value::Bool(true));
    let budget = 24u128 << 30;
    let max = MemoryPlan::max_seq_len(&config, &PlanSettings::cuda(2048), budget)
        .unwrap()
        .unwrap();
    assert_eq!(json["max_seq_len"].as_u64(), Some(max as u64));
}

#[test]
fn plan_command_reads_a_config_json_and_rejects_bad_input() {
    let _guard = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("qlora-plan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 128, "intermediate_size": 344,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512}"#,
    )
    .unwrap();
    let out = qlora()
        .args([
            "plan",
            "--target",
            "cpu",
            "--compute-dtype",
            "f32",
            "--r",
            "8",
            "--batch",
            "2",
            "--seq-len",
            "64",
            "--json",
            "--model",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = MemoryPlan::new(&tiny_config(), &cpu_settings(BASE)).unwrap();
    assert_eq!(
        json["total_device_bytes"].as_u64().map(u128::from),
        Some(plan.total_device_bytes())
    );

    for (bad, message) in [
        (
            vec!["--preset", "tiny", "--targets", "q_proj,lm_head"],
            "lm_head",
        ),
        (vec!["--preset", "tiny", "--seq-len", "0"], "seq_len"),
        (vec!["--preset", "tiny", "--budget-gb=-1"], "--budget-gb"),
    ] {
        let out = qlora().arg("plan").args(&bad).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} succeeded");
        assert!(stderr.contains(message), "{bad:?}: {stderr}");
    }
    let out = qlora().args(["plan", "--r", "8"]).output().unwrap();
    assert!(!out.status.success(), "no model or preset was accepted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn planned_kernel_step_peak_moves_to_the_chunked_loss_with_a_large_vocabulary() {
    let case = Case {
        compute: TorchDtype::BF16,
        vocab: 8192,
        ..BASE
    };
    check_step(case, Target::Emulated, Phase::Loss);
}
