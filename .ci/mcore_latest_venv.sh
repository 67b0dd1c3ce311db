#!/usr/bin/env bash
# Builds (or reuses) .venv-mcore-latest: this project with the newest supported megatron-core
# (0.19.x) on this machine's Python 3.11, for `make test-mcore-latest`; with MCORE_LATEST_VERSION and
# MCORE_LATEST_VENV, another release in another venv (`make test-mcore-018`: 0.18.2 in .venv-mcore-018,
# `make test-mcore-017`: 0.17.1 in .venv-mcore-017).
#
# megatron-core >= 0.17 is published only as cp312+ wheels (Requires-Python >= 3.12).  Its code is
# pure Python that also runs on 3.11, except one pybind11 extension (megatron/core/datasets/helpers_cpp,
# whose helpers.cpp ships in the wheel).  So this script takes the cp312 wheel, rebuilds that
# extension for the venv's Python, retags the wheel for it and installs it with pip
# (--no-deps --ignore-requires-python), replacing the 0.16.1 that constraints.txt pins.  pip stays the
# owner of the files (`pip show megatron-core` reports the version; `pip uninstall` works).
#
# torch: 2.13.0, the CPU build (installed first, so nothing pulls a CUDA build).
# Idempotent: a finished venv (its stamp newer than setup.py, constraints.txt and this script) is left
# as it is; otherwise the venv is reused and the installs redone.  `rm -rf .venv-mcore-latest` rebuilds it.
# PYTHON (python3): the interpreter of the venv; MCORE_LATEST_VERSION (0.19.2): the release to install (any
# release with a cp312 manylinux_2_28 wheel); MCORE_LATEST_VENV (.venv-mcore-latest): the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MCORE_LATEST_VENV:-.venv-mcore-latest}
MCORE=${MCORE_LATEST_VERSION:-0.19.2}
STAMP="$VENV/.installed-megatron-core-$MCORE"
BIN="$VENV/bin"

fresh=1
for f in setup.py constraints.txt .ci/mcore_latest_venv.sh; do
    [[ -f "$STAMP" && ( ! -e "$f" || "$STAMP" -nt "$f" ) ]] || fresh=0
done
if (( fresh )); then
    exit 0
fi
rm -f "$VENV"/.installed-megatron-core-*
[[ -x "$BIN/python" ]] || "$PYTHON" -m venv "$VENV"
"$BIN/python" -m pip install -q --upgrade pip
"$BIN/python" -m pip install -q torch==2.13.0
constraints=()     # the tested versions of everything else (megatron-core's pin is replaced below)
[[ -f constraints.txt ]] && constraints=(-c constraints.txt)
"$BIN/python" -m pip install -q "${constraints[@]}" -e '.[dev]' pybind11 wheel

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --abi cp312 --platform "manylinux_2_28_$(uname -m)" -d "$work" "megatron-core==$MCORE"
"$BIN/python" -m wheel unpack -d "$work/x" "$work"/megatron_core-"$MCORE"-*.whl
root="$work/x/megatron_core-$MCORE"
helpers="$root/megatron/core/datasets"
rm -f "$helpers"/helpers_cpp.*.so
suffix=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# shellcheck disable=SC2046  # word splitting of the -I flags is intended
c++ -O3 -Wall -shared -std=c++17 -fPIC $("$BIN/python" -m pybind11 --includes) \
    "$helpers/helpers.cpp" -o "$helpers/helpers_cpp$suffix"
# retag for this interpreter (cpXY-cpXY-linux_<arch>); `wheel pack` names the file and writes RECORD from it
"$BIN/python" - "$root/megatron_core-$MCORE.dist-info/WHEEL" <<'PY'
import sys, sysconfig
path = sys.argv[1]
py = "cp%d%d" % sys.version_info[:2]
tag = f"Tag: {py}-{py}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")
lines = [line for line in open(path).read().splitlines() if line.strip() and not line.startswith("Tag: ")]
open(path, "w").write("\n".join(lines + [tag]) + "\n")
PY
mkdir -p "$work/out"
"$BIN/python" -m wheel pack -d "$work/out" "$root"
"$BIN/python" -m pip install -q --no-deps --force-reinstall --ignore-requires-python "$work"/out/*.whl
"$BIN/python" -W ignore -c "
import megatron.core, megatron.core.datasets.helpers_cpp
assert megatron.core.__version__.split('+')[0] == '$MCORE', megatron.core.__version__   # (+ a git hash)
print('megatron-core', megatron.core.__version__, 'on Python', __import__('platform').python_version())"
touch "$STAMP"
