#!/usr/bin/env bash
# Everything a GPU machine should run, in one go, with every result in one markdown file
# (gpu-check-<UTC date>.md, or the path given): the pinned CUDA toolchain, CUDA_COMPUTE_CAP from
# nvidia-smi, the emulator self-tests on the device first (a mismatch with the emulation stops the
# run there), `cargo test --release --features cuda` (GPU tests; a test that skips for want of a
# device counts as a failure here), every `*_gpu` bench
# declared in Cargo.toml, and the 13B-shaped training step (the `train_step_gpu` bench) once the
# runtime has a CUDA path. Exits non-zero, naming the failed steps, if anything fails.
# This is the entry point for `qlora bench kernels` until the CLI grows that command.
# Usage: bash scripts/gpu-check.sh [OUTPUT.md]
set -uo pipefail
cd "$(dirname "$0")/.."

report="${1:-gpu-check-$(date -u +%Y-%m-%d-%H%M).md}"
export CARGO_TERM_COLOR=never
failed=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT

say() { printf '%s\n' "$*" | tee -a "$report"; }
die() { say "**FAILED: $***"; exit 1; }

# Runs a named step, appends its command, exit status, time and output to the report.
# A step fails on a non-zero exit, or when its output says a GPU test skipped.
step() {
  local name="$1"; shift
  local t0=$SECONDS status=0
  echo "=== $name" >&2
  "$@" >"$log" 2>&1 || status=$?
  if [ "$status" -eq 0 ] && grep -q 'skipping CUDA: ' "$log"; then
    status=125
    echo "a test skipped its GPU path: $(grep -m1 -o 'skipping CUDA: .*' "$log")" >>"$log"
  fi
  {
    echo
    echo "## $name"
    echo
    echo "\`$*\` — exit $status, $((SECONDS - t0)) s"
    echo
    echo '```'
    grep -v -E '^\s+(Compiling|Checking|Downloaded|Downloading|Blocking) ' "$log"
    echo '```'
  } >>"$report"
  if [ "$status" -ne 0 ]; then
    failed+=("$name")
    tail -n 40 "$log" >&2
  fi
  return 0
}

: >"$report"
say "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "commit \`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script is for a machine with an NVIDIA GPU"
cuda_env=$(bash scripts/install-cuda.sh) || die "scripts/install-cuda.sh"
eval "$cuda_env"
# The install script puts a stub libcuda on LD_LIBRARY_PATH for machines without a driver; here the
# real driver must win, so its directory goes first.
# QLORA_LIBCUDA_DIR names its directory where the loader cache does not know it.
if [ -n "${QLORA_LIBCUDA_DIR:-}" ]; then
  driver="$QLORA_LIBCUDA_DIR/libcuda.so.1"
else
  driver=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 / { print $NF; exit }')
fi
[ -n "$driver" ] && [ -e "$driver" ] \
  || die "no libcuda.so.1 (not in the loader cache; set QLORA_LIBCUDA_DIR): is the NVIDIA driver installed?"
export LD_LIBRARY_PATH="$(dirname "$driver"):$LD_LIBRARY_PATH"

cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
[[ "$cap" =~ ^[0-9]+$ ]] || die "could not read the compute capability from nvidia-smi (got '$cap')"
export CUDA_COMPUTE_CAP="$cap"
say ""
say "driver \`$driver\`, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
say ""
say '```'
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem \
  --format=csv | tee -a "$report"
say '```'

# First the emulator's self-tests on the device (tests/emulator.rs `mod cuda`: barriers, warp
# collectives, mma/ldmatrix layouts, cp.async, conversions, atomics, the shared-memory opt-in, each
# checked against the same Rust references the emulation is): every kernel test below trusts the
# emulation, so a mismatch here stops the run before anything else.
selftests_ran() {
  cargo test --release --features cuda --test emulator -- --nocapture cuda:: || return
  # A filter that matches nothing passes too: insist that the GPU self-tests ran.
  local ran
  ran=$(grep -oE 'test result: ok\. [0-9]+ passed' "$log" | awk '{ n += $4 } END { print n + 0 }')
  if [ "$ran" -lt 1 ]; then
    echo "no GPU self-test ran (the \`cuda::\` filter matched nothing)"
    return 1
  fi
}
step "emulator self-tests on the device" selftests_ran
if [ ${#failed[@]} -gt 0 ]; then
  say ""
  say "## Result: FAILED"
  say "- emulator self-tests on the device: the GPU disagrees with the emulation (or a self-test"
  say "  could not run), so no kernel result below would mean anything; nothing else was run."
  echo "gpu-check: the emulator self-tests failed on the device; see $report" >&2
  exit 1
fi

step "GPU tests (cargo test --release --features cuda)" \
  cargo test --release --features cuda -- --nocapture

# Every bench named *_gpu in Cargo.toml, so new ones are picked up; the training step has its own step.
mapfile -t benches < <(awk '/^\[\[bench\]\]/ { b = 1; next } b && /^name *=/ { gsub(/[" ]/, "", $0); sub(/^name=/, "", $0); print; b = 0 }' Cargo.toml | grep '_gpu$' | grep -v '^train_step_gpu$')
[ ${#benches[@]} -gt 0 ] || failed+=("no *_gpu bench found in Cargo.toml")
for b in "${benches[@]}"; do
  step "bench $b" cargo bench --features cuda --bench "$b"
done

if awk '/^\[\[bench\]\]/ { b = 1; next } b && /^name *=/ { print; b = 0 }' Cargo.toml | grep -q '"train_step_gpu"'; then
  step "13B-shaped training step, random NF4 weights (bench train_step_gpu)" \
    cargo bench --features cuda --bench train_step_gpu
else
  say ""
  say "## 13B-shaped training step"
  say ""
  say "Skipped: the runtime has no CUDA path yet (the Llama forward/backward runs on candle CPU"
  say "tensors); this step runs the \`train_step_gpu\` bench once Cargo.toml declares it."
fi

say ""
if [ ${#failed[@]} -gt 0 ]; then
  say "## Result: FAILED"
  for f in "${failed[@]}"; do say "- $f"; done
  echo "gpu-check: ${#failed[@]} step(s) failed; see $report" >&2
  exit 1
fi
say "## Result: every step passed"
echo "gpu-check: all steps passed; see $report" >&2
