"""Where the test engines and the tiny test models live (outside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

_CACHE = Path.home() / ".cache" / "dualsample_rs"

ENGINES_DIR = Path(os.environ.get("DUALSAMPLE_ENGINES_DIR", _CACHE / "engines"))
MODELS_DIR = Path(os.environ.get("DUALSAMPLE_MODELS_DIR", _CACHE / "models"))

VLLM_VENV = ENGINES_DIR / "vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
