"""`save_topk`: each generated position keeps the teacher's (and the base's) most likely
ids with the raw log probabilities the servers gave there."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dualsample_rs import CoordinatorConfig, GenerationOutput
from dualsample_rs.backends import DIALECTS, Context
from dualsample_rs.exceptions import ConfigurationError
from support import PLAIN, pair_config, read_records, run_coordinator, write_input

TOPK_KEYS = ("topk_ids_t", "topk_logp_t", "topk_ids_theta", "topk_logp_theta")


def _run(urls: tuple[str, str], **kw: Any) -> list[GenerationOutput]:
    config = pair_config(urls, seed=4, top_k=6, max_batch_size=3, **kw)
    return run_coordinator(config, PLAIN[:4], max_tokens=12).outputs


async def _server_lists(dialect: str, urls: tuple[str, str], out: GenerationOutput, top_k: int) -> list[Any]:
    """What each server lists at every generated position of `out`, asked afresh one
    position at a time: (teacher top-k, base top-k, base scores of the teacher's ids)."""
    cls = DIALECTS[dialect]
    async with cls(urls[0]) as base, cls(urls[1]) as teacher:
        prompt = await base.tokenize(out.prompt)
        prefixes = [Context([*prompt, *out.token_ids[:i]]) for i in range(len(out.token_ids))]
        t_top, b_top = await teacher.topk(prefixes, top_k), await base.topk(prefixes, top_k)
        return [t_top, b_top, await base.score(prefixes, t_top.ids)]


def _ranked(ids: np.ndarray, logp: np.ndarray, n: int) -> tuple[list[int], list[float]]:
    keep = [(lp, t) for t, lp in zip(ids.tolist(), logp.tolist(), strict=True) if t >= 0]
    keep.sort(key=lambda e: -e[0])
    return [t for _, t in keep[:n]], [lp for lp, _ in keep[:n]]


CASES = [
    ("vllm-completions", {}),
    ("vllm-generate", {"scoring": "exact"}),
    ("sglang", {}),
    ("sglang", {"speculate": 3}),
    ("vllm-generate", {"speculate": 2, "scoring": "exact"}),
]


@pytest.mark.parametrize(("dialect", "options"), CASES)
def test_saved_lists_are_the_servers_own(flavors: dict[str, tuple[str, str]], dialect: str, options: dict) -> None:
    """At every position the saved ids are the server's n most likely there, most likely
    first, with its raw values; the base's are its own list, or with exact scoring its
    values of the teacher's ids. Everything else in the records is unchanged."""
    urls = flavors["sglang" if dialect == "sglang" else "vllm"]
    n = 4
    exact = options.get("scoring") == "exact"
    plain = _run(urls, dialect=dialect, **options)
    outs = _run(urls, dialect=dialect, save_topk=n, save_topk_of="both", **options)
    for o, p in zip(outs, plain, strict=True):
        rec = o.to_record()
        assert {k: v for k, v in rec.items() if k not in TOPK_KEYS} == p.to_record()
        assert all(len(rec[k]) == len(o.token_ids) for k in TOPK_KEYS)
        t_top, b_top, b_scores = asyncio.run(_server_lists(dialect, urls, o, 6))
        for i in range(len(o.token_ids)):
            ids, logp = _ranked(t_top.ids[i], t_top.logp[i], n)
            assert rec["topk_ids_t"][i] == ids
            np.testing.assert_allclose(rec["topk_logp_t"][i], logp, rtol=0, atol=1e-12)
            if exact:
                assert rec["topk_ids_theta"][i] == ids
                by_id = dict(zip(t_top.ids[i].tolist(), b_scores[i].tolist(), strict=True))
                want = [by_id[t] for t in ids]
            else:
                b_ids, want = _ranked(b_top.ids[i], b_top.logp[i], n)
                assert rec["topk_ids_theta"][i] == b_ids
            np.testing.assert_allclose(rec["topk_logp_theta"][i], want, rtol=0, atol=1e-12)


def test_teacher_only_by_default_and_none_without(flavors: dict[str, tuple[str, str]]) -> None:
    urls = flavors["vllm"]
    rec = _run(urls, dialect="vllm-completions", save_topk=2)[0].to_record()
    assert "topk_ids_t" in rec and "topk_ids_theta" not in rec
    assert all(1 <= len(ids) <= 2 for ids in rec["topk_ids_t"])
    assert not set(TOPK_KEYS) & set(_run(urls, dialect="vllm-completions")[0].to_record())


def test_more_than_top_k_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"save_topk: 21 .*top_k=20"):
        CoordinatorConfig(save_topk=21)
    with pytest.raises(ConfigurationError, match="save_topk_of"):
        CoordinatorConfig(save_topk=2, save_topk_of="base")  # type: ignore[arg-type]
    assert CoordinatorConfig(save_topk=5, top_k=5).run.save_topk == 5


def test_cli_flags(flavors: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 3)
    base = [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", flavors["vllm"][0],
            "--t-url", flavors["vllm"][1], "--input", str(inp), "--output", str(out), "--max-tokens", "6",
            "--quiet"]  # fmt: skip
    done = subprocess.run([*base, "--save-topk", "3", "--save-topk-of", "both", "--top-k", "5"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for rec in read_records(out):
        assert all(len(rec[k]) == len(rec["token_ids"]) for k in TOPK_KEYS)
        assert all(len(ids) <= 3 for ids in rec["topk_ids_t"])
    refused = subprocess.run([*base, "--save-topk", "9", "--top-k", "5", "--overwrite"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "save_topk" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert all("topk_ids_t" in rec for rec in read_records(out))  # the file was left as it was
