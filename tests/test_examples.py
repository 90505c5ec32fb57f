"""Each script in examples/ runs against the reference servers and prints what it says."""

from __future__ import annotations

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
}
# Examples that need servers started their own way (they start them when given no URLs).
OWN_SERVERS = {"speculation.py"}


@pytest.mark.parametrize("script", sorted(EXPECTED))
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
