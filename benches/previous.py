"""The package as it was at an earlier commit, loaded beside the current one, so that a
bench can put the two side by side in one run.

``make previous`` checks that commit out into ``.bench-previous`` (a git worktree) and
copies the current compiled core into it (the old Python code calls it with the
arguments it had, which the current core still takes); ``make bench`` then points
``DUALSAMPLE_PREVIOUS`` at it. Without it the "previous" cases are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest

NAME = "dualsample_rs_previous"


def load() -> ModuleType | None:
    """The earlier package as the module ``dualsample_rs_previous``, or None."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    path = os.environ.get("DUALSAMPLE_PREVIOUS")
    if not path or not os.path.isfile(os.path.join(path, "__init__.py")):
        return None
    spec = importlib.util.spec_from_file_location(NAME, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module


def require() -> ModuleType:
    module = load()
    if module is None:
        pytest.skip("DUALSAMPLE_PREVIOUS is not set (make previous)")
    return module
