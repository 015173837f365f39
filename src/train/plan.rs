//! The device-memory plan of a QLoRA training step: bytes per category (NF4 weights, their
//! quantization state, dense weights, adapters, gradients, optimizer states, checkpointed
//! activations, one layer's recompute, logits/loss, workspace) for a Llama config and settings.
//!
//! Every count follows how this crate stores things (docs/ARCHITECTURE.md, "Memory plan").
//! [`Target::Cpu`] is the tensor-op path (`model::backward` with f32 tensors holding
//! compute-dtype values, the seven frozen linears of one layer widened to f32 while it is
//! recomputed, eager attention, whole-vocabulary logits). [`Target::Cuda`] and
//! [`Target::Emulated`] are the kernel path, one code on two devices (activations and their
//! gradients in the compute dtype, fused attention, logits in the runtime's row chunks): the plan
//! replays its allocations in order ([`KernelStep`]), and the two differ only in what a product
//! with a frozen weight allocates (cuBLAS or the NF4 dequant-GEMM on CUDA; AVX-512 BF16 or f32
//! tiles and each layer's NF4 linears dequantized on the emulator). `tests/plan.rs` checks the CPU and the
//! emulated plans against bytes actually allocated; the CUDA plan is the same replay with the
//! device's products and has not been measured on a GPU.

use serde::Serialize;

use crate::kernels::nf4_gemm::{GemmOp, Nf4MatmulPath, Nf4MatmulPlan};
use crate::model::config::{LlamaConfig, TorchDtype};
use crate::model::matmul::Weight;
use crate::peft::TargetModule;
use crate::quant::nf4::{NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES};
use crate::{Error, Result};

/// Optimizer states of tensors with fewer elements than this stay on the device even when paged
/// (bitsandbytes' rule for paged optimizers).
pub const PAGED_MIN_ELEMS: usize = 100_000;
/// cuBLAS(Lt) workspace: NVIDIA's recommended size for Hopper (4 MiB before it), allotted once.
pub const CUBLAS_WORKSPACE_BYTES: u128 = 32 << 20;
/// The longest sequence [`MemoryPlan::max_seq_len`] searches up to.
pub const MAX_PLAN_SEQ_LEN: usize = 1 << 20;
/// Bytes of the NF4 code book (16 f32) each quantized linear carries.
const NF4_CODE_BYTES: u128 = 16 * 4;
/// Bytes of the nested 8-bit map (256 f32) and the offset (one f32) of a double-quantized linear.
const NESTED_MAP_BYTES: u128 = 256 * 4 + 4;
/// Largest dimension a config or setting may have here, so every count fits in u128 easily.
const MAX_DIM: usize = 1 << 24;

/// Which implementation's memory layout to plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The tensor-op path on the CPU, the default there (measured by the tests).
    Cpu,
    /// The kernel path on a CUDA device (the same replay as [`Target::Emulated`] with the
    /// device's products; not yet measured on a GPU).
    Cuda,
    /// The kernel path on the CPU emulator (`KernelPath::Emulated`, measured by the tests).
    Emulated,
}

/// What a plan is computed for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanSettings {
    pub target: Target,
    /// LoRA rank.
    pub r: usize,
    /// Adapted linears of every layer.
    #[serde(serialize_with = "serialize_targets")]
    pub targets: Vec<TargetModule>,
    /// dtype of LoRA A and B (f32 or bf16).
    #[serde(serialize_with = "serialize_dtype")]
    pub adapter_dtype: TorchDtype,
    pub batch: usize,
    pub seq_len: usize,
    /// dtype of the dense weights and of the rounded activations (f32 or bf16).
    #[serde(serialize_with = "serialize_dtype")]
    pub compute_dtype: TorchDtype,
    /// The seven linears of each layer in NF4; otherwise dense in the compute dtype.
    pub quantized: bool,
    /// NF4 block size (64 as quantize-on-load uses).
    pub blocksize: usize,
    /// Double quantization of the NF4 scales (nested blocks of 256).
    pub double_quant: bool,
    /// AdamW states of tensors with at least [`PAGED_MIN_ELEMS`] elements live in host memory.
    pub paged_states: bool,
    /// Micro-batches per update. The trainer keeps an accumulator beside each micro-batch's
    /// gradients when this exceeds 1.
    pub grad_accumulation: usize,
    /// Device memory set aside for what this plan does not compute (CUDA context, allocator
    /// fragmentation): an assumption given by the user, counted in the total. 0 on the CPU.
    pub reserve_bytes: u128,
}

impl PlanSettings {
    /// Today's CPU path: LoRA r 16 on all seven linears in f32, batch 1, f32 compute, NF4 with
    /// blocksize 64 and double quant, no paging.
    pub fn cpu(seq_len: usize) -> Self {
        Self {
            target: Target::Cpu,
            r: 16,
            targets: TargetModule::ALL.to_vec(),
            adapter_dtype: TorchDtype::F32,
            batch: 1,
            seq_len,
            compute_dtype: TorchDtype::F32,
            quantized: true,
            blocksize: 64,
            double_quant: true,
            paged_states: false,
            grad_accumulation: 1,
            reserve_bytes: 0,
        }
    }

    /// The CUDA kernel path: as [`Self::cpu`] but bf16 compute, paged states and no reserve.
    pub fn cuda(seq_len: usize) -> Self {
        Self {
            target: Target::Cuda,
            compute_dtype: TorchDtype::BF16,
            paged_states: true,
            ..Self::cpu(seq_len)
        }
    }

    fn validate(&self, config: &LlamaConfig) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid("MemoryPlan", reason));
        let dims = [
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
            ("head_dim", config.head_dim),
            ("vocab_size", config.vocab_size),
            ("r", self.r),
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("grad_accumulation", self.grad_accumulation),
        ];
        if let Some((name, v)) = dims.iter().find(|(_, v)| *v == 0 || *v > MAX_DIM) {
            return bad(format!("{name} {v} is not in 1..={MAX_DIM}"));
        }
        if !config
            .num_attention_heads
            .is_multiple_of(config.num_key_value_heads)
        {
            return bad(format!(
                "{} heads are not a multiple of {} key/value heads",
                config.num_attention_heads, config.num_key_value_heads
            ));
        }
        if self.target == Target::Cpu && self.paged_states {
            return bad("paged optimizer states exist only on the CUDA path".to_string());
        }
        if self.targets.is_empty() {
            return bad("no target module".to_string());
        }
        if (1..self.targets.len()).any(|i| self.targets[..i].contains(&self.targets[i])) {
            return bad(format!("{:?} names a module twice", self.targets));
        }
        if self.quantized && !SUPPORTED_BLOCKSIZES.contains(&self.blocksize) {
            return bad(format!(
                "blocksize {} is not one of {SUPPORTED_BLOCKSIZES:?}",
                self.blocksize
            ));
        }
        for (name, dtype) in [
            ("compute dtype", self.compute_dtype),
            ("adapter dtype", self.adapter_dtype),
        ] {
            if dtype == TorchDtype::F16 {
                return bad(format!("{name} f16 is not supported (f32 or bf16)"));
            }
        }
        Ok(())
    }
}

