#!/usr/bin/env bash
# Checks `qlora export` against llama.cpp itself (not part of CI: it downloads and builds
# llama.cpp). Exports the SmolLM2 GGUF (scripts/fetch-smollm2.sh) as f16, q8_0 and q4_k_m, has
# llama.cpp's own `llama-quantize` re-quantize the same file to the same types, and compares the
# two files tensor by tensor (types and bytes, with gguf-py), then runs each of qlora's files in
# llama.cpp (`llama-perplexity` on the first 6000 characters of docs/ARCHITECTURE.md).
#
# llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp), built with
# cmake (pip-installed) into ~/.cache/qlora/llama.cpp; about 10 minutes on 2 cores, once.
# LLAMA_CPP_BIN=DIR uses binaries already built there instead; QLORA_BIN=PATH a qlora binary
# already built (default: a release build). Needs the fixtures venv
# (~/.cache/qlora/fixtures-venv, README "Fixtures") for gguf-py and cmake.
# Measured 2026-12-04 (llama-cpp-python 0.3.36): f16 and q8_0 byte-identical in all 272 tensors;
# q4_k_m the same types for 272, the same bytes for 242 (candle's K-quant quantizers differ).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QLORA_FIXTURES_VENV:-$HOME/.cache/qlora/fixtures-venv}"
py="$venv/bin/python"
cache="$HOME/.cache/qlora/llama.cpp"
bin="${LLAMA_CPP_BIN:-$cache/src/vendor/llama.cpp/build/bin}"
if [ ! -x "$bin/llama-quantize" ]; then
  mkdir -p "$cache"
  "$venv/bin/pip" install --quiet cmake
  # The index's newest sdist (this network's PyPI mirror answers only the unversioned JSON, with
  # URLs relative to files.pythonhosted.org).
  url=$(curl -sf --max-time 30 "https://pypi.org/pypi/llama-cpp-python/json" |
    "$py" -c 'import json, sys
d = json.load(sys.stdin)
u = next(u["url"] for u in d["urls"] if u["packagetype"] == "sdist")
print(u.replace("../../packages/packages/", "https://files.pythonhosted.org/packages/"))
print("llama-cpp-python", d["info"]["version"], file=sys.stderr)')
  curl -sf --max-time 600 -o "$cache/sdist.tar.gz" "$url"
  rm -rf "$cache/src" && mkdir -p "$cache/src"
  tar xzf "$cache/sdist.tar.gz" -C "$cache/src" --strip-components=1
  src="$cache/src/vendor/llama.cpp"
  PATH="$venv/bin:$PATH" cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  PATH="$venv/bin:$PATH" cmake --build "$src/build" -j"$(nproc)" \
    --target llama-quantize llama-perplexity llama-simple >&2
fi

model=$(bash scripts/fetch-smollm2.sh)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
qlora="${QLORA_BIN:-${CARGO_TARGET_DIR:-target}/release/qlora}"
[ -n "${QLORA_BIN:-}" ] || cargo build --release --quiet
head -c 6000 docs/ARCHITECTURE.md > "$out/text.txt"
for t in f16 q8_0 q4_k_m; do
  T=$(echo "$t" | tr a-z A-Z)
  "$qlora" export --model "$model" --gguf "$out/qlora-$t.gguf" --type "$t" | sed -n 1p
  "$bin/llama-quantize" --allow-requantize "$model" "$out/llamacpp-$t.gguf" "$T" 2 > /dev/null 2>&1
  "$py" - "$out/qlora-$t.gguf" "$out/llamacpp-$t.gguf" <<'PY'
import sys
import numpy as np
import gguf
ours, theirs = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in sys.argv[1:3])
assert set(ours) == set(theirs), set(ours) ^ set(theirs)
same_type = [n for n in ours if ours[n].tensor_type == theirs[n].tensor_type]
same_bytes = [n for n in same_type
              if np.array_equal(np.asarray(ours[n].data).view(np.uint8),
                                np.asarray(theirs[n].data).view(np.uint8))]
print(f"  vs llama-quantize: {len(ours)} tensors, same type {len(same_type)}, "
      f"same bytes {len(same_bytes)}")
PY
  "$bin/llama-perplexity" -m "$out/qlora-$t.gguf" -f "$out/text.txt" -c 256 2>&1 |
    grep -E "Final estimate" | sed 's/^.*Final/  llama.cpp perplexity (ctx 256): Final/'
done
