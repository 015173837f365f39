"""Write the reference fixtures under tests/fixtures/ from the real Python stack (CPU only).

Create the pinned environment once, then run this script from the repository root:

    python3 -m venv ~/.cache/qlora/fixtures-venv
    ~/.cache/qlora/fixtures-venv/bin/pip install -r scripts/requirements-fixtures.txt
    ~/.cache/qlora/fixtures-venv/bin/python scripts/make_fixtures.py

Every random input comes from a fixed seed, so a rerun with the same pins rewrites identical bytes.
Each fixture family has its own `make_*_fixtures(outdir)` function called from `main()`; add new
families (Llama, PEFT, ...) the same way.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent

DEQUANT_F32_MAX_ELEMS = 8192


def nf4_special_values() -> torch.Tensor:
    """1000 f32 values whose blocks (of 64) pin the corner cases of bnb's NF4 quantizer."""
    code = F.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2  # bnb's f32 thresholds
    blocks = []

    # Block 0: absmax exactly 1.0, so x * (1 / absmax) == x: every code value and every
    # threshold exactly (a tie goes to the lower code), and the f32 neighbours of each threshold.
    b = torch.cat([code, mids, torch.nextafter(mids, torch.full_like(mids, 2.0))])
    blocks.append(b)
    # Block 1: the thresholds' lower neighbours, a negative zero, absmax 2.0 (a power of two keeps
    # the scaled value exact) with doubled thresholds.
    b = torch.cat(
        [torch.nextafter(mids, torch.full_like(mids, -2.0)), torch.tensor([-0.0, 2.0]), 2 * mids]
    )
    blocks.append(b)
    # Block 2: all zeros (absmax 0 is stored; bnb scales by 1 / 1e-38 instead).
    blocks.append(torch.zeros(64))
    # Block 3: negative only.
    g = torch.Generator().manual_seed(11)
    blocks.append(-torch.rand(64, generator=g) - 0.01)
    # Block 4: one large outlier among small values.
    b = torch.randn(64, generator=g) * 1e-3
    b[17] = 3.0e4
    blocks.append(b)
    # Block 5: denormals only (absmax below bnb's 1e-38 clamp).
    blocks.append(torch.randn(64, generator=g) * 1e-40)
    # Block 6: denormals mixed with normals.
    b = torch.randn(64, generator=g) * 1e-39
    b[::5] = torch.randn(13, generator=g) * 1e-37
    blocks.append(b)
    # Block 7: huge magnitudes (no overflow in x * (1 / absmax)).
    blocks.append(torch.randn(64, generator=g) * 3.0e38 / 4)
    # Block 8: a single nonzero value and zeros.
    b = torch.zeros(64)
    b[40] = -0.125
    blocks.append(b)
    x = torch.cat([blk[:64] if blk.numel() >= 64 else torch.cat([blk, torch.zeros(64 - blk.numel())]) for blk in blocks])
    # Remaining elements up to 1000: random normal, with a partial last block (1000 = 15*64 + 40)
    # that holds exact thresholds again, so the partial-block division path sees ties too.
    rest = torch.randn(1000 - x.numel(), generator=g)
    rest[-40:-25] = mids
    rest[-25] = 1.0
    return torch.cat([x, rest]).to(torch.float32)


