"""The package's shape: layers that import downward (the contracts in pyproject.toml, run
by import-linter), no private name used outside its module, and a small package root."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "dualsample_rs"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(python_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=python_path,
        env={"PYTHONPATH": str(python_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_hold() -> None:
    run = lint_imports(PACKAGE.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("io/record.py", "from ..engine import sequence"),  # io reaching up into the engine
        ("backends/http.py", "from ..config import coordinator"),  # the transport reading settings
        ("engine/round.py", "from ..cli import jobs"),  # the engine reaching the command line
    ],
)
def test_an_upward_import_breaks_them(tmp_path: Path, module: str, planted: str) -> None:
    copy = tmp_path / "python"
    shutil.copytree(PACKAGE, copy / "dualsample_rs", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    target = copy / "dualsample_rs" / module
    target.write_text(target.read_text() + f"\n{planted}  # noqa\n")
    run = lint_imports(copy)
    assert run.returncode != 0
    assert "0 kept, 1 broken" in run.stdout
    assert module.replace("/", ".").removesuffix(".py") in run.stdout


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(p.read_text())
        for p in PACKAGE.rglob("*.py")
    }


def _imported(name: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``from X import ...`` in module `name` reads from."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def crossings(modules: dict[str, ast.Module]) -> list[str]:
    """Private names imported from another module, and anything but the compiled `_core`
    (or the version it carries) imported from the package root."""
    found = []
    for name, tree in modules.items():
        is_package = name.endswith("__init__")
        here = name.removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _imported(here, node, is_package)
            if not source.startswith("dualsample_rs"):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}" in modules or f"{source}.{alias.name}.__init__" in modules
                if submodule or alias.name == "_core":
                    continue
                if source == "dualsample_rs" and here != "dualsample_rs":
                    found.append(f"{name}: {alias.name} from the package root")
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name}: {source}.{alias.name}")
    return found


def test_no_private_name_crosses_modules() -> None:
    assert crossings(_modules()) == []


def test_a_crossing_private_name_is_found() -> None:
    modules = _modules()
    modules["dualsample_rs.engine.round"].body.insert(0, ast.parse("from ..io.output_file import _secret").body[0])
    modules["dualsample_rs.io.record"].body.insert(0, ast.parse("from .. import CoordinatorConfig").body[0])
    assert crossings(modules) == [
        "dualsample_rs.engine.round: dualsample_rs.io.output_file._secret",
        "dualsample_rs.io.record: CoordinatorConfig from the package root",
    ]


def test_the_package_root_is_small() -> None:
    """What a user imports by path lives at the root; the rest is in subpackages."""
    modules = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.name.startswith("_core"))
    compiled = [m for m in modules if m.startswith("_core") and not m.endswith(".pyi")]
    python = [m for m in modules if m.endswith(".py")]
    assert len(python) + min(len(compiled), 1) <= 8, python