fn serialize_targets<S: serde::Serializer>(
    targets: &[TargetModule],
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_seq(targets.iter().map(|t| t.name()))
}

fn serialize_dtype<S: serde::Serializer>(
    dtype: &TorchDtype,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str(dtype_name(*dtype))
}

fn dtype_bytes(dtype: TorchDtype) -> u128 {
    match dtype {
        TorchDtype::F32 => 4,
        TorchDtype::F16 | TorchDtype::BF16 => 2,
    }
}

/// Which part of the step holds the most memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The checkpointed forward's last layer (every earlier layer input saved).
    Forward,
    /// Final norm, lm_head, loss and dL/dlogits.
    Loss,
    /// The backward of one layer (the last, or on the kernel path whichever end holds more):
    /// its forward recomputed, its gradients computed.
    Backward,
}

/// Bytes by category for one training step. `total_device_bytes` is their sum at the peak phase;
/// `paged_host_bytes` (optimizer states paged out) is host memory and not in the total.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub settings: PlanSettings,
    /// Packed 4-bit codes of the quantized linears, `ceil(n / 2)` bytes each.
    pub nf4_weights: u128,
    /// NF4 scales: per block an f32 absmax, or with double quant a u8 code per block, an f32 per
    /// 256 blocks, the offset and the 256-entry nested map; plus the 16-entry code book.
    pub quant_state: u128,
    /// Unquantized weights in the compute dtype: embeddings, lm_head (unless tied), RMSNorm
    /// weights, and the linears themselves when not quantized.
    pub dense_weights: u128,
    /// LoRA A `[r, in]` and B `[out, r]` in the adapter dtype.
    pub adapters: u128,
    /// f32 gradients of A and B (twice on the CPU with accumulation: accumulator + micro-batch).
    pub gradients: u128,
    /// f32 AdamW moments (m and v) kept on the device.
    pub optimizer_device: u128,
    /// f32 AdamW moments paged to host memory (not in the device total).
    pub paged_host_bytes: u128,
    /// Each layer's input kept by the checkpointed forward, and from the loss on the last
    /// layer's output (CPU: f32; kernel path: compute dtype, the inputs not yet pulled back).
    pub activations: u128,
    /// One layer recomputed and pulled back at the peak: its frozen weights as the layer
    /// multiplies by them (CPU: all seven widened to f32; emulator: dequantized to the compute
    /// dtype; CUDA: none for NF4, which the dequant-GEMM reads), the intermediates the backward
    /// reads, the gradient temporaries alive at the worst moment and the products' scratch. On
    /// the kernel path, net of the LoRA gradients not yet made at that moment (`gradients` counts
    /// them whole).
    pub recompute: u128,
    /// Logits, dL/dlogits and loss temporaries alive at the peak (CPU: whole `[B·T, V]` f32
    /// tensors; kernel path: one chunk of rows, then the final norm's output and gradient).
    pub logits_loss: u128,
    /// Attention mask and RoPE tables (CPU); RoPE tables and positions (kernel path), with the
    /// cuBLAS workspace and the tables' device copies on CUDA.
    pub workspace: u128,
    /// The user's reserve for what is not computed here.
    pub reserve: u128,
    pub peak_phase: Phase,
    /// LoRA parameters in all (A and B of every adapted linear).
    pub lora_params: u128,
    /// Rows of logits the kernel path computes at a time (`[rows, vocab]` per chunk, as many as
    /// fit 64 MiB of f32): the runtime's own choice for the vocabulary.
    pub logits_chunk_rows: usize,
}

/// Element counts of one layer's tensors, for the activation inventories.
struct LayerDims {
    /// Rows: batch × sequence.
    n: u128,
    h: u128,
    /// Query width `heads · head_dim`.
    q: u128,
    /// Key/value width `kv_heads · head_dim`.
    kv: u128,
    /// Width of keys and values as the CPU attention keeps them (repeated to every head).
    kv_rep: u128,
    m: u128,
    /// Attention scores `B · heads · T · T`.
    scores: u128,
    /// Row statistics `B · heads · T`.
    stats: u128,
    r: u128,
    vocab: u128,
    head_dim: u128,
    t: u128,
    b: u128,
}

impl LayerDims {
    fn new(config: &LlamaConfig, s: &PlanSettings) -> Self {
        let u = |x: usize| x as u128;
        let (b, t) = (u(s.batch), u(s.seq_len));
        let heads = u(config.num_attention_heads);
        let q = heads * u(config.head_dim);
        let kv = u(config.num_key_value_heads) * u(config.head_dim);
        Self {
            n: b * t,
            h: u(config.hidden_size),
            q,
            kv,
            kv_rep: if q == kv { kv } else { q },
            m: u(config.intermediate_size),
            scores: b * heads * t * t,
            stats: b * heads * t,
            r: u(s.r),
            vocab: u(config.vocab_size),
            head_dim: u(config.head_dim),
            t,
            b,
        }
    }
}

