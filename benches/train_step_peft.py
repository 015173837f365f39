"""The training step of benches/train_step.rs in PyTorch + PEFT on the CPU, for the side-by-side
ratio: a randomly initialised LlamaForCausalLM of the given shapes, LoRA on all seven linears,
batch [1, seq] of random tokens labelled with themselves, forward + loss + backward + global-norm
clipping + AdamW, timed after warm-up; prints one JSON line (tokens/s, s/step, peak RSS).

    python benches/train_step_peft.py --base nf4 --threads 2 --hidden 768 ...

Needs torch, transformers and peft (and bitsandbytes for `--base nf4`), e.g. the fixtures venv of
scripts/requirements-fixtures.txt. benches/train_step.rs runs it when QLORA_PEFT_PYTHON is set.
"""

import argparse
import json
import os
import re
import sys
import time


def vm_kib(field: str) -> int:
    """A `Vm*` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux: writing 5 to clear_refs), so the peak measured
    after it belongs to the training steps and not to building the model."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def quantize_linears(model, torch) -> None:
    """Every decoder layer's seven linears as bitsandbytes NF4 `Linear4bit` (blocksize 64, double
    quant, f32 compute), quantized from the random f32 weights on their move to the CPU."""
    import bitsandbytes as bnb

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in names:
                dense = getattr(block, name, None)
                if dense is None:
                    continue
                q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False,
                                      compute_dtype=torch.float32, compress_statistics=True,
                                      quant_type="nf4")
                q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4", blocksize=64)
                setattr(block, name, q.to("cpu"))
    # What transformers sets on a model it loaded in 4 bit; PEFT reads it to pick its bnb LoRA layer.
    model.is_loaded_in_4bit = True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", choices=["dense", "nf4"], default="nf4")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--checkpointing", choices=["on", "off"], default="on",
                   help="gradient checkpointing per decoder layer (the Rust step always recomputes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    baseline = vm_kib("VmRSS")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate, vocab_size=args.vocab,
                         tie_word_embeddings=args.tied, max_position_embeddings=max(2048, args.seq))
    model = LlamaForCausalLM(config).to(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    if args.base == "nf4":
        quantize_linears(model, torch)
    if args.checkpointing == "on":
        # transformers 5 names it activation checkpointing (gradient_checkpointing_enable warns).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_layer = type(model.base_model.model.model.layers[0].self_attn.q_proj)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)

    def step() -> float:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    setup_peak = vm_kib("VmHWM")
    losses = []
    for _ in range(args.warmup):
        losses.append(step())
    reset_peak_rss()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    s_per_step = sum(times) / len(times)
    print(json.dumps({
        "impl": "pytorch+peft",
        "base": args.base,
        "threads": torch.get_num_threads(),
        "params": params,
        "trainable_params": sum(p.numel() for p in trainable),
        "lora_layer": f"{lora_layer.__module__}.{lora_layer.__name__}",
        "attention": model.config._attn_implementation,
        "checkpointing": args.checkpointing,
        "tokens_per_step": args.batch * args.seq,
        "steps": args.steps,
        "step_seconds": times,
        "s_per_step": s_per_step,
        "tokens_per_s": args.batch * args.seq / s_per_step,
        "peak_rss_bytes": vm_kib("VmHWM") * 1024,
        "setup_peak_rss_bytes": setup_peak * 1024,
        "baseline_rss_bytes": baseline * 1024,
        "losses": losses,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.exit(main())
