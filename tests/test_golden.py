"""Records stay byte-identical to those stored before the engine was restructured
(tests/golden: one fixed run per dialect and mode)."""

from __future__ import annotations

import asyncio

import pytest
from golden.cases import CASES, HERE, run_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_records_are_byte_identical_to_the_stored_ones(flavors: dict[str, tuple[str, str]], name: str) -> None:
    flavor, config, call = CASES[name]
    got = asyncio.run(run_case(flavors[flavor], config, call))
    want = (HERE / f"{name}.jsonl").read_bytes()
    assert got.splitlines() == want.splitlines()
    assert got == want