impl MemoryPlan {
    /// The plan for `config` with `settings`; errors name an out-of-range setting.
    pub fn new(config: &LlamaConfig, settings: &PlanSettings) -> Result<Self> {
        settings.validate(config)?;
        let s = settings;
        let u = |x: usize| x as u128;
        let layers = u(config.num_hidden_layers);
        let compute = dtype_bytes(s.compute_dtype);
        let shapes = TargetModule::ALL.map(|m| m.shape(config));

        let (mut nf4_weights, mut quant_state, mut dense_linears) = (0u128, 0u128, 0u128);
        for [out_f, in_f] in shapes {
            let numel = u(out_f) * u(in_f);
            if s.quantized {
                let blocks = numel.div_ceil(u(s.blocksize));
                nf4_weights += layers * numel.div_ceil(2);
                let scales = match s.double_quant {
                    true => blocks + 4 * blocks.div_ceil(u(NESTED_BLOCKSIZE)) + NESTED_MAP_BYTES,
                    false => 4 * blocks,
                };
                quant_state += layers * (scales + NF4_CODE_BYTES);
            } else {
                dense_linears += layers * numel * compute;
            }
        }
        let (v, h) = (u(config.vocab_size), u(config.hidden_size));
        let heads = if config.tie_word_embeddings { 1 } else { 2 };
        let dense_weights = (heads * v * h + (2 * layers + 1) * h) * compute + dense_linears;

        let mut lora_params = 0u128;
        let (mut state_device, mut state_host) = (0u128, 0u128);
        for module in &s.targets {
            let [out_f, in_f] = module.shape(config);
            for numel in [s.r * in_f, out_f * s.r] {
                lora_params += layers * u(numel);
                let moments = layers * u(numel) * 2 * 4;
                if s.paged_states && numel >= PAGED_MIN_ELEMS {
                    state_host += moments;
                } else {
                    state_device += moments;
                }
            }
        }
        // The trainer sums each micro-batch's gradients into an accumulator, on every device.
        let accumulators = if s.grad_accumulation > 1 { 2 } else { 1 };
        let gradients = accumulators * lora_params * 4;

        let d = LayerDims::new(config, s);
        let step = match s.target {
            Target::Cpu => {
                // LayerPass::new widens each frozen linear to f32 unless it already is f32.
                let layer_numel: u128 = shapes.iter().map(|[o, i]| u(*o) * u(*i)).sum();
                let widened = s.quantized || compute != 4;
                let weights_f32 = if widened { layer_numel * 4 } else { 0 };
                cpu_step(&d, layers, weights_f32, s, compute != 4)
            }
            Target::Cuda => kernel_step(&d, layers, &shapes, s, KernelDevice::Cuda),
            Target::Emulated => kernel_step(&d, layers, &shapes, s, KernelDevice::Emulated),
        };
        Ok(Self {
            settings: s.clone(),
            nf4_weights,
            quant_state,
            dense_weights,
            adapters: lora_params * dtype_bytes(s.adapter_dtype),
            gradients,
            optimizer_device: state_device,
            paged_host_bytes: state_host,
            activations: step.activations,
            recompute: step.recompute,
            logits_loss: step.logits_loss,
            workspace: step.workspace,
            reserve: s.reserve_bytes,
            peak_phase: step.phase,
            lora_params,
            logits_chunk_rows: crate::model::loss_chunk_rows(config.vocab_size),
        })
    }

    /// Weights of the frozen model: NF4 codes, their quantization state and the dense tensors.
    pub fn model_bytes(&self) -> u128 {
        self.nf4_weights + self.quant_state + self.dense_weights
    }

    /// What one step adds at its peak on top of the model, adapter and optimizer states:
    /// gradients, activations, the recompute working set, logits/loss and workspace.
    pub fn step_bytes(&self) -> u128 {
        self.gradients + self.activations + self.recompute + self.logits_loss + self.workspace
    }

    /// Everything on the device at the step's peak.
    pub fn total_device_bytes(&self) -> u128 {
        self.model_bytes()
            + self.adapters
            + self.optimizer_device
            + self.step_bytes()
            + self.reserve
    }

    /// Whether the peak fits in `budget_bytes`.
    pub fn fits(&self, budget_bytes: u128) -> bool {
        self.total_device_bytes() <= budget_bytes
    }

    /// The longest sequence (up to [`MAX_PLAN_SEQ_LEN`]) whose plan with these settings fits
    /// `budget_bytes`, or `None` when not even one token does. The peak grows with the sequence
    /// length, so a binary search finds it.
    pub fn max_seq_len(
        config: &LlamaConfig,
        settings: &PlanSettings,
        budget_bytes: u128,
    ) -> Result<Option<usize>> {
        let fits = |t: usize| -> Result<bool> {
            let s = PlanSettings {
                seq_len: t,
                ..settings.clone()
            };
            Ok(MemoryPlan::new(config, &s)?.fits(budget_bytes))
        };
        if !fits(1)? {
            return Ok(None);
        }
        let (mut lo, mut hi) = (1usize, MAX_PLAN_SEQ_LEN);
        if fits(hi)? {
            return Ok(Some(hi));
        }
        // Invariant: lo fits, hi does not.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(Some(lo))
    }

    /// `(name, bytes, what it is)` per device category, in the order they are printed.
    pub fn rows(&self) -> Vec<(&'static str, u128, String)> {
        let s = &self.settings;
        let cpu = s.target == Target::Cpu;
        let act = dtype_name(s.compute_dtype);
        vec![
            (
                "NF4 weights",
                self.nf4_weights,
                format!("4-bit codes, blocks of {}", s.blocksize),
            ),
            (
                "quantization state",
                self.quant_state,
                match s.double_quant {
                    true => "double quant: u8 scales + f32 per 256 blocks + maps".to_string(),
                    false => "f32 absmax per block + code book".to_string(),
                },
            ),
            (
                "dense weights",
                self.dense_weights,
                format!(
                    "embeddings, lm_head, norms{} in {}",
                    if s.quantized { "" } else { ", linears" },
                    dtype_name(s.compute_dtype)
                ),
            ),
            (
                "LoRA adapters",
                self.adapters,
                format!(
                    "{} params, r {}, {}",
                    self.lora_params,
                    s.r,
                    dtype_name(s.adapter_dtype)
                ),
            ),
            (
                "gradients",
                self.gradients,
                "f32 dA, dB".to_string()
                    + if self.gradients > self.lora_params * 4 {
                        " + accumulator"
                    } else {
                        ""
                    },
            ),
            (
                "optimizer states (device)",
                self.optimizer_device,
                match s.paged_states {
                    true => format!(
                        "AdamW m, v f32 of tensors < {PAGED_MIN_ELEMS} elems; {} paged to host",
                        format_bytes(self.paged_host_bytes)
                    ),
                    false => "AdamW m, v f32, all on device".to_string(),
                },
            ),
            (
                "checkpointed activations",
                self.activations,
                format!("each layer's input, {act}"),
            ),
            (
                "recompute working set",
                self.recompute,
                match s.target {
                    Target::Cpu => "one layer: 7 linears dequantized to f32, intermediates, grads",
                    Target::Cuda => "one layer: intermediates, grads, NF4 GEMM outputs",
                    Target::Emulated => "one layer: intermediates, grads, products' scratch",
                }
                .to_string(),
            ),
            (
                "logits / loss",
                self.logits_loss,
                match (cpu, self.peak_phase) {
                    (true, _) => "whole [B*T, vocab] f32 logits and dL/dlogits".to_string(),
                    (false, Phase::Loss) => format!("chunks of {} rows", self.logits_chunk_rows),
                    (false, _) => format!(
                        "final norm's gradient and rstd; chunks of {} rows, freed",
                        self.logits_chunk_rows
                    ),
                },
            ),
            (
                "workspace",
                self.workspace,
                match s.target {
                    Target::Cpu => "attention mask [B, T, T] f32, RoPE tables",
                    Target::Cuda => "cuBLAS workspace, NF4 dequantize buffer, RoPE tables",
                    Target::Emulated => "RoPE tables and positions",
                }
                .to_string(),
            ),
            (
                "reserve",
                self.reserve,
                "assumed (CUDA context, fragmentation)".to_string(),
            ),
        ]
    }
}

