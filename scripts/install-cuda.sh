#!/usr/bin/env bash
# Idempotently installs the pinned CUDA 13.0 compiler set (nvcc, ptxas; cuobjdump 13.2), the CUDA
# libraries a `cuda` build links against, and libclang for bindgen, all from PyPI, into a venv
# under $HOME/.cache/qlora/. Also generates a stub libcuda.so (every cu* entry point returns
# CUDA_ERROR_STUB_LIBRARY) so `cuda` binaries link and run on machines without a driver.
# Prints shell `export` lines to eval:  eval "$(bash scripts/install-cuda.sh)"
set -euo pipefail

root="${QLORA_CACHE:-$HOME/.cache/qlora}"
venv="$root/cuda-venv"
stamp="$venv/.qlora-cuda-13.0-v1"
pkgs=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35
  libclang==18.1.1
)

if [ ! -f "$stamp" ]; then
  mkdir -p "$root"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pkgs[@]}" >&2
  touch "$stamp"
fi

# The disassembler for scripts/kernel-report.sh (cuobjdump -sass runs nvdisasm): PyPI has no 13.0
# build of either, and 13.2 reads 13.0 cubins. A stamp of its own, so venvs made before it was
# added gain it without reinstalling the pinned set above.
disasm=(nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86)
disasm_stamp="$venv/.qlora-disasm-13.2.86"
if [ ! -f "$disasm_stamp" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${disasm[@]}" >&2
  touch "$disasm_stamp"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda_home="$site/nvidia/cu13"
libclang_dir="$site/clang/native"
[ -x "$cuda_home/bin/nvcc" ] || { echo "install-cuda.sh: nvcc missing under $cuda_home" >&2; exit 1; }

# The PyPI wheels ship versioned sonames only; the linker wants the unversioned names.
libdir="$cuda_home/lib"
for lib in cudart cublas cublasLt curand nvrtc; do
  if [ ! -e "$libdir/lib$lib.so" ]; then
    real=$(ls "$libdir"/lib$lib.so.* 2>/dev/null | sort | head -n 1 || true)
    [ -n "$real" ] && ln -sf "$(basename "$real")" "$libdir/lib$lib.so"
  fi
done
if [ ! -e "$libclang_dir/libclang.so" ] && ls "$libclang_dir"/libclang*.so* >/dev/null 2>&1; then
  ln -sf "$(basename "$(ls "$libclang_dir"/libclang*.so* | head -n 1)")" "$libclang_dir/libclang.so"
fi

# Stub driver: one function per cu* symbol declared in cuda.h, each returning 34.
stubdir="$root/stub"
if [ ! -f "$stubdir/libcuda.so.1" ] || [ "$cuda_home/include/cuda.h" -nt "$stubdir/libcuda.so.1" ]; then
  mkdir -p "$stubdir"
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cuda_home/include/cuda.h" | sort -u \
    | awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$stubdir/stub.c"
  cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stubdir/libcuda.so.1" "$stubdir/stub.c"
  ln -sf libcuda.so.1 "$stubdir/libcuda.so"
fi

echo "export CUDA_HOME='$cuda_home'"
echo "export PATH='$cuda_home/bin':\"\$PATH\""
echo "export LIBCLANG_PATH='$libclang_dir'"
echo "export QLORA_CUDA_STUB='$stubdir'"
echo "export LIBRARY_PATH='$libdir:$stubdir':\"\${LIBRARY_PATH:-}\""
echo "export LD_LIBRARY_PATH='$libdir:$stubdir':\"\${LD_LIBRARY_PATH:-}\""
