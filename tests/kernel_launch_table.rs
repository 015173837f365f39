//! The launch configuration each kernel's own launcher picks at Llama-2-13B training shapes
//! (hidden 5120, intermediate 13824, 40 heads of 128, 2048 tokens, vocab 32000, LoRA r 16),
//! printed as `LAUNCH` lines for scripts/kernel-report.sh; the test fails when a `__global__`
//! kernel in kernels/*.cu (test kernels aside) has no row, so new kernels must be added here.

use std::collections::BTreeSet;

use half::bf16;
use qlora::kernels::attention::{self, AttentionShape};
use qlora::kernels::launch::{Kernel, LaunchConfig};
use qlora::kernels::nf4_gemm::{self, GemmOp, GemmShape};
use qlora::kernels::{adamw, cross_entropy, llama, lora, nf4, nf4_gemv};

const HIDDEN: usize = 5120;
const INTERMEDIATE: usize = 13824;
const HEADS: usize = 40;
const HEAD_DIM: usize = 128;
const TOKENS: usize = 2048;
const VOCAB: usize = 32000;
const RANK: usize = 16;
const NF4_BLOCK: usize = 64;

/// Kernels only the emulator's self-tests launch (ad hoc configs in tests/emulator.rs).
const TEST_ONLY_MODULES: &[&str] = &["emu_selftest"];

/// `(kernel, shape description, config)` for every production kernel.
fn table() -> Vec<(Kernel, String, LaunchConfig)> {
    let weight = nf4::Nf4Layout::new("table", INTERMEDIATE * HIDDEN, NF4_BLOCK).unwrap();
    let gemv = nf4_gemv::GemvShape::new("table", 1, INTERMEDIATE, HIDDEN, NF4_BLOCK).unwrap();
    let gemv16 = nf4_gemv::GemvShape::new("table", 16, INTERMEDIATE, HIDDEN, NF4_BLOCK).unwrap();
    let xent =
        cross_entropy::CrossEntropyShape::new("table", TOKENS * VOCAB, TOKENS, VOCAB).unwrap();
    let norm = llama::RmsNormShape::from_len("table", TOKENS * HIDDEN, HIDDEN).unwrap();
    let q_len = TOKENS * HEADS * HEAD_DIM;
    let rope = llama::RopeShape::new(
        "table",
        q_len,
        q_len,
        (TOKENS * HEAD_DIM / 2, TOKENS * HEAD_DIM / 2),
        TOKENS,
        HEADS,
        HEADS,
        HEAD_DIM,
    )
    .unwrap();
    let mlp = lora::LoraDims::new("table", TOKENS, HIDDEN, INTERMEDIATE, RANK).unwrap();
    let up = GemmShape::new(GemmOp::Forward, TOKENS, INTERMEDIATE, HIDDEN, NF4_BLOCK).unwrap();
    let up_dx = GemmShape::new(GemmOp::InputGrad, TOKENS, INTERMEDIATE, HIDDEN, NF4_BLOCK).unwrap();
    let lora_a = RANK * HIDDEN;
    let w = format!("W [{INTERMEDIATE}, {HIDDEN}] blocks of {NF4_BLOCK}");
    let t = format!("[{TOKENS}, {HIDDEN}]");
    let lin = format!("M {TOKENS}, K {HIDDEN}, N {INTERMEDIATE}, r {RANK}");
    // The _wide projections (ranks 17..=64) launch the same geometry.
    let wide = format!("M {TOKENS}, K {HIDDEN}, N {INTERMEDIATE}, r 64");
    // Attention at 13B shapes: 40 query heads (no GQA in Llama-2-13B), head_dim 128.
    let attn = AttentionShape::new(1, HEADS, HEADS, TOKENS, HEAD_DIM).unwrap();
    let attn_desc = format!("B 1, {HEADS} heads of {HEAD_DIM}, T {TOKENS}");
    let mut attention_rows = Vec::new();
    for (kernel, cfg) in [
        attention::forward_launch::<bf16>(&attn),
        attention::forward_launch::<f32>(&attn),
    ]
    .into_iter()
    .chain(attention::backward_launches::<bf16>(&attn))
    .chain(
        attention::backward_launches::<f32>(&attn)
            .into_iter()
            .skip(1),
    ) {
        attention_rows.push((kernel, attn_desc.clone(), cfg));
    }
    let mut rows = vec![
        (
            nf4::QUANTIZE,
            w.clone(),
            nf4::quantize_launch(&weight).unwrap(),
        ),
        (
            nf4::DEQUANTIZE,
            w.clone(),
            nf4::dequantize_launch(&weight).unwrap(),
        ),
        (
            nf4_gemv::GEMV,
            format!("M 1, {w}"),
            nf4_gemv::gemv_launch(&gemv).unwrap(),
        ),
        (
            nf4_gemv::GEMV_ROWS,
            format!("M 16, {w}"),
            nf4_gemv::gemv_launch(&gemv16).unwrap(),
        ),
        (
            adamw::ADAMW_F32,
            format!("n {lora_a} (LoRA A)"),
            adamw::f32_launch(lora_a),
        ),
        (
            adamw::ADAMW_8BIT,
            format!("n {lora_a} (LoRA A)"),
            adamw::launch_8bit(lora_a).unwrap(),
        ),
        (
            cross_entropy::CROSS_ENTROPY_FORWARD,
            format!("[{TOKENS}, {VOCAB}]"),
            cross_entropy::cross_entropy_launch(&xent),
        ),
        (
            cross_entropy::CROSS_ENTROPY_BACKWARD,
            format!("[{TOKENS}, {VOCAB}]"),
            cross_entropy::cross_entropy_launch(&xent),
        ),
        (
            llama::RMSNORM_FORWARD,
            t.clone(),
            llama::rmsnorm_forward_launch(&norm).unwrap(),
        ),
        (
            llama::RMSNORM_BACKWARD,
            t.clone(),
            llama::rmsnorm_backward_launch(&norm).unwrap(),
        ),
        (
            llama::RMSNORM_DW_REDUCE,
            t.clone(),
            llama::rmsnorm_dw_reduce_launch(&norm),
        ),
        (
            llama::ROPE,
            format!("{TOKENS} tokens, {HEADS}+{HEADS} heads of {HEAD_DIM}"),
            llama::rope_launch(&rope),
        ),
        (
            llama::SWIGLU_FORWARD,
            format!("[{TOKENS}, {INTERMEDIATE}]"),
            llama::swiglu_launch(TOKENS * INTERMEDIATE),
        ),
        (
            llama::SWIGLU_BACKWARD,
            format!("[{TOKENS}, {INTERMEDIATE}]"),
            llama::swiglu_launch(TOKENS * INTERMEDIATE),
        ),
        (lora::LORA_XA, lin.clone(), lora::lora_project_launch(&mlp)),
        (
            lora::LORA_XA_WIDE,
            wide.clone(),
            lora::lora_project_launch(&mlp),
        ),
        (
            lora::LORA_ADD,
            lin.clone(),
            lora::lora_expand_launch(&mlp, INTERMEDIATE),
        ),
        (lora::LORA_DYB, lin.clone(), lora::lora_project_launch(&mlp)),
        (lora::LORA_DYB_WIDE, wide, lora::lora_project_launch(&mlp)),
        (
            lora::LORA_DB,
            lin.clone(),
            lora::lora_grad_launch(INTERMEDIATE, TOKENS, RANK),
        ),
        (
            lora::LORA_DA,
            lin.clone(),
            lora::lora_grad_launch(HIDDEN, TOKENS, RANK),
        ),
        (lora::LORA_DX, lin, lora::lora_expand_launch(&mlp, HIDDEN)),
        // The general kernels share the fast ones' geometry; they run misaligned shapes.
        (
            nf4_gemm::GEMM,
            format!("M {TOKENS}, {w}"),
            nf4_gemm::gemm_launch(&up),
        ),
        (
            nf4_gemm::GEMM_GENERAL,
            format!("M {TOKENS}, {w}"),
            nf4_gemm::gemm_launch(&up),
        ),
        (
            nf4_gemm::GEMM_DX,
            format!("dY [{TOKENS}, {INTERMEDIATE}], {w}"),
            nf4_gemm::gemm_launch(&up_dx),
        ),
        (
            nf4_gemm::GEMM_DX_GENERAL,
            format!("dY [{TOKENS}, {INTERMEDIATE}], {w}"),
            nf4_gemm::gemm_launch(&up_dx),
        ),
    ];
    rows.extend(attention_rows);
    rows
}