/// The short name of a dtype (`f32`, `bf16`).
pub fn dtype_name(dtype: TorchDtype) -> &'static str {
    match dtype {
        TorchDtype::F32 => "f32",
        TorchDtype::F16 => "f16",
        TorchDtype::BF16 => "bf16",
    }
}

/// `bytes` in GiB (2^30) or MiB (2^20), as GPU memory is quoted.
pub fn format_bytes(bytes: u128) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// The step's categories at its peak phase.
struct StepPeak {
    activations: u128,
    recompute: u128,
    logits_loss: u128,
    workspace: u128,
    phase: Phase,
}

/// Picks the phase with the largest sum.
fn peak_of(candidates: [StepPeak; 3]) -> StepPeak {
    let total = |p: &StepPeak| p.activations + p.recompute + p.logits_loss + p.workspace;
    let mut best: Option<StepPeak> = None;
    for c in candidates {
        if best.as_ref().is_none_or(|b| total(&c) > total(b)) {
            best = Some(c);
        }
    }
    best.expect("three candidates")
}

/// Today's CPU step (`model::backward::lora_gradients`), f32 everywhere but the checkpointed
/// layer inputs, which keep the compute dtype. The counts follow the
/// code's lifetimes: a named local (shadowed ones too) lives to the end of its function, an
/// operand passed by value (`a + b`, `t * 2.0`) is freed when the op returns, and a borrowed
/// temporary lives to the end of its statement. `weights_f32` is the seven dequantized linears of
/// one layer (`LayerPass::new`); `lm_head_copy` is set when the dense weights are not f32 (the
/// backward widens lm_head).
fn cpu_step(
    d: &LayerDims,
    layers: u128,
    weights_f32: u128,
    s: &PlanSettings,
    lm_head_copy: bool,
) -> StepPeak {
    let f = 4;
    let (n, h, q, kv, kr, m) = (d.n, d.h, d.q, d.kv, d.kv_rep, d.m);
    let (sc, st) = (d.scores, d.stats);
    let adapted = |module| s.targets.contains(&module);
    // A linear backward at its worst: dy·W, and with an adapter (x·Aᵀ, du kept) du·A and the sum.
    let pullback = |module, width: u128| match adapted(module) {
        true => 3 * n * width + 2 * n * d.r,
        false => n * width,
    };
    // The mask [B, 1, T, T] and cos/sin [1, 1, T, head_dim].
    let workspace = (d.b * d.t * d.t + 2 * d.t * d.head_dim) * f;
    // Each layer's input is kept in the compute dtype; the one being pulled back is widened to f32.
    let e = dtype_bytes(s.compute_dtype);
    let saved = layers * n * h * e;
    let widened = if e == f { 0 } else { n * h * f };

    // LayerPass::attention before it returns: normed_attn; the q, k, v projections; q after RoPE
    // and k, v after repeat_kv; two score steps, exp, probs and the row max; the output.
    let attention_peak = n * h + 3 * n * q + 2 * n * kv + 2 * n * kr + 4 * sc + st;
    // LayerPass::forward at its return: normed_attn, residual, normed_mlp, output; the q, k, v
    // projections, q after RoPE and attn_out; k, v after repeat_kv; probs (the scores went with
    // the attention's scope); gate, up, act. The down projection's output joins them for the
    // last residual add; with an adapter, x·Aᵀ and the scaled delta are alive while it is summed.
    let forward_end = 4 * n * h + 3 * n * q + 2 * n * kv + 2 * n * kr + sc + 3 * n * m;
    let forward_peak = attention_peak.max(
        forward_end
            + match adapted(TargetModule::DownProj) {
                true => 2 * n * h + n * d.r,
                false => n * h,
            },
    );
    // What the backward keeps of the recomputed forward (LayerActivations).
    let kept = 4 * n * h + 2 * n * q + 2 * n * kr + sc + 3 * n * m;
    // The backward's candidate peaks beyond `kept`, in the order the code reaches them
    // (LayerPass::backward; each op's pullback frees its locals when it returns):
    // swiglu_backward's dgate = (dact·up)·dsilu with dact, sig, silu alive; then dact, dgate and
    // dup stay to the end of the layer.
    let mlp = 6 * n * m;
    let gate_up = 3 * n * m + n * h + pullback(TargetModule::UpProj, h);
    let post_norm = 3 * n * m + 5 * n * h;
    // In attention_backward beside dnormed, dresidual and dattn_out: dscores =
    // probs·(dprobs − row_dot)·scale with dout and dv alive; the RoPE backward of dq with dq and
    // dk before it; the merged (dq, dk, dv) it returns, its locals still alive.
    let dscores = 3 * n * m + 2 * n * h + 3 * n * q + 4 * sc + st;
    let rope_dq = 3 * n * m + 2 * n * h + 9 * n * q + 2 * sc + st;
    let attention_return = 3 * n * m + 2 * n * h + 7 * n * q + 4 * n * kv + 2 * sc + st;
    // The q, k, v pullbacks beside dattn_out and the merged dq, dk, dv.
    let q_pullback =
        3 * n * m + 2 * n * h + 2 * n * q + 2 * n * kv + pullback(TargetModule::QProj, h);
    let k_pullback =
        3 * n * m + 3 * n * h + 2 * n * q + 2 * n * kv + pullback(TargetModule::KProj, h);
    // The input RMSNorm backward: three [N, h] locals and four inside it.
    let input_norm = 3 * n * m + 7 * n * h + 2 * n * q;
    let backward_peak = [
        mlp,
        gate_up,
        post_norm,
        dscores,
        rope_dq,
        attention_return,
        q_pullback,
        k_pullback,
        input_norm,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
        + kept;
    let layer_peak = backward_peak.max(forward_peak);

    // Loss: logits [N, V]; LlamaModel::loss selects the labelled rows (at most N − B) and keeps
    // them, shifted and exp'd; dL/dlogits holds a [N, V] result and a row-wise copy of the logits.
    let rows = n - d.b;
    let loss_peak = (n * d.vocab + 3 * rows * d.vocab).max(3 * n * d.vocab);
    // Through the backward: logits, dL/dlogits, dnormed, and lm_head in f32 when the model is not.
    let lm_head = if lm_head_copy { d.vocab * d.h } else { 0 };
    let logits_kept = 2 * n * d.vocab + n * h + lm_head;
    // The last layer's output stays alive beside the saved inputs until the backward returns,
    // and the gradient flowing down ([N, h]) beside the layer being pulled back.
    let activations = saved + n * h * f;

    peak_of([
        StepPeak {
            activations: saved,
            recompute: weights_f32 + forward_peak * f,
            logits_loss: 0,
            workspace,
            phase: Phase::Forward,
        },
        StepPeak {
            activations,
            recompute: 0,
            logits_loss: loss_peak * f,
            workspace,
            phase: Phase::Loss,
        },
        StepPeak {
            activations,
            recompute: weights_f32 + (layer_peak + n * h) * f + widened,
            logits_loss: logits_kept * f,
            workspace,
            phase: Phase::Backward,
        },
    ])
}

/// Where the kernel path runs: what a product with a frozen weight allocates beside its output,
/// and whether a layer's NF4 linears are dequantized while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelDevice {
    /// CUDA: cuBLAS products (their workspace counted once) and, for NF4 weights in bf16
    /// compute, the NF4 GEMV / dequant-GEMM writing the compute dtype.
    Cuda,
    /// The CPU emulator: the same NF4 route (GEMV / dequant-GEMM kernels emulated; where CUDA
    /// takes dequantize + cuBLAS, a dequantized copy for the one product), and `model::matmul`
    /// for the other products (AVX-512 BF16 on operands in place where this CPU has it, else f32
    /// tiles widened from the operands).
    Emulated,
}

