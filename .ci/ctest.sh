#!/usr/bin/env bash
# Configure, build (CPU only) and run the C++ tests of csrc/ against the libtorch of PYTHON's torch.
#   PYTHON=path/to/python bash .ci/ctest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
BUILD_DIR="${CALGAN_CMAKE_BUILD_DIR:-build/cmake}"
PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
ABI="$("$PYTHON" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')"
if ! command -v cmake >/dev/null 2>&1; then
  echo "calgan_fast: cmake not found; install it (e.g. pip install cmake) to run the C++ tests" >&2
  exit 1
fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_PREFIX_PATH="$PREFIX" -DCALGAN_FAST_CMAKE_CUDA=OFF \
  -DCALGAN_TORCH_CXX11_ABI="$ABI"
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD_DIR" --output-on-failure
