"""End to end on the BPE presets, whose tokenizer does what real ones do: merges across
the join of two texts, tokens holding part of a multi-byte character, distinct tokens
with the same text."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from dualsample_rs import GenerationOutput
from dualsample_rs.server import running_server
from dualsample_rs.server.corpus import chat
from dualsample_rs.server.model import bpe_tokenizer
from support import pair_config, read_records, run_coordinator, wait_cli

QUESTIONS = [
    "What is Tokyo called in Japanese?", "Where is Zürich?", "What do Greeks call Greece?", "What is π?",
    "What is café au lait?", "How is naïve spelled?", "Why is the sky blue?", "What is water made of?",
]  # fmt: skip
PLAIN = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
CHAT = [chat([{"role": "user", "content": q}], True) for q in QUESTIONS]


@pytest.fixture(scope="module")
def bpe() -> Iterator[dict[str, tuple[str, str]]]:
    with (
        running_server("base-bpe", max_logprobs=-1) as va,
        running_server("teacher-bpe") as vb,
        running_server("base-bpe", flavor="sglang") as sa,
        running_server("teacher-bpe", flavor="sglang") as sb,
    ):
        yield {"vllm": (va, vb), "sglang": (sa, sb)}


def _tokens(url: str, text: str) -> list[int]:
    return httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


def _detok(url: str, ids: list[int]) -> str:
    return httpx.post(url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]


def test_the_tokenizer_behaves_like_a_real_one(bpe: dict[str, tuple[str, str]]) -> None:
    url = bpe["vllm"][0]
    assert _tokens(url, "Hel" + "lo world") != _tokens(url, "Hel") + _tokens(url, "lo world")  # merges across joins
    tokenizer = bpe_tokenizer()
    # merged tokens (two bytes or more) that hold part of a character, as the server has them
    partial = [i for i, b in enumerate(tokenizer.bytes_of) if len(b) > 1 and tokenizer.token_text(i) == ""]
    assert len(partial) >= 5
    assert all("\ufffd" in _detok(url, [i]) for i in partial[:5])
    assert _detok(url, _tokens(url, " 東京 Ελλάδα ☕")) == " 東京 Ελλάδα ☕"
    # distinct tokens with the same text: over the whole vocabulary, text keys collide
    body = {"prompt": "Tokyo is", "max_tokens": 1, "logprobs": -1, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
    keyed = httpx.post(url + "/v1/completions", json={**body, "return_tokens_as_token_ids": True}, timeout=30).json()
    assert len(keyed["choices"][0]["logprobs"]["top_logprobs"][0]) == tokenizer.vocab_size
    assert len(r["choices"][0]["logprobs"]["top_logprobs"][0]) < tokenizer.vocab_size - len(partial) + 1


def _run(urls: tuple[str, str], max_tokens: int = 30, **kw) -> list[GenerationOutput]:
    return run_coordinator(pair_config(urls, **kw), PLAIN, CHAT, max_tokens=max_tokens).outputs


def test_same_records_whatever_concurrency_and_dialect(bpe: dict[str, tuple[str, str]]) -> None:
    runs = [
        [o.to_record() for o in _run(bpe["vllm"], seed=3, max_concurrency=c, max_batch_size=b)]
        for c, b in ((8, 8), (3, 1))
    ]
    runs.append([o.to_record() for o in _run(bpe["sglang"], seed=3, dialect="sglang")])
    assert runs[0] == runs[1] == runs[2]
    assert all(r["finish_reason"] in ("stop", "length") for r in runs[0])


def test_text_is_right_when_the_last_token_splits_a_character(bpe: dict[str, tuple[str, str]]) -> None:
    tokenizer = bpe_tokenizer()  # the servers' own, to know each token's bytes
    split = 0
    for max_tokens in range(1, 13):
        for o in _run(bpe["vllm"], max_tokens=max_tokens, seed=max_tokens):
            ids = o.token_ids[:-1] if o.finish_reason == "stop" else o.token_ids
            data = b"".join(tokenizer.bytes_of[i] for i in ids)
            # the whole sequence decoded at once (a cut character becomes one U+FFFD),
            # not per-token pieces glued together
            assert o.generated_text == data.decode("utf-8", errors="replace")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                split += err.end == len(data)
    assert split > 0  # some records did end inside a character: the case was exercised


def test_exact_scoring_is_exact_on_bpe(bpe: dict[str, tuple[str, str]]) -> None:
    outs = _run(bpe["vllm"], seed=4, scoring="exact", rescore=True)
    for o in outs:
        assert all(o.observed_theta) and all(o.observed_t)
        np.testing.assert_allclose(o.logp_theta, o.logp_theta_exact, rtol=0, atol=1e-12)
        np.testing.assert_allclose(o.logp_t, o.logp_t_exact, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_cli_kill_and_resume_on_bpe(bpe: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    inp, full, part = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    with inp.open("w") as f:
        for i in range(200):
            q = QUESTIONS[i % len(QUESTIONS)]
            f.write(json.dumps({"id": i, "prompt": f"Question: {q}\nAnswer:", "teacher_prompt": q}) + "\n")
    urls = bpe["vllm"]
    cmd = [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
           "--input", str(inp), "--max-tokens", "20", "--seed", "5", "--quiet", "--teacher-chat"]  # fmt: skip
    code, err = wait_cli(subprocess.Popen([*cmd, "--output", str(full)], stderr=subprocess.PIPE, text=True))
    assert code == 0, err
    p = subprocess.Popen([*cmd, "--output", str(part), "--max-concurrency", "2"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.read_text().count("\n") < 10):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    wait_cli(p)
    code, err = wait_cli(subprocess.Popen([*cmd, "--output", str(part), "--resume"], stderr=subprocess.PIPE, text=True))
    assert code == 0, err
    reference = {r["id"]: r for r in read_records(full)}
    got = read_records(part)
    assert sorted(r["id"] for r in got) == sorted(reference) and all(r == reference[r["id"]] for r in got)