/// Live bytes of a step, allocated and freed in the order the code does it, and their peak.
#[derive(Clone, Copy, Debug, Default)]
struct Live {
    now: u128,
    peak: u128,
}

impl Live {
    fn alloc(&mut self, bytes: u128) {
        self.now += bytes;
        self.peak = self.peak.max(self.now);
    }

    fn free(&mut self, bytes: u128) {
        self.now = self.now.saturating_sub(bytes);
    }

    /// Bytes made and dropped inside one call: they count toward the peak only.
    fn transient(&mut self, bytes: u128) {
        self.alloc(bytes);
        self.free(bytes);
    }
}

/// The kernel path's step (`model::backward` with every layer through the kernels:
/// docs/ARCHITECTURE.md, "Activation storage"), replayed allocation by allocation: activations
/// and their gradients in the compute dtype `e`, f32 for the kernels' statistics, LoRA's
/// T = x·Aᵀ and the LoRA gradient buffers. A named local lives to the end of its function, an
/// operand passed by value is freed when the op returns; kernel inputs are the tensors
/// themselves, in-place kernels work on a copy. LoRA runs through its kernels (no dropout).
struct KernelStep<'a> {
    d: &'a LayerDims,
    s: &'a PlanSettings,
    dev: KernelDevice,
    /// Bytes per activation element (the compute dtype).
    e: u128,
    live: Live,
}

