#!/usr/bin/env bash
# Static performance report of every kernel, no GPU needed: for sm_80 and sm_90, the block and grid
# each launcher picks at Llama-2-13B shapes (printed by tests/kernel_launch_table.rs), registers
# and static shared memory (ptxas on compute_80 PTX, as nvcc builds the SASS build.rs embeds),
# the dynamic shared memory of the launch, theoretical occupancy by the formulas of CUDA's
# cuda_occupancy.h and its limiting factor, and from the SASS (cuobjdump) the tensor-core
# instructions per kernel: HMMA (and how many sit inside loops), LDSM (ldmatrix), LDGSTS (cp.async).
# Usage: bash scripts/kernel-report.sh [--out FILE] [ARCH ...]   (needs eval "$(bash scripts/install-cuda.sh)")
set -euo pipefail
cd "$(dirname "$0")/.."

out=""
archs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) archs+=("$1"); shift ;;
  esac
done
[ ${#archs[@]} -gt 0 ] || archs=(sm_80 sm_90)
for tool in nvcc ptxas cuobjdump python3 cargo; do
  command -v "$tool" >/dev/null || { echo "kernel-report: $tool not found (eval \"\$(bash scripts/install-cuda.sh)\")" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Launch configurations from the launchers themselves (plain Rust, no `cuda` feature needed).
cargo test -q --test kernel_launch_table -- --nocapture --test-threads=1 >"$tmp/launch.log" 2>&1 \
  || { cat "$tmp/launch.log" >&2; echo "kernel-report: launch table test failed" >&2; exit 1; }
grep '^LAUNCH' "$tmp/launch.log" >"$tmp/launch.tsv" || { echo "kernel-report: no LAUNCH lines" >&2; exit 1; }

# compute_80 PTX, then ptxas per target: the SASS of build.rs's fatbin is compiled the same way.
for src in kernels/*.cu; do
  stem=$(basename "$src" .cu)
  nvcc --ptx -std=c++17 -O3 -lineinfo --expt-relaxed-constexpr --gpu-architecture=compute_80 \
    -I kernels -o "$tmp/$stem.ptx" "$src"
  for arch in "${archs[@]}"; do
    ptxas -arch="$arch" -O3 -v -o "$tmp/$stem.$arch.cubin" "$tmp/$stem.ptx" >"$tmp/$stem.$arch.ptxas" 2>&1 \
      || { cat "$tmp/$stem.$arch.ptxas" >&2; exit 1; }
    cuobjdump -sass "$tmp/$stem.$arch.cubin" >"$tmp/$stem.$arch.sass"
  done
done

status=0
python3 - "$tmp" "${archs[@]}" >"$tmp/report.md" <<'PY' || status=$?
import glob, math, os, re, sys

tmp, archs = sys.argv[1], sys.argv[2:]

# Per-SM limits. Formulas and granularities follow CUDA 13.0's include/cuda_occupancy.h: 4 register
# sub-partitions, registers allocated per warp in units of 256, shared memory in units of 128 B
# plus 1 KB reserved per block (sm_80+), 48 KB per block without the opt-in attribute (the CUDA
# launcher sets it only for kernels that declare `dynamic_shared_opt_in`; none does yet). Per-SM
# totals from the CUDA C++ Programming Guide's compute-capability table: 8.0 and 9.0 both hold
# 2048 threads, 32 blocks and 64 K registers per SM; shared memory 164 KB (8.0) and 228 KB (9.0),
# the default carve-out being the largest.
LIMITS = {
    "sm_80": dict(threads=2048, blocks=32, regs=65536, smem=164 * 1024),
    "sm_90": dict(threads=2048, blocks=32, regs=65536, smem=228 * 1024),
}
REG_UNIT, SUBPARTITIONS, SMEM_UNIT, SMEM_RESERVED, SMEM_BLOCK_DEFAULT = 256, 4, 128, 1024, 48 * 1024

def round_up(x, unit):
    return (x + unit - 1) // unit * unit

def occupancy(arch, threads, regs, smem_static, smem_dynamic):
    lim = LIMITS[arch]
    warps = math.ceil(threads / 32)
    by = {"warps": lim["threads"] // 32 // warps, "blocks": lim["blocks"]}
    reg_warp = round_up(regs * 32, REG_UNIT)
    if reg_warp * round_up(warps, SUBPARTITIONS) > lim["regs"]:
        by["registers"] = 0
    elif reg_warp:
        by["registers"] = (lim["regs"] // SUBPARTITIONS // reg_warp) * SUBPARTITIONS // warps
    smem = round_up(smem_static + smem_dynamic + SMEM_RESERVED, SMEM_UNIT)
    if smem_static + smem_dynamic > SMEM_BLOCK_DEFAULT:
        by["shared memory"] = 0
    else:
        by["shared memory"] = lim["smem"] // smem
    blocks = min(by.values())
    limiter = " = ".join(k for k, v in by.items() if v == blocks)
    return blocks, blocks * warps, blocks * warps / (lim["threads"] / 32), limiter

def ptxas_usage(path):
    usage, name = {}, None
    for line in open(path):
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            usage[name] = dict(regs=0, smem=0, spill=0)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            usage[name]["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            usage[name]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            usage[name]["smem"] = int(s.group(1)) if s else 0
    return usage

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
BRANCH = re.compile(r"(0x[0-9a-f]+)\s*$")

def sass_counts(path):
    """Per function: HMMA (all, and inside loops: between a backward branch and its target),
    LDSM and LDGSTS instruction counts."""
    funcs, name, insns = {}, None, []
    def flush():
        if name is None:
            return
        loops = []
        for addr, op, rest in insns:
            if op.startswith("BRA"):
                t = BRANCH.search(rest.strip())
                if t and int(t.group(1), 16) < addr:
                    loops.append((int(t.group(1), 16), addr))
        count = lambda p: sum(op.startswith(p) for _, op, _ in insns)
        in_loop = sum(op.startswith("HMMA") and any(a <= addr <= b for a, b in loops) for addr, op, _ in insns)
        funcs[name] = dict(hmma=count("HMMA"), hmma_loop=in_loop, ldsm=count("LDSM"), ldgsts=count("LDGSTS"))
    for line in open(path):
        m = re.search(r"Function : (\S+)", line)
        if m:
            flush()
            name, insns = m.group(1), []
            continue
        m = INSN.search(line)
        if m and name:
            insns.append((int(m.group(1), 16), m.group(2), m.group(3)))
    flush()
    return funcs

launches = {}
for line in open(os.path.join(tmp, "launch.tsv")):
    _, module, kernel, grid, block, dyn, shape = line.rstrip("\n").split("\t")
    threads = math.prod(int(x) for x in block.split("x"))
    launches[kernel] = dict(module=module, grid=grid, block=block, threads=threads, dyn=int(dyn), shape=shape)

failures = []
for arch in archs:
    usage, sass = {}, {}
    for path in sorted(glob.glob(os.path.join(tmp, f"*.{arch}.ptxas"))):
        module = os.path.basename(path).split(".")[0]
        for k, v in ptxas_usage(path).items():
            usage[k] = dict(v, module=module)
        sass.update(sass_counts(path[: -len(".ptxas")] + ".sass"))
    print(f"### {arch}\n")
    print("| kernel | shape (13B) | grid | block | regs | smem static + dyn (B) | blocks/SM | warps/SM | occupancy | limited by | HMMA (in loops) | LDSM | LDGSTS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kernel, l in launches.items():
        if kernel not in usage:
            failures.append(f"{kernel}: in the launch table but not in ptxas output ({arch})")
            continue
        u, s = usage[kernel], sass.get(kernel, dict(hmma=0, hmma_loop=0, ldsm=0, ldgsts=0))
        if u["spill"]:
            failures.append(f"{kernel} spills {u['spill']} bytes on {arch}")
        blocks, warps, occ, limiter = occupancy(arch, l["threads"], u["regs"], u["smem"], l["dyn"])
        print(f"| `{kernel}` | {l['shape']} | {l['grid']} | {l['block']} | {u['regs']} | {u['smem']} + {l['dyn']} "
              f"| {blocks} | {warps} | {occ:.0%} | {limiter} | {s['hmma']} ({s['hmma_loop']}) | {s['ldsm']} | {s['ldgsts']} |")
    rest = sorted(k for k in usage if k not in launches)
    if rest:
        print(f"\nTest-only kernels (no launcher; launched by the emulator self-tests) on {arch}: "
              + ", ".join(f"`{k}` {usage[k]['regs']} regs, HMMA {sass.get(k, {}).get('hmma', 0)}"
                          f" ({sass.get(k, {}).get('hmma_loop', 0)} in loops)" for k in rest))
    print()
for f in failures:
    print(f"kernel-report: {f}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY

cat "$tmp/report.md"
[ -z "$out" ] || cp "$tmp/report.md" "$out"
exit "$status"
