#!/usr/bin/env bash
# Sets up (scripts/setup.sh), runs the ahead-of-time GPU compile check, then the whole test suite.
# Without a GPU, Triton kernels run under the Triton interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1) and the CUDA variants of the tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tell the tests which native kernels the build must have produced, so a failed or skipped CUDA
# build cannot pass unnoticed.
if [ "${FASTPRUNE_BUILD_EXT:-1}" != "0" ]; then
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ]; then
    export FASTPRUNE_EXPECT_EXTENSION="cpp,cuda"
  else
    export FASTPRUNE_EXPECT_EXTENSION="cpp"
  fi
fi
# Ahead-of-time compile of every GPU kernel for sm_90 and sm_80, no GPU needed: prints the table of
# registers, spills and shared memory (also written to bench/results/triton-aot.csv) and fails on a
# compile error, a spill or shared memory over the limit. Triton's interpreter must be off for it.
env -u TRITON_INTERPRET "${PYTHON:-python3}" -m fastprune.kernels.aot --out "${AOT_OUT:-bench/results/triton-aot.csv}"
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
