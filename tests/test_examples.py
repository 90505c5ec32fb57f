"""Each script in examples/ runs against the reference servers and prints what it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {
    "dual_prompts.py": "mean alpha",
    "support_constraint.py": "constraint on : ",
    "first_token.py": "forcing off",
    "everything.py": "success_rate",
    "one_call.py": "->",
    "speculation.py": "tokens per round",
    "export_trainers.py": "axolotl-kd refused",
    "several_teachers.py": "per teacher: chat=0.5,math=0.5",
}
# Examples that need servers started their own way (they start them when given no URLs):
# slow, for the servers they start and the rounds they run.
OWN_SERVERS = {"speculation.py", "several_teachers.py"}


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.slow) if s in OWN_SERVERS else s for s in sorted(EXPECTED)]
)
def test_example_runs(urls: tuple[str, str], script: str) -> None:
    given = [] if script in OWN_SERVERS else ["--theta-url", urls[0], "--t-url", urls[1]]
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *given],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLES,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert EXPECTED[script] in p.stdout and len(p.stdout.splitlines()) >= 2, p.stdout


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(EXPECTED)


README = EXAMPLES.parent / "README.md"
README_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


# A block that uses Ray starts a cluster: slow, like tests/test_ray.py.
_README_CASES = [
    pytest.param(i, marks=pytest.mark.slow) if "import ray" in block else i for i, block in enumerate(README_BLOCKS)
]


@pytest.mark.parametrize("index", _README_CASES)
def test_readme_python_blocks_run_as_written(
    urls: tuple[str, str], math_teachers: dict[str, str], tmp_path: Path, index: int
) -> None:
    """Each Python block of the README, run as it is written, with only the servers'
    addresses pointed at the reference servers (in a folder with a prompts file):
    localhost:8000 the base, 8001 the teacher, 8002 the second teacher."""
    code = README_BLOCKS[index].replace("http://localhost:8000", urls[0]).replace("http://localhost:8001", urls[1])
    code = code.replace("http://localhost:8002", math_teachers["vllm"])
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": f"Question: {q}\nAnswer:", "teacher_prompt": q}) + "\n"
                for i, q in enumerate(["Why is the sky blue?", "What causes wind?"]))
    )  # fmt: skip
    (tmp_path / "block.py").write_text(code)
    p = subprocess.run([sys.executable, "block.py"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    if "write_parquet" in code:
        assert list((tmp_path / "samples").glob("*.parquet"))
    else:
        assert p.stdout.strip(), p.stderr[-3000:]
