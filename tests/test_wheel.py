"""The release wheel `make wheel` leaves in dist/: one abi3 manylinux_2_17 wheel, installed
into fresh virtual environments of the oldest and the newest CPython the package supports
that this machine has (3.10 and 3.13, under ~/.pyenv), and used there the way a user would:
from a folder outside the source tree, with neither PYTHONPATH nor a Rust toolchain on the
path.

`make test` builds the wheel first (`make wheel`); run by hand, these tests fail when
dist/ holds no wheel (and test whatever wheel it holds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
PLATFORM = "manylinux_2_17_x86_64"
PYTHONS = ["3.10", "3.13"]
# The extras `dualsample demo` needs: the reference servers run on aiohttp, a dependency
# of the package itself, so the (empty) server extra is all; installing it shows the
# extra resolves.
DEMO_EXTRAS = "server"


def _cargo_version() -> str:
    """The version in Cargo.toml's [package] table, its first `version =` line."""
    found = re.search(r'^version = "([^"]+)"$', (ROOT / "Cargo.toml").read_text(), re.MULTILINE)
    assert found is not None
    return found.group(1)


def _the_wheel() -> Path:
    wheels = sorted(DIST.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {DIST} (make wheel), found {[w.name for w in wheels]}"
    return wheels[0]


def _interpreter(minor: str) -> Path:
    """The newest patch release of CPython `minor` under ~/.pyenv/versions."""
    found = sorted(
        Path.home().glob(f".pyenv/versions/{minor}.*/bin/python{minor}"),
        key=lambda p: int(p.parent.parent.name.split(".")[2]),
    )
    assert found, f"CPython {minor} is not under ~/.pyenv/versions"
    return found[-1]


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment a user of the wheel has: the venv's bin and the system's, and no
    variable that would point Python at the source tree or a build at Rust."""
    drop = ("PYTHON", "VIRTUAL_ENV", "PYO3_", "CARGO", "RUSTUP", "RUSTC", "MATURIN", "CONDA")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    system = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *system])
    return env


class CleanEnv:
    """A fresh virtual environment with the wheel installed, and a folder to run in."""

    def __init__(self, venv: Path, cwd: Path) -> None:
        self.venv = venv
        self.cwd = cwd
        self.env = _clean_env(venv)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


def _must(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel() -> Path:
    """The wheel in dist/, after a check that it holds every Python file of the package
    that git tracks (a module left out of the wheel would fail only on import)."""
    path = _the_wheel()
    tracked = subprocess.run(
        ["git", "ls-files", "python/dualsample_rs/*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "python/dualsample_rs/__init__.py" in tracked
    with zipfile.ZipFile(path) as zf:
        missing = {rel.removeprefix("python/") for rel in tracked} - set(zf.namelist())
    assert not missing, f"{path.name} lacks {sorted(missing)} (make wheel)"
    return path


@pytest.fixture(scope="module", params=PYTHONS)
def clean(request: pytest.FixtureRequest, wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanEnv]:
    """The wheel (with the demo's extras) installed into a new venv of one CPython."""
    minor = request.param
    base = tmp_path_factory.mktemp(f"wheel-py{minor}")
    venv, cwd = base / "venv", base / "work"
    cwd.mkdir()
    made = subprocess.run([str(_interpreter(minor)), "-m", "venv", str(venv)], capture_output=True, text=True)
    _must(made)
    env = CleanEnv(venv, cwd)
    for tool in ("cargo", "rustc", "maturin"):
        assert shutil.which(tool, path=env.env["PATH"]) is None, f"{tool} is on the clean environment's PATH"
    # Binary wheels only, as on a machine without compilers; the dependencies at the
    # versions requirements-wheel-env.txt pins.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = str(ROOT / "requirements-wheel-env.txt")
    _must(env.run(*pip, "--only-binary=:all:", "-c", constraints, f"{wheel}[{DEMO_EXTRAS}]", timeout=600))
    yield env


def test_dist_holds_one_abi3_manylinux_wheel_and_its_sdist(wheel: Path) -> None:
    version = _cargo_version()
    tags = wheel.name.removesuffix(".whl").split("-")
    assert tags[:2] == ["dualsample_rs", version], wheel.name
    assert tags[2:4] == ["cp310", "abi3"], f"not an abi3 wheel for CPython 3.10 and later: {wheel.name}"
    assert PLATFORM in tags[4].split("."), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = zf.read(f"dualsample_rs-{version}.dist-info/WHEEL").decode()
        metadata = zf.read(f"dualsample_rs-{version}.dist-info/METADATA").decode()
    assert f"Tag: cp310-abi3-{PLATFORM}" in info.splitlines()
    assert [n for n in names if n.endswith(".so")] == ["dualsample_rs/_core.abi3.so"]
    assert f"Version: {version}" in metadata.splitlines()
    assert "Requires-Python: >=3.10" in metadata.splitlines()
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra: ")}
    assert {DEMO_EXTRAS, "parquet", "export", "ray", "report", "slime"} <= extras
    assert [p.name for p in DIST.glob("*.tar.gz")] == [f"dualsample_rs-{version}.tar.gz"]
    # auditwheel: the wheel links against no symbol newer than glibc 2.17 has, and no
    # library outside the manylinux set.
    shown = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(rf'consistent with the following platform tag:\s+"{PLATFORM}"', shown), shown


def test_kernels_match_the_numpy_twin(clean: CleanEnv, request: pytest.FixtureRequest) -> None:
    """Imported from the venv, the compiled step and solve_alpha agree with the reference."""
    out = _must(clean.run(str(clean.venv / "bin" / "python"), "-c", KERNEL_CHECK))
    facts = json.loads(out.splitlines()[-1])
    assert facts["python"] == request.node.callspec.params["clean"]
    assert facts["core"].startswith(str(clean.venv)) and facts["core"].endswith("_core.abi3.so"), facts
    assert not [p for p in facts["path"] if p.startswith(str(ROOT))], f"the source tree is on sys.path: {facts}"
    assert facts["version"] == facts["metadata"] == _cargo_version()
    assert facts["rows"] == 64


def test_demo_runs(clean: CleanEnv) -> None:
    """`dualsample demo`: two reference servers in subprocesses of the venv's Python, and a
    short generation from q*, with no error."""
    out = _must(clean.run(str(clean.venv / "bin" / "dualsample"), "demo", "--max-tokens", "20", timeout=180))
    summary = [line for line in out.splitlines() if line.startswith("summary: ")]
    assert len(summary) == 1 and " 0 errors" in summary[0], out


def test_version_flag(clean: CleanEnv) -> None:
    """`dualsample --version` prints the version the wheel's metadata and Cargo.toml carry."""
    out = _must(clean.run(str(clean.venv / "bin" / "dualsample"), "--version"))
    assert out.split() == ["dualsample", _cargo_version()]


KERNEL_CHECK = """
import importlib.metadata
import json
import sys

import dualsample_rs as ds
import numpy as np
from dualsample_rs import reference as ref
from dualsample_rs.synthetic import topk_pair

data = topk_pair(64, 20, vocab=4096, seed=7)
cfg = ds.SamplerConfig(method="kl_symmetry", diagnostics=True)
r = ds.step(*data, config=cfg, seed=11, positions=np.arange(64))
e = ref.step(*data, config=cfg, seed=11, positions=np.arange(64))
np.testing.assert_array_equal(r.token_id, e.token_id)
np.testing.assert_allclose(r.alpha, e.alpha, atol=1e-9, rtol=0)
np.testing.assert_allclose(r.logq, e.logq, atol=1e-9, rtol=1e-9)
np.testing.assert_array_equal(r.n_merged, e.n_merged)
_, a, b = ds.merge_topk(*data)
np.testing.assert_allclose(ds.solve_alpha(a, b, tol=1e-10), ref.solve_alpha(a, b, tol=1e-10), atol=1e-9, rtol=0)
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "core": ds._core.__file__,
    "path": sys.path,
    "version": ds.__version__,
    "metadata": importlib.metadata.version("dualsample_rs"),
    "rows": len(r.token_id),
}))
"""