def nf4_cases():
    """(name, input tensor, shape, blocksizes, double-quant flags, f32 dequant wanted)."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.float32)

    n65 = randn(65)
    n65[3] = 0.0
    n65[64] = 0.0
    nonfinite = randn(128)
    nonfinite[3] = float("nan")
    nonfinite[70] = float("inf")
    nonfinite[71] = float("-inf")
    return [
        ("n1", randn(1), [1], [64], [False, True]),
        ("n63", randn(63), [63], [64], [False, True]),
        ("n65", n65, [65], [64], [False, True]),
        ("special1000", nf4_special_values(), [1000], [64, 128], [False, True]),
        ("rand16421", randn(16421, scale=0.02), [16421], [64], [False, True]),
        ("mat64x128", randn(64, 128, scale=0.05), [64, 128], [64], [True]),
        ("bs4096_4133", randn(4133), [4133], [4096], [False, True]),
        ("bf16_200x200", randn(200, 200, scale=0.02).to(torch.bfloat16), [200, 200], [64], [True]),
        ("nonfinite128", nonfinite, [128], [64], [False]),
    ]


def one_key_metadata(fields: dict) -> dict:
    """safetensors writes its metadata map in hash order, so several keys make the file bytes
    differ between runs; one key holding sorted JSON keeps reruns byte-identical."""
    return {"fixture": json.dumps(fields, sort_keys=True)}


def quant_state_bytes(state) -> torch.Tensor:
    packed = state.as_dict(packed=True)
    (key,) = [k for k in packed if k.startswith("quant_state.")]
    assert key == "quant_state.bitsandbytes__nf4", key
    return packed[key]


def make_nf4_fixtures(outdir: Path) -> None:
    """tests/fixtures/nf4/cases.safetensors and module.safetensors (see the metadata in each)."""
    outdir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    index = []
    nf4_code = F.get_4bit_type("nf4", device="cpu")
    tensors["nf4_quant_map"] = nf4_code.clone()
    tensors["dynamic_map_signed"] = F.create_dynamic_map(signed=True).clone()

    for name, x, shape, blocksizes, dq_flags in nf4_cases():
        x = x.reshape(shape).contiguous()
        tensors[f"{name}.input"] = x.clone()
        for bs in blocksizes:
            for dq in dq_flags:
                cfg = f"{name}.bs{bs}.{'dq' if dq else 'f32'}"
                packed, state = F.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=dq)
                assert packed.dtype == torch.uint8 and packed.shape[1] == 1
                tensors[f"{cfg}.packed"] = packed.reshape(-1).clone()
                tensors[f"{cfg}.quant_state"] = quant_state_bytes(state).clone()
                if dq:
                    tensors[f"{cfg}.absmax_u8"] = state.absmax.clone()
                    tensors[f"{cfg}.nested_absmax"] = state.state2.absmax.clone()
                    tensors[f"{cfg}.offset"] = state.offset.reshape(1).clone()
                    assert torch.equal(state.state2.code.view(torch.int32), tensors["dynamic_map_signed"].view(torch.int32))
                    # The per-block scales as bnb's dequantize composes them.
                    scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
                    tensors[f"{cfg}.scales"] = scales.clone()
                    # The unquantized absmax, to pin double quant separately from the mean.
                    _, plain = F.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=False)
                    tensors[f"{cfg}.absmax_f32"] = plain.absmax.clone()
                else:
                    tensors[f"{cfg}.absmax"] = state.absmax.clone()
                out = F.dequantize_4bit(packed, state)
                # bnb CPU returns 1-D inputs of even length as [1, n]; only the values matter here.
                assert out.dtype == x.dtype and out.numel() == x.numel(), (cfg, out.shape)
                # Keep the files small: large f32-absmax cases skip the (4 B/elem) dequant output;
                # their double-quant twin records it.
                if dq or x.numel() <= DEQUANT_F32_MAX_ELEMS:
                    tensors[f"{cfg}.dequant"] = out.reshape(-1).clone()
                index.append(
                    {
                        "case": name,
                        "config": cfg,
                        "shape": shape,
                        "dtype": str(x.dtype).removeprefix("torch."),
                        "blocksize": bs,
                        "double_quant": dq,
                    }
                )

    # 8-bit blockwise with the signed dynamic map on its own (the nested quantizer), including
    # an all-zero block, a negative-only block and a partial last block.
    g = torch.Generator().manual_seed(99)
    x8 = torch.randn(3000, generator=g)
    x8[256:512] = 0.0
    x8[512:768] = -x8[512:768].abs()
    q8, st8 = F.quantize_blockwise(x8, code=F.create_dynamic_map(signed=True), blocksize=256)
    tensors["dyn8.input"] = x8.clone()
    tensors["dyn8.q"] = q8.clone()
    tensors["dyn8.absmax"] = st8.absmax.clone()
    tensors["dyn8.dequant"] = F.dequantize_blockwise(q8, st8).clone()

    meta = {
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": index,
    }
    save_file(tensors, str(outdir / "cases.safetensors"), metadata=one_key_metadata(meta))

    make_nf4_module_fixture(outdir)


def make_nf4_module_fixture(outdir: Path) -> None:
    """A Linear4bit saved the way transformers saves a pre-quantized bnb model."""
    prefix = "model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(48, 160, generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(48, generator=g) * 0.01).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(
        160, 48, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    layer = layer.to("cpu")  # Params4bit quantizes on its first move to a device
    state = {f"{prefix}.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    save_file(state, str(outdir / "module.safetensors"), metadata={"format": "pt"})
    qs = layer.weight.quant_state
    # bnb's AVX-512 CPU kernel indexes a 2-D output's scales as row * (cols // blocksize) +
    # col // blocksize, wrong when cols (160) is not a multiple of blocksize. Dequantizing the
    # flat [n] shape takes the same kernel with one row, which is the format's true output.
    bnb_2d = F.dequantize_4bit(layer.weight.data, qs)
    flat_state = F.QuantState(
        absmax=qs.absmax, shape=torch.Size([weight.numel()]), code=qs.code, blocksize=qs.blocksize,
        quant_type=qs.quant_type, dtype=qs.dtype, offset=qs.offset, state2=qs.state2,
    )
    dequant = F.dequantize_4bit(layer.weight.data, flat_state).reshape(weight.shape)
    save_file(
        {"weight": weight, "dequant": dequant.contiguous(), "dequant_bnb_2d": bnb_2d.contiguous()},
        str(outdir / "module_source.safetensors"),
        metadata=one_key_metadata({"prefix": prefix, "cpu_capability": torch.backends.cpu.get_cpu_capability()}),
    )

ADAMW_STEPS = 5
ADAMW_CASES = {
    # torch's defaults with decoupled decay: 1 - beta1 < 0.5 takes lerp's small-weight branch.
    "default": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    # 1 - beta1 >= 0.5 takes lerp's other branch; no weight decay.
    "low_beta1": dict(lr=3e-3, betas=(0.3, 0.99), eps=1e-6, weight_decay=0.0),
}


def adamw_grads(n: int, steps: int, gen: torch.Generator) -> list:
    """Gradients spanning many magnitudes, with exact zeros, so eps and tiny second moments matter."""
    grads = []
    for _ in range(steps):
        g = torch.randn(n, generator=gen) * torch.pow(10.0, torch.randint(-6, 2, (n,), generator=gen).float())
        g[::11] = 0.0
        grads.append(g.float())
    return grads


def make_adamw_fixtures(outdir: Path) -> None:
    """tests/fixtures/adamw/adamw.safetensors: torch.optim.AdamW (CPU, foreach=False, the
    single-tensor path) for ADAMW_STEPS steps on a 37-element f32 tensor (two vector iterations of
    ATen's CPU loop plus a scalar tail), per case `{case}.param0`, `{case}.grad{k}` (k = 1..steps),
    and the final `{case}.param`, `{case}.m`, `{case}.v`; plus bitsandbytes' unsigned dynamic map
    (`udynamic`, the 8-bit second-moment code book). Hyperparameters are in the metadata."""
    outdir.mkdir(parents=True, exist_ok=True)
    n = 37
    tensors = {"udynamic": F.create_dynamic_map(signed=False).contiguous()}
    gen = torch.Generator().manual_seed(1234)
    for case, hp in ADAMW_CASES.items():
        p0 = (torch.randn(n, generator=gen) * 0.5).float()
        grads = adamw_grads(n, ADAMW_STEPS, gen)
        param = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([param], foreach=False, fused=False, **hp)
        for g in grads:
            param.grad = g.clone()
            opt.step()
        state = opt.state[param]
        tensors[f"{case}.param0"] = p0
        for k, g in enumerate(grads, start=1):
            tensors[f"{case}.grad{k}"] = g
        tensors[f"{case}.param"] = param.detach().clone()
        tensors[f"{case}.m"] = state["exp_avg"].clone()
        tensors[f"{case}.v"] = state["exp_avg_sq"].clone()
    meta = {"torch": torch.__version__, "steps": ADAMW_STEPS, "cases": ADAMW_CASES}
    save_file(tensors, str(outdir / "adamw.safetensors"), metadata=one_key_metadata(meta))


LLAMA_SHAPE = dict(
    hidden_size=72, num_attention_heads=6, num_key_value_heads=2, intermediate_size=136,
    vocab_size=200, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)


def tiny_llama(seed: int, dtype: torch.dtype, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        # Random norms, so a loader that mixes up the two norms of a layer is caught.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
    return model


def write_llama_rope(model, outdir: Path) -> None:
    """rope.safetensors: the f32 inverse frequencies of transformers' RoPE init function for the
    config (the model's own buffer went through `.to(dtype)`, so it is bf16-rounded in a bf16 model)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = model.model.rotary_emb
    init = rope.compute_default_rope_parameters if rope.rope_type == "default" else ROPE_INIT_FUNCTIONS[rope.rope_type]
    inv_freq, _ = init(model.config)
    assert inv_freq.dtype == torch.float32
    inv_freq = inv_freq.contiguous()
    save_file({"inv_freq": inv_freq}, str(outdir / "rope.safetensors"), metadata={"format": "pt"})


def write_bnb_llama(model, outdir: Path) -> None:
    """A bnb NF4 pre-quantized checkpoint built by hand: each of the seven linears of every layer
    goes through bnb.nn.Linear4bit (double quant, blocksize 64) and its state dict is saved under
    the module's name, as `save_pretrained` of a model loaded with BitsAndBytesConfig writes it
    (transformers' own 4-bit loading needs accelerate and a bnb device; the tensors are the same)."""
    from transformers import BitsAndBytesConfig

    outdir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, p in model.state_dict().items():
        module = name[: -len(".weight")]
        if any(module.endswith(lin) for lin in LLAMA_LINEARS):
            w = p.detach().clone()
            layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64)
            layer = layer.to("cpu")
            for k, v in layer.state_dict().items():
                state[f"{module}.{k}"] = v.contiguous()
        else:
            state[name] = p.detach().contiguous()
    save_file(state, str(outdir / "model.safetensors"), metadata={"format": "pt"})
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    config = model.config.to_dict()
    config["quantization_config"] = qc.to_dict()
    (outdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_llama_fixtures(outdir: Path) -> None:
    """tests/fixtures/llama/<name>/: tiny random Llama checkpoints saved by transformers, each with
    rope.safetensors (the model's RoPE inverse frequencies).
    - base: bf16, default RoPE, untied lm_head, one model.safetensors
    - llama3_tied_f32: f32, llama3 rope scaling, tie_word_embeddings
    - sharded: base's weights (same seed) with linear rope scaling, saved in shards with
      model.safetensors.index.json
    - bnb_nf4: base's weights with the seven linears of every layer as bnb NF4 (see write_bnb_llama)"""
    base = tiny_llama(11, torch.bfloat16)
    cases = {
        "base": (base, {}),
        "llama3_tied_f32": (tiny_llama(12, torch.float32, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE), {}),
        "sharded": (tiny_llama(11, torch.bfloat16, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
                    {"max_shard_size": "60KB"}),
    }
    for name, (model, kwargs) in cases.items():
        d = outdir / name
        if d.exists():
            for f in d.iterdir():
                f.unlink()
        model.save_pretrained(str(d), **kwargs)
        (d / "generation_config.json").unlink(missing_ok=True)
        write_llama_rope(model, d)
    d = outdir / "bnb_nf4"
    if d.exists():
        for f in d.iterdir():
            f.unlink()
    write_bnb_llama(base, d)
    write_llama_rope(base, d)


def forward_batch():
    """The padded batch every forward fixture runs: B=3, T=9, pad id 0. Row 0 is left-padded (3
    pads), row 1 right-padded (2 pads), row 2 full. Labels are the ids with -100 on pads, on row 0's
    first real token (HF's shift would have it predicted from a pad position) and on row 2's first
    three tokens (a masked prompt)."""
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(3, LLAMA_SHAPE["vocab_size"], (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[0, :3] = 0
    mask[1, 7:] = 0
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100
    labels[2, :3] = -100
    return ids, mask, labels


def make_llama_forward_fixtures(outdir: Path) -> None:
    """tests/fixtures/llama/forward.safetensors: transformers' LlamaForCausalLM (eager attention,
    position ids arange(T) as transformers uses when only attention_mask is given) on
    `forward_batch()`, keys `{case}.logits` ([B, T, V], in the compute dtype) and `{case}.loss`
    (f32 scalar) besides input_ids, attention_mask and labels (i64):
    - base.f32 / base.bf16: base loaded with dtype float32 / bfloat16
    - llama3_tied_f32.f32: llama3 rope scaling, tied embeddings
    - bnb_nf4.f32: base in f32 with each linear's weight replaced by bitsandbytes'
      dequantize_4bit of bnb_nf4's stored state (bf16, as bnb's own forward uses it), cast to f32"""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    ids, mask, labels = forward_batch()
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def load(name, dtype):
        return LlamaForCausalLM.from_pretrained(str(outdir / name), dtype=dtype,
                                                attn_implementation="eager").eval()

    nf4_base = load("base", torch.float32)
    stored = load_file(str(outdir / "bnb_nf4" / "model.safetensors"))
    with torch.no_grad():
        for name, module in nf4_base.named_modules():
            if not any(name.endswith(lin) for lin in LLAMA_LINEARS):
                continue
            prefix = f"{name}.weight."
            qs = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
            state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
            w = F.dequantize_4bit(stored[f"{name}.weight"], state, quant_type="nf4")
            assert w.dtype == torch.bfloat16 and w.shape == module.weight.shape
            module.weight.copy_(w.float())
    cases = {
        "base.f32": load("base", torch.float32),
        "base.bf16": load("base", torch.bfloat16),
        "llama3_tied_f32.f32": load("llama3_tied_f32", torch.float32),
        "bnb_nf4.f32": nf4_base,
    }
    for case, model in cases.items():
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, labels=labels)
        out[f"{case}.logits"] = res.logits.contiguous()
        out[f"{case}.loss"] = res.loss.float().reshape(())
    save_file(out, str(outdir / "forward.safetensors"), metadata={"format": "pt"})


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_fixtures(outdir: Path) -> None:
    """tests/fixtures/lora/: PEFT LoRA adapters on the f32 `base` tiny Llama, saved by PEFT's
    `save_pretrained`, and their logits for `forward_batch()` in lora_logits.safetensors
    (`{name}.logits` [B, T, V] f32, besides input_ids and attention_mask):
    - r4_all: r=4, lora_alpha=8, all seven linears, dropout 0 (scaling alpha / r)
    - r4_all_rslora: the same with use_rslora=True (scaling alpha / sqrt(r))
    A keeps PEFT's Kaiming-uniform init (torch seeded); B is overwritten with seeded normal values,
    so the adapter changes the logits. PEFT writes target_modules from a Python set (order depends
    on the hash seed) and the absolute base path: both are normalized for byte-identical reruns."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    outdir.mkdir(parents=True, exist_ok=True)
    llama = outdir.parent / "llama" / "base"
    ids, mask, _ = forward_batch()
    out = {"input_ids": ids, "attention_mask": mask}
    cases = {"r4_all": (31, False), "r4_all_rslora": (32, True)}
    for name, (seed, rslora) in cases.items():
        model = LlamaForCausalLM.from_pretrained(str(llama), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                            use_rslora=rslora, bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for module_name, p in sorted(peft_model.named_parameters()):
                if "lora_B" in module_name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        d = outdir / name
        if d.exists():
            for f in d.iterdir():
                f.unlink()
        peft_model.save_pretrained(str(d))
        (d / "README.md").unlink(missing_ok=True)
        cfg_path = d / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg["base_model_name_or_path"] = "tests/fixtures/llama/base"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        peft_model.eval()
        with torch.no_grad():
            logits = peft_model(input_ids=ids, attention_mask=mask).logits
        out[f"{name}.logits"] = logits.contiguous()
    save_file(out, str(outdir / "lora_logits.safetensors"), metadata={"format": "pt"})


def make_lora_grad_fixtures(outdir: Path) -> None:
    """tests/fixtures/lora/lora_grads.safetensors: PEFT's LoRA gradients for `forward_batch()` with
    its labels. Each adapter of `make_lora_fixtures` (r4_all, r4_all_rslora) is loaded by
    `PeftModel.from_pretrained(is_trainable=True)` on the f32 `base` (eager attention, eval mode:
    dropout is 0 anyway); the causal-LM loss transformers computes (mean over the label tokens)
    goes through `loss.backward()`. Keys: `{name}.loss` (f32 scalar) and `{name}.{key}` for every
    LoRA weight's gradient, `key` as in PEFT's adapter_model.safetensors (adapter name dropped,
    e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), besides input_ids,
    attention_mask and labels (i64)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    llama = outdir.parent / "llama" / "base"
    ids, mask, labels = forward_batch()
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for name in ["r4_all", "r4_all_rslora"]:
        model = LlamaForCausalLM.from_pretrained(str(llama), dtype=torch.float32,
                                                 attn_implementation="eager")
        peft_model = PeftModel.from_pretrained(model, str(outdir / name), is_trainable=True).eval()
        res = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        out[f"{name}.loss"] = res.loss.detach().float().reshape(())
        for key, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                assert "lora_" in key and p.grad is not None, key
                out[f"{name}.{key.replace('.default.', '.')}"] = p.grad.contiguous()
    save_file(out, str(outdir / "lora_grads.safetensors"), metadata={"format": "pt"})


def make_lora_grad_bf16_fixtures(outdir: Path) -> None:
    """tests/fixtures/lora/lora_grads_bf16.safetensors: PEFT's LoRA gradients for `forward_batch()`
    with bf16 compute, as `make_lora_grad_fixtures` but the model loaded with dtype bfloat16:
    - bf16.r4_all: `base` in bf16, the r4_all adapter as PEFT loads it on a bf16 model
      (autocast_adapter_dtype: A and B upcast to f32, f32 gradients)
    - bf16.r4_all_rslora: `base` in bf16, r4_all_rslora kept in bf16 (autocast_adapter_dtype=False:
      bf16 A, B and gradients)
    - nf4.r4_all: `base` in bf16 with each linear's weight replaced by bitsandbytes'
      dequantize_4bit of bnb_nf4's stored state (bf16; bnb's CPU Linear4bit computes its forward and
      input gradient with exactly this weight), the r4_all adapter in f32
    Keys `{case}.loss` (f32 scalar, transformers upcasts the logits) and `{case}.{key}` as in
    lora_grads.safetensors, in the dtype PEFT's gradient has. The batch is the one of that file."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    llama = outdir.parent / "llama"
    ids, mask, labels = forward_batch()
    stored = load_file(str(llama / "bnb_nf4" / "model.safetensors"))

    def bf16_base(nf4: bool):
        model = LlamaForCausalLM.from_pretrained(str(llama / "base"), dtype=torch.bfloat16,
                                                 attn_implementation="eager")
        if nf4:
            with torch.no_grad():
                for name, module in model.named_modules():
                    if not any(name.endswith(lin) for lin in LLAMA_LINEARS):
                        continue
                    prefix = f"{name}.weight."
                    qs = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
                    state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
                    w = F.dequantize_4bit(stored[f"{name}.weight"], state, quant_type="nf4")
                    assert w.dtype == torch.bfloat16 and w.shape == module.weight.shape
                    module.weight.copy_(w)
        return model

    cases = {
        "bf16.r4_all": (False, "r4_all", True),
        "bf16.r4_all_rslora": (False, "r4_all_rslora", False),
        "nf4.r4_all": (True, "r4_all", True),
    }
    out = {}
    for case, (nf4, adapter, autocast) in cases.items():
        peft_model = PeftModel.from_pretrained(bf16_base(nf4), str(outdir / adapter), is_trainable=True,
                                               autocast_adapter_dtype=autocast).eval()
        want = torch.float32 if autocast else torch.bfloat16
        res = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        out[f"{case}.loss"] = res.loss.detach().float().reshape(())
        for key, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                assert "lora_" in key and p.grad is not None and p.dtype == want, (key, p.dtype)
                out[f"{case}.{key.replace('.default.', '.')}"] = p.grad.contiguous()
    save_file(out, str(outdir / "lora_grads_bf16.safetensors"), metadata={"format": "pt"})


MERGE_SAMPLE_STRIDE = 7


def make_lora_merge_fixtures(outdir: Path) -> None:
    """tests/fixtures/lora/merged.safetensors: PEFT's `merge_and_unload()` of each adapter of
    `make_lora_fixtures` (r4_all, r4_all_rslora) on the f32 `base`. For every merged linear weight
    W' [out, in] (key `{name}.{state-dict key}`, e.g. `r4_all.model.layers.0.self_attn.q_proj.weight`):
    `.sample` = W'.flatten()[::MERGE_SAMPLE_STRIDE] (f32), `.row_sum` and `.col_sum` = W' summed
    over in and over out in f64. Samples and sums pin every element's row and column and one in
    seven exactly, at a third of the size of the weights themselves (346 KB per adapter)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    llama = outdir.parent / "llama" / "base"
    out = {}
    for name in ["r4_all", "r4_all_rslora"]:
        model = LlamaForCausalLM.from_pretrained(str(llama), dtype=torch.float32,
                                                 attn_implementation="eager")
        merged = PeftModel.from_pretrained(model, str(outdir / name)).merge_and_unload()
        for key, w in sorted(merged.state_dict().items()):
            if not any(key.endswith(f"{lin}.weight") for lin in LLAMA_LINEARS):
                continue
            w = w.detach()
            assert w.dtype == torch.float32 and w.dim() == 2, key
            out[f"{name}.{key}.sample"] = w.flatten()[::MERGE_SAMPLE_STRIDE].contiguous()
            out[f"{name}.{key}.row_sum"] = w.double().sum(dim=1).contiguous()
            out[f"{name}.{key}.col_sum"] = w.double().sum(dim=0).contiguous()
    save_file(out, str(outdir / "merged.safetensors"), metadata={"format": "pt"})


def make_generation_fixtures(outdir: Path) -> None:
    """tests/fixtures/llama/generate.safetensors: transformers' greedy `generate` (do_sample=False,
    max_new_tokens=8, use_cache=True, eager attention, eos and pad ids from the config) in f32 on a
    batch of three prompts of lengths 5, 2 and 7, left-padded with pad id 0: input_ids and
    attention_mask ([3, 7] i64) and `{name}.tokens` (i64, the new tokens only, pad after a row's
    eos) for the `base` and `llama3_tied_f32` checkpoints."""
    from transformers import LlamaForCausalLM

    lens = [5, 2, 7]
    width = max(lens)
    pad = LLAMA_SHAPE["pad_token_id"]
    gen = torch.Generator().manual_seed(41)
    ids = torch.full((len(lens), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(lens), width, dtype=torch.int64)
    for row, n in enumerate(lens):
        ids[row, width - n:] = torch.randint(3, LLAMA_SHAPE["vocab_size"], (n,), generator=gen)
        mask[row, width - n:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for name in ["base", "llama3_tied_f32"]:
        model = LlamaForCausalLM.from_pretrained(str(outdir / name), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                  use_cache=True, eos_token_id=model.config.eos_token_id,
                                  pad_token_id=model.config.pad_token_id)
        out[f"{name}.tokens"] = seqs[:, width:].contiguous()
    save_file(out, str(outdir / "generate.safetensors"), metadata={"format": "pt"})


TOKENIZER_CORPUS_WORDS = (
    "the a an of to in and is it that for on with as was by at be this from or are which you "
    "question answer choices instruction input output response user assistant system hello world "
    "model llama token train data loss learning rate batch please write short poem explain why sky "
    "blue sum numbers list capital france paris berlin rome madrid one two three four five six "
    "seven eight nine ten what how when where who yes no true false red green colour color"
).split()

# Llama-2-style template (the [INST] markers, a folded-in system prompt, role alternation enforced
# through raise_exception, `.strip()` and `| trim`) with a generation-prompt branch; written under
# the fixture's own special tokens.
TOKENIZER_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] | trim %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}\n"
    "{% for message in loop_messages %}\n"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}\n"
    "{% if loop.index0 == 0 and system_message %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}\n"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)


def make_tokenizer_fixtures(outdir: Path) -> None:
    """tests/fixtures/tokenizer/: a byte-level BPE (vocab 300: 256 bytes, <s> </s> <pad>, merges
    learned from a fixed corpus) with a `<s> $A` post-processor as tokenizer.json, a
    tokenizer_config.json holding the special tokens and a Llama-2-style chat template, and
    expected.json with what transformers' AutoTokenizer gives: `encode` ids with and without
    special tokens and `decode` of them for a few strings, and `apply_chat_template` (rendered
    string and ids) for fixed conversations, plus the exception message of a bad one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    outdir.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(53)
    words = TOKENIZER_CORPUS_WORDS
    corpus = [" ".join(words[i] for i in gen.integers(0, len(words), 12)) + "." for _ in range(400)]
    specials = ["<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(outdir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True},
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": TOKENIZER_CHAT_TEMPLATE,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    hf = AutoTokenizer.from_pretrained(str(outdir))
    texts = ["hello world", "The sky is blue.", "  leading and  double  spaces\nnew line\ttab",
             "café naïve 東京 🦙", "<s>special</s> inside <pad>", ""]
    encode = []
    for text in texts:
        ids = hf.encode(text, add_special_tokens=True)
        plain = hf.encode(text, add_special_tokens=False)
        encode.append({"text": text, "ids": ids, "ids_no_special": plain,
                       "decoded": hf.decode(ids), "decoded_skip_special": hf.decode(ids, skip_special_tokens=True)})
    conversations = [
        ([{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "  Paris. "}], False),
        ([{"role": "system", "content": " Answer briefly. "},
          {"role": "user", "content": "Sum one and two."},
          {"role": "assistant", "content": "Three."},
          {"role": "user", "content": "Why is the sky blue?\n"}], True),
        ([{"role": "user", "content": "hello"}], False),
    ]
    chat = []
    for messages, add_generation_prompt in conversations:
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        chat.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                     "rendered": rendered, "ids": list(ids)})
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    try:
        hf.apply_chat_template(bad, tokenize=False)
        raise RuntimeError("the template accepted non-alternating roles")
    except Exception as err:  # transformers raises jinja2's TemplateError
        if isinstance(err, RuntimeError):
            raise
        error = {"messages": bad, "message": str(err)}
    expected = {"bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id, "pad_id": hf.pad_token_id,
                "unk_id": hf.unk_token_id, "vocab_size": len(hf), "encode": encode, "chat": chat,
                "chat_error": error}
    (outdir / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")


GGUF_SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
# The GGML type of each tensor of tests/fixtures/gguf/tiny.gguf: every type gguf-py can write.
GGUF_TYPES = {
    "token_embd.weight": "F16", "output_norm.weight": "F32", "output.weight": "Q8_0",
    "blk.0.attn_norm.weight": "F32", "blk.0.ffn_norm.weight": "F32",
    "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q4_0", "blk.0.attn_v.weight": "Q4_1",
    "blk.0.attn_output.weight": "Q5_0", "blk.0.ffn_gate.weight": "BF16", "blk.0.ffn_up.weight": "F32",
    "blk.0.ffn_down.weight": "Q8_0",
}
GGUF_TEXTS = ["hello world", "The sky is blue.", "  leading and  double  spaces\nnew line\ttab",
              "café naïve 東京 🦙", "<s>special</s> inside <pad>", ""]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for a Q or K projection: each head's two rotary halves
    interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer_dir: Path) -> None:
    """`model` (a transformers Llama) as llama.cpp's converter writes a GGUF file: GGUF tensor
    names, Q/K rows permuted, each tensor in its GGUF_TYPES type (Q4_1 where not listed), and the
    byte-level BPE of `tokenizer_dir` (tokenizer.json, tokenizer_config.json) as tokenizer metadata,
    its special tokens as control tokens."""
    import gguf
    from gguf import quants

    c = model.config
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("qlora tiny fixture")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_pad_token_id(vocab["<pad>"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, tensor in model.state_dict().items():
        if hf_name in names:
            name = names[hf_name]
        else:
            layer, rest = hf_name[len("model.layers."):].split(".", 1)
            name = f"blk.{layer}.{parts[rest[:-len('.weight')]]}.weight"
        data = tensor.float().numpy()
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        kind = GGUF_TYPES.get(name, "F32" if data.ndim == 1 else "Q4_1")
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        if kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(data))
        elif kind == "F16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_gguf_fixtures(outdir: Path, tokenizer_dir: Path) -> None:
    """tests/fixtures/gguf/: tiny.gguf (write_tiny_gguf of a random Llama of GGUF_SHAPE with the
    tokenizer fixture's vocabulary, untied lm_head), and what transformers' GGUF loader makes of
    it: expected.safetensors with the f32 logits of two rows of ids (`input_ids`, `logits`) and
    the dequantized, unpermuted q_proj / k_proj / v_proj of layer 0; expected.json with the
    config fields it read, and its tokenizer's ids (with and without special tokens) and decoded
    text for GGUF_TEXTS and a rendered chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outdir.mkdir(parents=True, exist_ok=True)
    vocab_size = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model = tiny_llama(31, torch.float32, vocab_size=vocab_size, **GGUF_SHAPE)
    write_tiny_gguf(outdir / "tiny.gguf", model, tokenizer_dir)

    hf = AutoModelForCausalLM.from_pretrained(str(outdir), gguf_file="tiny.gguf", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(outdir), gguf_file="tiny.gguf")
    gen = torch.Generator().manual_seed(41)
    ids = torch.randint(3, vocab_size, (2, 11), generator=gen)
    with torch.no_grad():
        logits = hf(input_ids=ids).logits.contiguous()
    sd = hf.state_dict()
    out = {"input_ids": ids, "logits": logits}
    for m in ["q_proj", "k_proj", "v_proj"]:
        out[f"layers.0.{m}"] = sd[f"model.layers.0.self_attn.{m}.weight"].contiguous()
    save_file(out, str(outdir / "expected.safetensors"), metadata={"format": "pt"})
    encode = [{"text": t, "ids": tok.encode(t, add_special_tokens=True),
               "ids_no_special": tok.encode(t, add_special_tokens=False),
               "decoded": tok.decode(tok.encode(t, add_special_tokens=False))} for t in GGUF_TEXTS]
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    c = hf.config
    expected = {
        "config": {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                   "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                   "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
                   "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
                   "tie_word_embeddings": c.tie_word_embeddings,
                   "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id},
        "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
        "vocab_size": len(tok), "encode": encode,
        "chat": {"messages": messages, "rendered": tok.apply_chat_template(messages, tokenize=False)},
    }
    (outdir / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")


def make_gguf_spm_fixture(outdir: Path) -> None:
    """tests/fixtures/gguf/spm.gguf + spm_expected.json: a SentencePiece-style vocabulary (GGUF
    tokenizer model `llama`, as llama.cpp stores Llama 2's: `<unk>` `<s>` `</s>`, 256 byte tokens
    `<0xNN>` of type 6, then `▁`-spelled pieces with scores and no merges) learned by tokenizers'
    SentencePieceBPETokenizer from a fixed corpus, in a GGUF with the tiny model's metadata and no
    tensors; and transformers' GGUF tokenizer's ids (with and without special tokens) and decoded
    text for GGUF_TEXTS plus texts that need byte fallback."""
    import gguf
    from tokenizers import SentencePieceBPETokenizer
    from transformers import AutoTokenizer

    gen = np.random.default_rng(59)
    words = TOKENIZER_CORPUS_WORDS
    corpus = [" ".join(words[i] for i in gen.integers(0, len(words), 12)) + "." for _ in range(400)]
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(corpus, vocab_size=200, min_frequency=2, show_progress=False, special_tokens=[])
    learned = spm.get_vocab()
    pieces = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    # Scores as llama.cpp's converter stores a BPE SentencePiece model's: minus the piece's rank.
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    path = outdir / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("qlora spm tokenizer fixture")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tok = AutoTokenizer.from_pretrained(str(outdir), gguf_file="spm.gguf")
    texts = GGUF_TEXTS + ["Zebra: ÿ ñ 42!", "  two leading spaces", "tab\tand\nnewline"]
    encode = [{"text": t, "ids": tok.encode(t, add_special_tokens=True),
               "ids_no_special": tok.encode(t, add_special_tokens=False),
               "decoded": tok.decode(tok.encode(t, add_special_tokens=False))} for t in texts]
    expected = {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "unk_id": tok.unk_token_id,
                "vocab_size": len(tok), "encode": encode}
    (outdir / "spm_expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")


SMOLLM2_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"


def make_smollm2_fixture(outdir: Path) -> None:
    """tests/fixtures/gguf/smollm2.safetensors, only where the SmolLM2-135M-Instruct Q4_1 GGUF is
    at $QLORA_SMOLLM2_GGUF: transformers' GGUF loader on SMOLLM2_TEXT: its token ids, and in f32
    and (keys `bf16.*`) bf16 the log-sum-exp and argmax of the logits at every position and the
    whole last row of logits."""
    path = os.environ.get("QLORA_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        print("QLORA_SMOLLM2_GGUF not set to the SmolLM2 GGUF file: smollm2 fixture kept as is")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    ids = torch.tensor([tok.encode(SMOLLM2_TEXT, add_special_tokens=False)])
    out = {"input_ids": ids[0]}
    for prefix, dtype in [("", torch.float32), ("bf16.", torch.bfloat16)]:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype,
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        out[f"{prefix}lse"] = torch.logsumexp(logits.float(), dim=-1)
        out[f"{prefix}argmax"] = logits.argmax(dim=-1)
        out[f"{prefix}last_logits"] = logits[-1].contiguous()
    save_file(out, str(outdir / "smollm2.safetensors"), metadata={"format": "pt", "text": SMOLLM2_TEXT})


# The files `qlora export` writes from tests/gguf.rs's deterministic export model (hidden 256, one
# layer, tied embeddings, the tokenizer fixture's vocabulary), committed by
# `QLORA_BLESS_EXPORT=1 cargo test --test gguf exported_files`.
EXPORTED_GGUF = ["exported-q8_0.gguf", "exported-q4_k_m.gguf"]


def make_exported_gguf_fixture(outdir: Path) -> None:
    """tests/fixtures/gguf/exported.safetensors + exported.json: what independent readers make of
    the GGUF files qlora exported (EXPORTED_GGUF): gguf-py's tensor types, and transformers' GGUF
    loader's f32 logits of one row of ids (`input_ids`, `logits.<file>`) and its tokenizer's ids
    for GGUF_TEXTS. Skipped (with a message) when the exported files are missing."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not all((outdir / f).exists() for f in EXPORTED_GGUF):
        print(f"no {EXPORTED_GGUF} in {outdir}: run QLORA_BLESS_EXPORT=1 cargo test --test gguf "
              "exported_files first; exported.safetensors not written")
        return
    gen = torch.Generator().manual_seed(43)
    ids = torch.randint(3, 300, (1, 13), generator=gen)
    out = {"input_ids": ids}
    expected = {}
    for name in EXPORTED_GGUF:
        reader = gguf.GGUFReader(str(outdir / name))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        hf = AutoModelForCausalLM.from_pretrained(str(outdir), gguf_file=name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(str(outdir), gguf_file=name)
        with torch.no_grad():
            out[f"logits.{name}"] = hf(input_ids=ids).logits.contiguous()
        expected[name] = {
            "types": types,
            "encode": [{"text": t, "ids": tok.encode(t, add_special_tokens=True)} for t in GGUF_TEXTS],
        }
    save_file(out, str(outdir / "exported.safetensors"), metadata={"format": "pt"})
    (outdir / "exported.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")


def main() -> int:
    torch.use_deterministic_algorithms(True)
    fixtures = REPO / "tests" / "fixtures"
    make_nf4_fixtures(fixtures / "nf4")
    total = sum(p.stat().st_size for p in (fixtures / "nf4").iterdir())
    print(f"wrote {fixtures / 'nf4'} ({total} bytes)")
    make_adamw_fixtures(fixtures / "adamw")
    print(f"wrote {fixtures / 'adamw' / 'adamw.safetensors'}")
    make_llama_fixtures(fixtures / "llama")
    make_llama_forward_fixtures(fixtures / "llama")
    make_generation_fixtures(fixtures / "llama")
    total = sum(p.stat().st_size for p in (fixtures / "llama").rglob("*") if p.is_file())
    print(f"wrote {fixtures / 'llama'} ({total} bytes)")
    make_lora_fixtures(fixtures / "lora")
    total = sum(p.stat().st_size for p in (fixtures / "lora").rglob("*") if p.is_file())
    print(f"wrote {fixtures / 'lora'} ({total} bytes)")
    make_tokenizer_fixtures(fixtures / "tokenizer")
    total = sum(p.stat().st_size for p in (fixtures / "tokenizer").iterdir())
    print(f"wrote {fixtures / 'tokenizer'} ({total} bytes)")
    make_lora_grad_fixtures(fixtures / "lora")
    print(f"wrote {fixtures / 'lora' / 'lora_grads.safetensors'}")
    make_lora_grad_bf16_fixtures(fixtures / "lora")
    print(f"wrote {fixtures / 'lora' / 'lora_grads_bf16.safetensors'}")
    make_lora_merge_fixtures(fixtures / "lora")
    print(f"wrote {fixtures / 'lora' / 'merged.safetensors'}")
    make_gguf_fixtures(fixtures / "gguf", fixtures / "tokenizer")
    make_gguf_spm_fixture(fixtures / "gguf")
    make_smollm2_fixture(fixtures / "gguf")
    make_exported_gguf_fixture(fixtures / "gguf")
    print(f"wrote {fixtures / 'gguf'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.exit(main())
