#!/usr/bin/env bash
# Installs fastprune, its dependencies and its dev tools into the current Python environment, and
# builds the native extension (C++ always; CUDA too when nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first: the extension compiles against the installed torch, so the package is built without
# build isolation (an isolated build would download a second torch).
"$PYTHON" -m pip install --quiet "torch>=2.11" "setuptools>=64" wheel ninja
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[dev]"
"$PYTHON" -m fastprune.cli info
