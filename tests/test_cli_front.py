"""What `dualsample --help` and `dualsample --version` show a user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dualsample_rs.cli import main

CARGO = Path(__file__).resolve().parents[1] / "Cargo.toml"


def test_version_is_the_crates(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = re.search(r'^version = "([^"]+)"$', CARGO.read_text(), re.MULTILINE)
    assert version is not None
    assert capsys.readouterr().out.strip() == f"dualsample {version[1]}"


def test_help_opens_with_what_the_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    opening = out.split("\n\n")[1]
    assert opening.startswith("Generate training data by sampling token by token from q*")
    for sub in ("generate", "serve", "demo", "export", "report"):
        assert sub in out.split("\n\n")[0]
