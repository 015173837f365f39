#!/usr/bin/env bash
# Compiles every kernels/*.cu for sm_80 and sm_90 with `ptxas -v` and prints, per kernel and
# architecture: registers, shared memory, stack frame and spill bytes. Fails if anything spills.
# Each SASS comes from compute_80 PTX, as in the fatbin build.rs embeds (which records the same
# figures for every architecture it ships and compares them with the driver's at module load).
# Usage: bash scripts/ptxas-report.sh [ARCH ...]   (needs nvcc: eval "$(bash scripts/install-cuda.sh)")
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "nvcc not found: eval \"\$(bash scripts/install-cuda.sh)\"" >&2; exit 1; }
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(sm_80 sm_90)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

printf '%-8s %-28s %5s %8s %7s %7s %7s\n' arch kernel regs smem_B stack_B spill_st spill_ld
spills=0
for arch in "${archs[@]}"; do
  for src in kernels/*.cu; do
    log="$tmp/$(basename "$src").$arch.log"
    nvcc -cubin -gencode "arch=compute_80,code=$arch" -O3 -std=c++17 --expt-relaxed-constexpr -Ikernels -Xptxas -v \
      -o "$tmp/out.cubin" "$src" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    # ptxas prints per entry: "Compiling entry function 'NAME'", then the stack/spill line, then
    # the "Used N registers ... smem" line.
    awk -v arch="$arch" '
      /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2); stack = 0; st = 0; ld = 0 }
      /bytes stack frame/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i; if ($(i+2) == "spill" && $(i+3) == "stores,") st = $i; if ($(i+2) == "spill" && $(i+3) == "loads") ld = $i } }
      /Used [0-9]+ registers/ {
        regs = 0; smem = 0
        for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^registers/) regs = $i; if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i }
        printf "%-8s %-28s %5s %8s %7s %7s %7s\n", arch, name, regs, smem, stack, st, ld
      }' "$log" | tee -a "$tmp/table"
  done
done
spills=$(awk '$6 > 0 || $7 > 0 { n++ } END { print n + 0 }' "$tmp/table")
if [ "$spills" -gt 0 ]; then
  echo "ptxas-report: $spills kernel(s) spill registers" >&2
  exit 1
fi
echo "ptxas-report: no spills"