impl KernelStep<'_> {
    fn adapted(&self, module: TargetModule) -> bool {
        self.s.targets.contains(&module)
    }

    /// Whether the layers' linears go through the NF4 GEMV / dequant-GEMM route
    /// (`LlamaModel::uses_nf4_gemm`: NF4 weights in bf16 compute, on either device).
    fn nf4_route(&self) -> bool {
        self.s.quantized && self.e == 2
    }

    /// `x [rows, k]` times a frozen weight with `n` outputs (`side`; `linear`: a layer's linear,
    /// else lm_head): the product stays (rows · n in the compute dtype); what the device makes
    /// beside it is dropped.
    fn product(&mut self, rows: u128, k: u128, n: u128, side: Weight, linear: bool) -> u128 {
        let (e, out) = (self.e, rows * n * self.e);
        if linear && self.nf4_route() {
            let op = match side {
                Weight::Transposed => GemmOp::Forward,
                Weight::Plain => GemmOp::InputGrad,
            };
            let path = Nf4MatmulPlan::default_path(op, rows as usize);
            match (self.dev, path) {
                // The emulator dequantizes the weight for this product alone, then multiplies.
                (KernelDevice::Emulated, Nf4MatmulPath::DequantCublas) => {
                    self.live.alloc(n * k * 2);
                    self.product(rows, k, n, side, false);
                    self.live.free(n * k * 2);
                }
                // The kernels write the output (CUDA's dequantize buffer is in the workspace).
                _ => self.live.alloc(out),
            }
            return out;
        }
        match self.dev {
            KernelDevice::Emulated if e == 4 => self.live.alloc(out),
            // `x · Wᵀ` on the AVX-512 BF16 units reads both operands in place.
            KernelDevice::Emulated
                if side == Weight::Transposed && crate::model::matmul::avx512::available() =>
            {
                self.live.alloc(out)
            }
            KernelDevice::Emulated => {
                let block = (crate::model::matmul::TILE_ELEMENTS as u128 / k.max(1)).max(1);
                let (bm, bn) = (block.min(rows), block.min(n));
                let tiles = (bm * k + bn * k + bm * bn) * 4;
                if bm == rows && bn == n {
                    // The widened operands and the f32 product, then its bf16 copy.
                    self.live.alloc(tiles);
                    self.live.alloc(out);
                    self.live.free(tiles);
                } else {
                    // Blocks rounded as they come, then joined into one tensor.
                    self.live.alloc(out);
                    self.live.transient(tiles);
                    self.live.transient(out);
                }
            }
            // cuBLAS, or the NF4 GEMV / dequant-GEMM writing the compute dtype.
            KernelDevice::Cuda => self.live.alloc(out),
        }
        out
    }

    /// `LayerPass::new`: the seven frozen linears as the layer multiplies by them, kept for the
    /// layer's pass.
    fn layer_weights(&mut self, shapes: &[[usize; 2]]) -> u128 {
        if !self.s.quantized || self.nf4_route() {
            return 0;
        }
        let mut kept = 0;
        for [o, i] in shapes {
            let numel = *o as u128 * *i as u128;
            match self.dev {
                // Dequantized in the original dtype (bf16), widened to f32.
                KernelDevice::Cuda => {
                    self.live.alloc(numel * 2);
                    self.live.alloc(numel * 4);
                    self.live.free(numel * 2);
                    kept += numel * 4;
                }
                KernelDevice::Emulated => {
                    self.live.alloc(numel * 4);
                    kept += numel * 4;
                }
            }
        }
        kept
    }

    /// `LayerPass::linear` through the fused LoRA forward: the product, a copy the kernel adds
    /// the delta into (the product then dropped) and T `[n, r]` f32, kept. Returns the output.
    fn linear(&mut self, module: TargetModule, k: u128, out: u128) -> u128 {
        let y = self.product(self.d.n, k, out, Weight::Transposed, true);
        if self.adapted(module) {
            self.live.alloc(y);
            self.live.alloc(self.d.n * self.d.r * 4);
            self.live.free(y);
        }
        y
    }

    /// `LayerPass::linear_backward`: dy·W `[n, in]`, and through the fused LoRA backward a copy
    /// it adds into, the gradient buffers (dA and dB kept: the step's gradients) and the base
    /// pullback dropped. Returns dx.
    fn linear_backward(&mut self, module: TargetModule, input: u128, out: u128) -> u128 {
        let dx = self.product(self.d.n, out, input, Weight::Plain, true);
        if self.adapted(module) {
            let dims = crate::kernels::lora::LoraDims {
                tokens: self.d.n as usize,
                in_features: input as usize,
                out_features: out as usize,
                rank: self.d.r as usize,
            };
            let (grads, scratch) = crate::kernels::lora::lora_backward_floats(&dims);
            self.live.alloc(dx);
            self.live.alloc(grads as u128 * 4);
            self.live.transient(scratch as u128 * 4);
            self.live.free(dx);
        }
        dx
    }

    /// RMSNorm's output and rstd, kept.
    fn norm(&mut self) -> u128 {
        let bytes = self.d.n * self.d.h * self.e + self.d.n * 4;
        self.live.alloc(bytes);
        bytes
    }

    /// The RMSNorm backward: dx kept; dw and its row partials dropped at return.
    fn norm_backward(&mut self) -> u128 {
        let (n, h) = (self.d.n, self.d.h);
        let shape = crate::kernels::llama::RmsNormShape {
            rows: n as usize,
            h: h as usize,
        };
        let dx = n * h * self.e;
        self.live.alloc(dx);
        self.live
            .transient((1 + shape.dw_partial_rows() as u128) * h * 4);
        dx
    }

    /// `LayerPass::forward`; returns the bytes of the `LayerActivations` it keeps (the rest of
    /// its locals are freed as it returns).
    fn layer_forward(&mut self) -> u128 {
        let (n, h, q, kv, m) = (self.d.n, self.d.h, self.d.q, self.d.kv, self.d.m);
        let e = self.e;
        let before = self.live.now;
        self.norm();
        let proj_q = self.linear(TargetModule::QProj, h, q);
        let proj_k = self.linear(TargetModule::KProj, h, kv);
        let proj_v = self.linear(TargetModule::VProj, h, kv);
        // Attention: RoPE's rotated copies of q and k, the three heads-first copies, o and the
        // logsumexp, o merged back; the rotated copies go as it returns.
        let rotated = n * q * e + n * kv * e;
        self.live.alloc(rotated);
        self.live.alloc(n * q * e + 2 * n * kv * e);
        self.live.alloc(n * q * e + self.d.stats * 4);
        self.live.alloc(n * q * e);
        self.live.free(rotated);
        let attn = self.linear(TargetModule::OProj, q, h);
        self.live.alloc(n * h * e);
        self.norm();
        self.linear(TargetModule::GateProj, h, m);
        self.linear(TargetModule::UpProj, h, m);
        self.live.alloc(n * m * e);
        let mlp = self.linear(TargetModule::DownProj, m, h);
        self.live.alloc(n * h * e);
        self.live.free(proj_q + proj_k + proj_v + attn + mlp);
        self.live.now - before
    }

    /// `LayerPass::backward`: the recomputed forward and the pullback; everything it made is
    /// freed at return but dx `[n, h]`.
    fn layer_backward(&mut self) {
        let (n, h, q, kv, m) = (self.d.n, self.d.h, self.d.q, self.d.kv, self.d.m);
        let e = self.e;
        let before = self.live.now;
        self.layer_forward();
        // MLP: dact, then dgate and dup (named, to the end), the gate and up pullbacks summed.
        self.linear_backward(TargetModule::DownProj, m, h);
        self.live.alloc(2 * n * m * e);
        let gate = self.linear_backward(TargetModule::GateProj, h, m);
        let up = self.linear_backward(TargetModule::UpProj, h, m);
        self.live.alloc(n * h * e);
        self.live.free(gate + up);
        // dresidual = dy + the post-attention norm's pullback.
        let normed = self.norm_backward();
        self.live.alloc(n * h * e);
        self.live.free(normed);
        // Attention: dattn_out, then dout heads-first, the kernel's dq, dk, dv and delta, dq and
        // dk merged and rotated back (the merged copies go with their statement), dv merged; the
        // kernel's outputs and dout go as it returns.
        self.linear_backward(TargetModule::OProj, q, h);
        let dout = n * q * e;
        let grads = n * q * e + 2 * n * kv * e;
        self.live.alloc(dout + grads);
        self.live.transient(self.d.stats * 4);
        let merged = n * q * e + n * kv * e;
        self.live.alloc(merged);
        self.live.alloc(merged);
        self.live.free(merged);
        self.live.alloc(n * kv * e);
        self.live.free(dout + grads);
        // The q, k and v pullbacks summed into dnormed; dk and dv go as the loop takes them.
        self.linear_backward(TargetModule::QProj, h, q);
        for module in [TargetModule::KProj, TargetModule::VProj] {
            let dm = self.linear_backward(module, h, kv);
            self.live.alloc(n * h * e);
            self.live.free(n * h * e + dm + n * kv * e);
        }
        // dx = dresidual + the input norm's pullback (both operands by value).
        let normed = self.norm_backward();
        self.live.alloc(n * h * e);
        self.live.free(normed + n * h * e);
        self.live.free(self.live.now - before - n * h * e);
    }
}

