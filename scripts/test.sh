#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite. Without a GPU, Triton kernels run under
# the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); GPU tests are skipped.
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
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
