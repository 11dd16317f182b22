#!/usr/bin/env bash
# Creates a virtual environment, installs the tested torch pins and calgan_fast (editable, with
# its test and benchmark tools), building calgan_fast._C from csrc/, then prints what was built.
#   bash install.sh                     -> ./.venv
#   CALGAN_VENV=/some/env bash install.sh
# Build options (CALGAN_FAST_SKIP_CUDA_BUILD, FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS) are
# passed through to setup.py; see the README.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${CALGAN_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade "pip>=23" "setuptools>=64" wheel ninja pybind11
"${PIP[@]}" install -q -r requirements/torch.txt
# No build isolation: the extension must be built against the torch installed above, and BasicSR
# (the optional trainer integration the tests exercise) builds from source and lists torch and
# cython as build requirements, which build isolation would download into a throwaway environment.
"${PIP[@]}" install -q --no-build-isolation -e ".[dev,triton,basicsr,metrics,analysis]"
"$VENV/bin/python" -m calgan_fast.info
