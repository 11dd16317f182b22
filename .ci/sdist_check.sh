#!/usr/bin/env bash
# Builds the sdist, builds a wheel from it as pip does (CPU-only extension, against the torch of
# PYTHON's environment, --no-build-isolation), installs that wheel into a fresh virtual environment
# that reuses PYTHON's installed packages (torch and the rest) through a .pth file, and imports
# calgan_fast._C there, from outside the source tree.
#   PYTHON=.venv/bin/python bash .ci/sdist_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
WORK="$PWD/build/sdist-check"
rm -rf "$WORK"
mkdir -p "$WORK"
CALGAN_FAST_SKIP_EXT=1 "$PYTHON" setup.py -q sdist -d "$WORK/dist" >"$WORK/sdist.log" 2>&1 \
  || { cat "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/calgan_fast-*.tar.gz)"
echo "sdist: $(basename "$SDIST")"
CALGAN_FAST_SKIP_CUDA_BUILD=1 "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps "$SDIST" -w "$WORK/wheel"
BASE="$("$PYTHON" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')"
"$BASE" -m venv --without-pip "$WORK/venv"
MAIN_SITE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NEW_SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PYTHON" -m pip install -q --no-deps --target "$NEW_SITE" "$WORK"/wheel/calgan_fast-*.whl
echo "$MAIN_SITE" >"$NEW_SITE/zz_reuse_main_env.pth"  # after the fresh site: torch and the rest
cd "$WORK"
"$WORK/venv/bin/python" - "$NEW_SITE" <<'PY'
import os
import sys
import warnings

warnings.simplefilter("error")  # the extension must load: no fallback warning
import torch

import calgan_fast
import calgan_fast._C as ext

site = sys.argv[1]
assert calgan_fast.__file__.startswith(site), f"imported {calgan_fast.__file__}, not the installed wheel"
assert ext.__file__.startswith(site)
x = torch.randn(64, 16)
args = (x, torch.randint(0, 3, (64,)), torch.ones(64), torch.randn(3, 16, 16), torch.randn(3, 2, 16),
        torch.randn(3, 2), torch.randn(3, 2), torch.randn(3))
got = calgan_fast.routed_head(*args, backend="cpu")
want = calgan_fast.routed_head(*args, backend="torch")
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
print("installed from the sdist:", os.path.dirname(calgan_fast.__file__), "|", ext.build_info())
PY
