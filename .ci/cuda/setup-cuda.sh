#!/usr/bin/env bash
# Build-host setup for `--features cuda` on a machine with no GPU and no CUDA toolkit:
# CUDA 13.0 nvcc + link libraries from PyPI wheels, unversioned .so links, and a link-time libcuda stub.
# Usage: bash .ci/cuda/setup-cuda.sh [PREFIX]   (default PREFIX=/tmp/cuda13; run `cargo fetch` first)
# Then:  source .ci/cuda/env.sh [PREFIX]; cargo build --release -p engine --features cuda
set -euo pipefail
P=${1:-/tmp/cuda13}; mkdir -p "$P"; cd "$P"
[ -x venv/bin/pip ] || python3 -m venv venv
./venv/bin/pip install -q --no-cache-dir \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
  nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 nvidia-nccl-cu13==2.27.7
NV=$(ls -d "$P"/venv/lib/python3*/site-packages/nvidia); R=$P/root; mkdir -p "$R/lib" "$P/stub"
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
  ln -sf "$NV/cu13/lib/lib$l" "$R/lib/lib${l%%.so*}.so"; done
ln -sf "$NV/nccl/lib/libnccl.so.2" "$R/lib/libnccl.so"
# libcuda comes with the driver and is in no wheel: a stub (SONAME libcuda.so.1) exporting every cu* symbol
# that cudarc declares, for linking only. Never copy it to the GPU machine.
S=$(ls -d ~/.cargo/registry/src/*/cudarc-0.* 2>/dev/null | sort -V | tail -n 1)
[ -n "$S" ] || { echo "no cudarc source in ~/.cargo/registry: run 'cargo fetch' in the project first" >&2; exit 1; }
grep -rho "pub unsafe fn cu[A-Za-z0-9_]*" "$S/src/driver/sys/" | awk '{print $4}' | sort -u \
  | awk '{print "int "$1"(void){return 999;}"}' > "$P/stub/libcuda_stub.c"
gcc -shared -fPIC -o "$R/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$P/stub/libcuda_stub.c"
echo "ready: source .ci/cuda/env.sh $P"
