"""Records stay those stored before the engine was restructured (tests/golden: one fixed
run per dialect and mode): token ids, text and every other field exactly, floats within
`golden.compare.TOLERANCE` (the reference servers' numbers differ in the last bits from
one CPU vendor to another; see tests/golden/compare.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from golden.cases import CASES, HERE, run_case
from golden.compare import TOLERANCE, differences, record_differences


@pytest.mark.parametrize("name", sorted(CASES))
def test_records_equal_the_stored_ones(flavors: dict[str, tuple[str, str]], name: str) -> None:
    flavor, config, call = CASES[name]
    got = asyncio.run(run_case(flavors[flavor], config, call))
    want = (HERE / f"{name}.jsonl").read_bytes()
    assert record_differences(got, want) == []


def test_the_comparison_allows_last_bit_changes_and_nothing_else() -> None:
    stored = json.loads((HERE / "completions-topk.jsonl").read_bytes().splitlines()[0])
    nudged = json.loads(json.dumps(stored))
    nudged["logq"][3] += abs(nudged["logq"][3]) * 4e-16
    nudged["alpha"][2] += TOLERANCE / 2
    assert differences(nudged, stored) == []

    for field, change in [
        ("token_ids", lambda r: r["token_ids"].__setitem__(1, r["token_ids"][1] + 1)),
        ("text", lambda r: r.__setitem__("text", r["text"] + " ")),
        ("alpha", lambda r: r["alpha"].__setitem__(2, r["alpha"][2] + 1e-6)),
        ("logq", lambda r: r["logq"].pop()),
        ("id", lambda r: r.__setitem__("id", float(r["id"]))),
    ]:
        changed = json.loads(json.dumps(stored))
        change(changed)
        assert [d.split(":")[0] for d in differences(changed, stored)][:1] == [
            f".{field}" + ("" if field in ("text", "logq", "id") else f"[{1 if field == 'token_ids' else 2}]")
        ], field
