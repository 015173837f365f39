//! The launch configuration each kernel's own launcher picks at Llama-2-13B training shapes
//! (hidden 5120, intermediate 13824, 40 heads of 128, 2048 tokens, vocab 32000, LoRA r 16),
//! printed as `LAUNCH` lines for scripts/kernel-report.sh; the test fails when a `__global__`
//! kernel in kernels/*.cu (test kernels aside) has no row, so new kernels must be added here.

use std::collections::BTreeSet;

use half::bf16;
use qlora::kernels::attention::{self, AttentionShape};
use qlora::kernels::launch::{BlockShape, Kernel, LaunchConfig, DEFAULT_DYNAMIC_SHARED_BYTES};
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
        // The launcher's geometry fits the shape the kernel declares (barriers, launch bounds,
        // shared memory), as every launch on every backend checks.
        k.check_launch(cfg)
            .unwrap_or_else(|e| panic!("{k:?} at {shape}: {e}"));
    }
    let listed: BTreeSet<String> = rows.iter().map(|(k, _, _)| k.name.to_string()).collect();
    let declared = declared_kernels();
    let missing: Vec<_> = declared.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "kernels without a row in tests/kernel_launch_table.rs: {missing:?}"
    );
}

/// The value of `__launch_bounds__` (its first argument, a literal or a `constexpr int` of the same
/// file) on each `extern "C" __global__` kernel of kernels/*.cu.
fn launch_bounds() -> std::collections::BTreeMap<String, u32> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut bounds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let constant = |name: &str| -> Option<u32> {
            let decl = format!("constexpr int {name} = ");
            let at = src.find(&decl)? + decl.len();
            src[at..].split(';').next()?.trim().parse().ok()
        };
        for decl in src.split("extern \"C\" __global__").skip(1) {
            let sig = decl.split('{').next().unwrap();
            let Some(at) = sig.find("__launch_bounds__(") else {
                continue;
            };
            let args = &sig[at + "__launch_bounds__(".len()..];
            let first = args.split([',', ')']).next().unwrap().trim();
            let value = first
                .parse()
                .ok()
                .or_else(|| constant(first))
                .unwrap_or_else(|| {
                    panic!("{}: cannot read __launch_bounds__({first})", path.display())
                });
            let name = args.split(')').nth(1).unwrap().split('(').next().unwrap();
            bounds.insert(name.trim().to_string(), value);
        }
    }
    bounds
}

#[test]
fn declared_block_shapes_match_the_kernels_launch_bounds() {
    let bounds = launch_bounds();
    for (k, _, _) in table() {
        let declared = match k.block {
            BlockShape::Exact(x, y, z) => x * y * z,
            BlockShape::Linear { max_threads }
            | BlockShape::Warps { max_threads }
            | BlockShape::Rows { max_threads } => max_threads,
            BlockShape::Any => panic!("{k:?}: a production kernel must declare its block shape"),
        };
        let bound = bounds
            .get(k.name)
            .unwrap_or_else(|| panic!("{k:?} has no __launch_bounds__ in kernels/{}.cu", k.module));
        assert_eq!(declared, *bound, "{k:?}: declared {:?}", k.block);
    }
}

fn block(x: u32, y: u32, z: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (x, y, z),
        shared_mem_bytes: 0,
    }
}

fn refusal(k: Kernel, cfg: LaunchConfig) -> String {
    match k.check_launch(&cfg) {
        Err(qlora::Error::InvalidArgument { op, reason }) => {
            assert_eq!(op, k.name);
            reason
        }
        other => panic!("{k:?} {cfg:?}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn rmsnorm_refuses_blocks_its_early_return_would_deadlock() {
    for k in [llama::RMSNORM_FORWARD, llama::RMSNORM_BACKWARD] {
        // A warp per row (any rows per block) or a block per row is what row_sum supports.
        for ok in [
            block(32, 1, 1),
            block(32, 4, 1),
            block(32, 32, 1),
            block(512, 1, 1),
        ] {
            k.check_launch(&ok).unwrap();
        }
        // Several block-wide rows: threads past the last row would leave before the barrier.
        let reason = refusal(k, block(256, 2, 1));
        assert!(reason.contains("early return"), "{reason}");
        refusal(k, block(48, 1, 1));
        refusal(k, block(32, 1, 2));
        let reason = refusal(k, block(32, 33, 1));
        assert!(reason.contains("__launch_bounds__ of 1024"), "{reason}");
    }
}

#[test]
fn other_block_shapes_are_enforced() {
    // Exact: the NF4 GEMM's loops stride by 256 threads.
    nf4_gemm::GEMM.check_launch(&block(256, 1, 1)).unwrap();
    assert!(refusal(nf4_gemm::GEMM, block(128, 1, 1)).contains("exactly (256, 1, 1)"));
    // Warps: the cross-entropy block reduction holds 16 warp partials.
    let xent = cross_entropy::CROSS_ENTROPY_FORWARD;
    xent.check_launch(&block(512, 1, 1)).unwrap();
    refusal(xent, block(544, 1, 1));
    refusal(xent, block(100, 1, 1));
    refusal(xent, block(32, 2, 1));
    // Linear: elementwise kernels, 1-D within __launch_bounds__(256).
    llama::ROPE.check_launch(&block(100, 1, 1)).unwrap();
    refusal(llama::ROPE, block(512, 1, 1));
    refusal(llama::ROPE, block(16, 16, 1));
}

#[test]
fn geometry_functions_stay_within_their_kernels_limits_at_every_width() {
    for h in 1..=llama::MAX_HIDDEN {
        for rows in [1, 3, 4, 5, 1000] {
            let shape = llama::RmsNormShape::from_len("sweep", rows * h, h).unwrap();
            llama::rmsnorm_forward_launch(&shape).unwrap();
            let back = llama::rmsnorm_backward_launch(&shape).unwrap();
            assert!(
                back.shared_mem_bytes <= DEFAULT_DYNAMIC_SHARED_BYTES,
                "h {h}"
            );
        }
    }
    for vocab in (1..=70_000).step_by(97).chain([32_000, 128_256, 151_936]) {
        let shape = cross_entropy::CrossEntropyShape::new("sweep", 3 * vocab, 3, vocab).unwrap();
        let cfg = cross_entropy::cross_entropy_launch(&shape);
        cross_entropy::CROSS_ENTROPY_FORWARD
            .check_launch(&cfg)
            .unwrap();
        cross_entropy::CROSS_ENTROPY_BACKWARD
            .check_launch(&cfg)
            .unwrap();
    }
}

#[test]
fn the_rmsnorm_backward_shared_memory_needs_no_opt_in() {
    assert_eq!(llama::RMSNORM_BACKWARD.dynamic_shared_opt_in, None);
    let mut cfg = block(512, 1, 1);
    cfg.shared_mem_bytes = DEFAULT_DYNAMIC_SHARED_BYTES + 4;
    let reason = refusal(llama::RMSNORM_BACKWARD, cfg);
    assert!(reason.contains("without opting in"), "{reason}");
}