/// The kernel path's step on `dev`, by phase: the checkpointed forward's last layer, the chunked
/// loss, and the first layer the backward pulls back (the one with the most inputs saved).
fn kernel_step(
    d: &LayerDims,
    layers: u128,
    shapes: &[[usize; 2]],
    s: &PlanSettings,
    dev: KernelDevice,
) -> StepPeak {
    let e = dtype_bytes(s.compute_dtype);
    let (n, h) = (d.n, d.h);
    // The RoPE half tables `[T, d / 2]` f32 twice and a position per token (uploaded once more
    // on CUDA), and on CUDA the cuBLAS workspace.
    let tables = 2 * d.t * (d.head_dim / 2) * 4 + n * 4;
    // On CUDA the NF4 products that take dequantize + cuBLAS (`Nf4MatmulPlan::default_path`)
    // share one bf16 buffer the size of the largest linear, kept once made.
    let dequantizes = [GemmOp::Forward, GemmOp::InputGrad]
        .into_iter()
        .any(|op| Nf4MatmulPlan::default_path(op, n as usize) == Nf4MatmulPath::DequantCublas);
    let dequant_buffer = match s.quantized && e == 2 && dev == KernelDevice::Cuda && dequantizes {
        true => shapes
            .iter()
            .map(|[o, i]| *o as u128 * *i as u128 * 2)
            .max()
            .unwrap_or(0),
        false => 0,
    };
    let workspace = match dev {
        KernelDevice::Emulated => tables,
        KernelDevice::Cuda => 2 * tables + CUBLAS_WORKSPACE_BYTES + dequant_buffer,
    };
    let mut step = KernelStep {
        d,
        s,
        dev,
        e,
        live: Live::default(),
    };
    // Every layer input (the one being run included) is one tensor: the saved input shares
    // the storage of the layer's input in the compute dtype.
    let saved = layers * n * h * e;

    // Forward: the last layer's pass.
    step.live = Live::default();
    step.layer_weights(shapes);
    step.layer_forward();
    let forward = step.live.peak;

    // Loss: the final norm (kept to the end of the step with its rstd), the shifted targets,
    // and per chunk of rows the logits, the labels uploaded, the copy the cross-entropy kernels
    // turn into dlogits with its losses and logsumexp, and dlogits · lm_head, the chunk's piece
    // of dnormed; the losses and pieces joined at the end.
    let chunk = (crate::model::loss_chunk_rows(d.vocab as usize) as u128).clamp(1, n.max(1));
    step.live = Live::default();
    step.norm();
    step.live.alloc(n * 4);
    let mut start = 0;
    while start < n {
        let rows = chunk.min(n - start);
        let logits = step.product(rows, h, d.vocab, Weight::Transposed, false);
        step.live.alloc(rows * 4 + logits + 2 * rows * 4);
        step.live.free(2 * rows * 4);
        step.product(rows, d.vocab, h, Weight::Plain, false);
        step.live.free(2 * logits);
        start += rows;
    }
    step.live.transient(2 * n * 4);
    if n > chunk {
        step.live.alloc(n * h * e);
    }
    let loss = step.live.peak;
    // What the loss leaves for the backward: the final norm's rstd and dnormed.
    let loss_kept = n * h * e + n * 4;

    // Backward: the final norm's pullback, then each layer recomputed and pulled back, from
    // the last (every input saved, no gradient made yet) to the first (one input left, every
    // later layer's LoRA gradients made); the peak is at one of the two ends.
    let layer_grads: u128 = s
        .targets
        .iter()
        .map(|m| {
            let [o, i] = shapes[*m as usize];
            d.r * (o as u128 + i as u128) * 4
        })
        .sum();
    let mut backward = None;
    for pulled in [layers, 1] {
        step.live = Live::default();
        step.live.alloc((layers - pulled) * layer_grads);
        step.norm_backward();
        step.layer_weights(shapes);
        step.layer_backward();
        let inputs = pulled * n * h * e;
        let total = inputs + step.live.peak;
        if backward.is_none_or(|(t, _)| total > t) {
            backward = Some((total, inputs));
        }
    }
    let (backward, inputs) = backward.unwrap_or((0, saved));
    let gradients = layers * layer_grads;
    let hidden = n * h * e;

    peak_of([
        StepPeak {
            activations: saved,
            recompute: forward.saturating_sub(gradients),
            logits_loss: 0,
            workspace,
            phase: Phase::Forward,
        },
        StepPeak {
            activations: saved + hidden,
            recompute: 0,
            logits_loss: loss.saturating_sub(gradients),
            workspace,
            phase: Phase::Loss,
        },
        StepPeak {
            activations: inputs + hidden,
            recompute: (backward - inputs).saturating_sub(gradients),
            logits_loss: loss_kept,
            workspace,
            phase: Phase::Backward,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::plan::Preset;

    fn llama2_13b_cuda() -> MemoryPlan {
        MemoryPlan::new(&Preset::Llama2_13b.config(), &PlanSettings::cuda(2048)).unwrap()
    }

    #[test]
    fn llama2_13b_nf4_weights_are_half_a_byte_per_param_plus_double_quant_scales() {
        let plan = llama2_13b_cuda();
        // 40 layers × (4 · 5120² + 3 · 5120 · 13824) = 12,687,769,600 linear params.
        assert_eq!(plan.nf4_weights, 12_687_769_600 / 2);
        // Per layer: 4,956,160 u8 scales, 19,360 nested f32, 7 × (1 KiB map + offset + code).
        assert_eq!(
            plan.quant_state,
            40 * (4_956_160 + 19_360 * 4 + 7 * (1028 + 64))
        );
        // docs/ARCHITECTURE.md ("Memory plan"): ≈ 6.7 GB counts all 13.0 B params at 0.5 B +
        // 0.127 bit; the linears alone (12.69 B) come to 6.55 GB.
        let nf4 = (plan.nf4_weights + plan.quant_state) as f64 / 1e9;
        assert!((6.5..6.6).contains(&nf4), "{nf4}");
        // Embeddings and lm_head in bf16, 81 RMSNorm weights.
        assert_eq!(plan.dense_weights, 2 * 32_000 * 5120 * 2 + 81 * 5120 * 2);
    }

    #[test]
    fn llama2_70b_nf4_weights_are_34_gb_with_grouped_kv() {
        let plan = MemoryPlan::new(&Preset::Llama2_70b.config(), &PlanSettings::cuda(512)).unwrap();
        // 80 layers × (2 · 8192² + 2 · 1024 · 8192 + 3 · 8192 · 28672) linear params.
        assert_eq!(plan.nf4_weights, 68_451_041_280 / 2);
    }

    #[test]
    fn lora_r16_on_all_seven_linears_of_13b_has_62_6_million_params() {
        let plan = llama2_13b_cuda();
        assert_eq!(
            plan.lora_params,
            40 * 16 * (4 * 2 * 5120 + 3 * (5120 + 13824))
        );
        assert_eq!(plan.lora_params, 62_586_880);
        assert_eq!(plan.adapters, plan.lora_params * 4);
        assert_eq!(plan.gradients, plan.lora_params * 4);
    }

    #[test]
    fn paged_states_keep_tensors_under_1e5_elements_on_the_device() {
        let plan = llama2_13b_cuda();
        // 16 × 5120 = 81,920 < 1e5 stays (q, k, v, o A and B; gate and up A; down B);
        // 16 × 13824 = 221,184 is paged (gate and up B; down A). m and v, f32.
        assert_eq!(plan.optimizer_device, 40 * 11 * 81_920 * 8);
        assert_eq!(plan.paged_host_bytes, 40 * 3 * 221_184 * 8);
        let unpaged = MemoryPlan::new(
            &Preset::Llama2_13b.config(),
            &PlanSettings {
                paged_states: false,
                ..PlanSettings::cuda(2048)
            },
        )
        .unwrap();
        assert_eq!(unpaged.paged_host_bytes, 0);
        assert_eq!(unpaged.optimizer_device, plan.lora_params * 8);

        // At the threshold: r · hidden = 100,000 is paged, 99,984 is not.
        for (hidden, paged) in [(6250, true), (6249, false)] {
            let config = LlamaConfig {
                hidden_size: hidden,
                num_attention_heads: 1,
                num_key_value_heads: 1,
                head_dim: 2,
                num_hidden_layers: 1,
                ..Preset::Tiny.config()
            };
            let settings = PlanSettings {
                targets: vec![TargetModule::QProj],
                ..PlanSettings::cuda(16)
            };
            let plan = MemoryPlan::new(&config, &settings).unwrap();
            // q_proj is [2, hidden]: A [16, hidden] (the big one), B [2, 16].
            let a_states = 16 * hidden as u128 * 8;
            assert_eq!(plan.paged_host_bytes == a_states, paged, "hidden {hidden}");
            assert_eq!(plan.optimizer_device, 32 * 8 + (!paged as u128) * a_states);
        }
    }

    #[test]
    fn checkpointed_activations_are_one_hidden_state_per_layer() {
        // The kernel path's peak is in the last layer's backward: 40 inputs and the last
        // layer's output, in bf16.
        let plan = llama2_13b_cuda();
        assert_eq!(plan.activations, 41 * 2048 * 5120 * 2);
        let cpu = MemoryPlan::new(&Preset::Llama2_13b.config(), &PlanSettings::cpu(2048)).unwrap();
        // f32, and the last layer's output kept beside the inputs.
        assert_eq!(cpu.activations, 41 * 2048 * 5120 * 4);
    }

    #[test]
    fn cuda_workspace_holds_the_dequantize_buffer_once_products_take_cublas() {
        // 2048 rows take dequantize + cuBLAS, whose buffer fits gate_proj (13824 × 5120 bf16);
        // 256 rows stay on the tensor-core kernel and need none.
        let config = Preset::Llama2_13b.config();
        let at = |t| {
            MemoryPlan::new(&config, &PlanSettings::cuda(t))
                .unwrap()
                .workspace
        };
        let tables = |t: u128| 2 * (2 * t * 64 * 4 + t * 4);
        assert_eq!(
            at(2048),
            CUBLAS_WORKSPACE_BYTES + tables(2048) + 13824 * 5120 * 2
        );
        assert_eq!(at(256), CUBLAS_WORKSPACE_BYTES + tables(256));
    }

    #[test]
    fn llama2_13b_r16_at_2048_tokens_fits_in_14_gb() {
        let plan = llama2_13b_cuda();
        assert!(plan.total_device_bytes() <= 14_000_000_000, "{plan:?}");
        assert_eq!(plan.peak_phase, Phase::Backward);
    }

    #[test]
    fn max_seq_len_is_the_last_length_that_fits() {
        let config = Preset::Llama2_13b.config();
        let settings = PlanSettings::cuda(1);
        let budget = 24u128 << 30;
        let t = MemoryPlan::max_seq_len(&config, &settings, budget)
            .unwrap()
            .unwrap();
        let at = |t| {
            MemoryPlan::new(
                &config,
                &PlanSettings {
                    seq_len: t,
                    ..settings.clone()
                },
            )
            .unwrap()
        };
        assert!(at(t).fits(budget) && !at(t + 1).fits(budget), "{t}");
        let tiny_budget = MemoryPlan::max_seq_len(&config, &PlanSettings::cuda(1), 1 << 30);
        assert_eq!(tiny_budget.unwrap(), None, "the weights alone exceed 1 GiB");
    }

    #[test]
    fn grad_accumulation_adds_an_accumulator_on_every_target() {
        // The trainer (`accumulate_gradients_in`) is one code for every device.
        let config = Preset::Tiny.config();
        for (target, factor) in [(Target::Cpu, 2), (Target::Cuda, 2), (Target::Emulated, 2)] {
            let base = PlanSettings {
                target,
                ..PlanSettings::cpu(32)
            };
            let one = MemoryPlan::new(&config, &base).unwrap();
            let four = MemoryPlan::new(
                &config,
                &PlanSettings {
                    grad_accumulation: 4,
                    ..base
                },
            )
            .unwrap();
            assert_eq!(four.gradients, factor * one.gradients, "{target:?}");
        }
    }

    #[test]
    fn out_of_range_settings_are_errors() {
        let config = Preset::Tiny.config();
        let cases = [
            PlanSettings::cuda(0),
            PlanSettings {
                r: 0,
                ..PlanSettings::cuda(8)
            },
            PlanSettings {
                blocksize: 100,
                ..PlanSettings::cuda(8)
            },
            PlanSettings {
                compute_dtype: TorchDtype::F16,
                ..PlanSettings::cuda(8)
            },
            PlanSettings {
                targets: vec![TargetModule::QProj, TargetModule::QProj],
                ..PlanSettings::cuda(8)
            },
            PlanSettings {
                targets: Vec::new(),
                ..PlanSettings::cuda(8)
            },
            PlanSettings {
                paged_states: true,
                ..PlanSettings::cpu(8)
            },
        ];
        for settings in cases {
            assert!(
                MemoryPlan::new(&config, &settings).is_err(),
                "{settings:?} accepted"
            );
        }
    }
}
