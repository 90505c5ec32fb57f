#!/usr/bin/env bash
# Install the real SGLang into its own venv for the engine tests (CPU only).
#
#   bash tests/engines/install_sglang.sh      # prints the venv's python on the last line
#
# The venv lives at ${DUALSAMPLE_ENGINES_DIR:-~/.cache/dualsample_rs/engines}/sglang.
# A marker file records a finished install of this exact version; when it is present
# the script does nothing, so it is cheap to call before every engine test run.
# The first install downloads about 11 GB of wheels (a CUDA build of torch, which runs on
# CPU too) and takes about 5 minutes.
set -euo pipefail

SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
ENGINES_DIR="${DUALSAMPLE_ENGINES_DIR:-$HOME/.cache/dualsample_rs/engines}"
VENV="$ENGINES_DIR/sglang"
MARKER="$VENV/.installed-sglang-$SGLANG_VERSION"

if [[ -f "$MARKER" && -x "$VENV/bin/python" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

# A CPython that SGLang supports: 3.12, 3.11 or 3.10, from pyenv when it has one,
# else whatever python3.X is on PATH.
find_python() {
    local v exe root
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for v in 3.12 3.11 3.10; do
        if [[ -d "$root/versions" ]]; then
            exe="$(ls -d "$root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1 || true)"
            if [[ -n "$exe" && -x "$exe" ]]; then
                echo "$exe"
                return 0
            fi
        fi
        if exe="$(command -v "python$v" 2>/dev/null)" && [[ -n "$exe" ]]; then
            # pyenv shims exist for every installed version but fail for the others.
            if "$exe" -c 'import sys' >/dev/null 2>&1; then
                echo "$exe"
                return 0
            fi
        fi
    done
    return 1
}

PYTHON="${SGLANG_PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if ! PYTHON="$(find_python)"; then
        echo "install_sglang.sh: no CPython 3.10-3.12 found (set SGLANG_PYTHON)" >&2
        exit 1
    fi
fi

start=$(date +%s)
echo "install_sglang.sh: installing sglang==$SGLANG_VERSION into $VENV with $PYTHON" >&2
mkdir -p "$ENGINES_DIR"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q "sglang==$SGLANG_VERSION" >&2
# The server must at least import; sgl_kernel itself is replaced at run time by the stub
# in tests/engines/sgl_kernel_stub, since its PyPI build needs a GPU driver.
"$VENV/bin/python" -c 'import sglang, torch, transformers' >&2
elapsed=$(( $(date +%s) - start ))
size="$(du -sh "$VENV" 2>/dev/null | cut -f1)"
echo "sglang==$SGLANG_VERSION installed in ${elapsed}s, $size" > "$MARKER"
echo "install_sglang.sh: done in ${elapsed}s, venv size $size" >&2
echo "$VENV/bin/python"