/// Names of the `extern "C" __global__` functions in kernels/*.cu outside the test-only modules.
fn declared_kernels() -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "cu") || TEST_ONLY_MODULES.contains(&stem.as_str())
        {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for decl in src.split("extern \"C\" __global__").skip(1) {
            // `void __launch_bounds__(N) k_name(const Params p)`: drop the bounds, keep the name.
            let sig = decl.split('{').next().unwrap();
            let sig = match sig.find("__launch_bounds__") {
                Some(at) => {
                    let close = at + sig[at..].find(')').unwrap();
                    format!("{}{}", &sig[..at], &sig[close + 1..])
                }
                None => sig.to_string(),
            };
            let head = sig.split('(').next().unwrap();
            names.insert(head.split_whitespace().last().unwrap().to_string());
        }
    }
    names
}

#[test]
fn every_kernel_has_a_launch_config_at_13b_shapes() {
    let rows = table();
    for (k, shape, cfg) in &rows {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        println!(
            "LAUNCH\t{}\t{}\t{}x{}x{}\t{}x{}x{}\t{}\t{}",
            k.module, k.name, g.0, g.1, g.2, b.0, b.1, b.2, cfg.shared_mem_bytes, shape
        );
        assert!(cfg.threads_per_block() >= 1 && cfg.threads_per_block() <= 1024);
        assert!(g.0 >= 1 && g.1 >= 1 && g.2 >= 1, "{k:?}");
    }
    let listed: BTreeSet<String> = rows.iter().map(|(k, _, _)| k.name.to_string()).collect();
    let declared = declared_kernels();
    let missing: Vec<_> = declared.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "kernels without a row in tests/kernel_launch_table.rs: {missing:?}"
    );
}
