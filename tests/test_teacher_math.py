"""The second reference teacher, ``teacher-math``: it serves in both flavors, shares the
tokenizer and special tokens of ``base`` and ``teacher`` (the handshake takes it as a
teacher for ``base``), learnt clearly different text, and a coordinator runs with it
in every dialect."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from dualsample_rs import DualVLLMCoordinator, GenerationOutput
from dualsample_rs.engine.handshake import agree
from dualsample_rs.server import running_server
from dualsample_rs.server.cli import MODELS
from dualsample_rs.server.corpus import chat
from dualsample_rs.server.model import PRESETS
from support import PLAIN, pair_config, run_coordinator

DIALECTS = ("vllm-completions", "vllm-generate", "sglang")
MATH = [
    "What is 12 + 7?",
    "Ana has 5 apples and gets 8 more. How many apples does Ana have now?",
    "There are 4 bags with 6 marbles in each bag. How many marbles are there in all?",
    "Ben shares 20 cookies equally among 4 friends. How many cookies does each friend get?",
    "What is 9 x 3?",
    "Iris had 30 stamps and gave 12 away. How many stamps are left?",
    "What is 45 - 18?",
    "Hugo reads 5 pages a day for 3 days, then 4 pages more. How many pages is that in all?",
]
MATH_CHAT = [chat([{"role": "user", "content": q}], True) for q in MATH]
# (question, a reply in the style of its domain): the distributions are compared at the
# generation prompt and along each reply, where the two teachers' training text differs.
CONVERSATIONS = [
    ("Why is the sky blue?", "The sky is blue because air scatters blue light more than red light."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What is 12 + 7?", "12 + 7 = 19, so the answer is 19."),
    (MATH[1], "Ana starts with 5 apples and gets 8 more: 5 + 8 = 13, so the answer is 13."),
]
# Mean KL (nats) between the two teachers over those positions, in either direction: about
# 7 in both (against 1 to 2 between teacher and base); the bound leaves a wide margin.
MIN_MEAN_KL = 2.0


@pytest.fixture(scope="module")
def math_teacher() -> Iterator[dict[str, str]]:
    """``teacher-math`` per flavor (the vLLM one with the generate route and no logprob cap)."""
    with (
        running_server("teacher-math", enable_scale_out=True, max_logprobs=-1) as vllm,
        running_server("teacher-math", flavor="sglang") as sglang,
    ):
        yield {"vllm": vllm, "sglang": sglang}


def _flavor(dialect: str) -> str:
    return "sglang" if dialect == "sglang" else "vllm"


def _pair(flavors: dict[str, tuple[str, str]], math_teacher: dict[str, str], dialect: str) -> tuple[str, str]:
    """(base, teacher-math) URLs in the flavor that speaks `dialect`."""
    return flavors[_flavor(dialect)][0], math_teacher[_flavor(dialect)]


def _tokens(url: str, text: str) -> list[int]:
    body = {"prompt": text, "add_special_tokens": False}
    return list(httpx.post(url + "/tokenize", json=body, timeout=30).json()["tokens"])


def _distributions(url: str, contexts: list[list[int]]) -> np.ndarray:
    """The server's whole next-token log distribution after each context, in one request."""
    body = {"prompt": contexts, "max_tokens": 1, "logprobs": -1, "temperature": 0, "return_tokens_as_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = []
    for choice in r.json()["choices"]:
        top = choice["logprobs"]["top_logprobs"][0]
        row = np.full(len(top), -np.inf)
        for key, value in top.items():
            row[int(key.removeprefix("token_id:"))] = value
        out.append(row)
    return np.array(out)


def _records(outs: list[GenerationOutput]) -> list[dict]:
    return [o.to_record() for o in outs]


def test_the_command_line_offers_every_preset() -> None:
    assert "teacher-math" in PRESETS and sorted(MODELS) == sorted(PRESETS)


def test_serves_in_both_flavors_and_answers_in_the_chat_template(math_teacher: dict[str, str]) -> None:
    card = httpx.get(math_teacher["vllm"] + "/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == "dualsample-teacher-math"
    info = httpx.get(math_teacher["sglang"] + "/get_model_info", timeout=30).json()
    assert info["model_path"] == "dualsample-teacher-math"
    # greedy on a chat prompt: a worked answer that ends the turn as `teacher`'s do
    ids = httpx.post(math_teacher["vllm"] + "/tokenize", json={"messages": [{"role": "user", "content": MATH[0]}]},
                     timeout=30).json()["tokens"]  # fmt: skip
    body = {"prompt": ids, "max_tokens": 200, "temperature": 0, "skip_special_tokens": False}
    c = httpx.post(math_teacher["vllm"] + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    assert c["finish_reason"] == "stop"
    assert "the answer is" in c["text"] and c["text"].endswith("<|im_end|>\n<|endoftext|>")


def test_tokenises_like_base_and_teacher(urls: tuple[str, str], math_teacher: dict[str, str]) -> None:
    texts = [chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": MATH[1]}], True),
             "Café 東京 ☕ 3 x 4 = 12.<|endoftext|>"]  # fmt: skip
    for text in texts:
        want = _tokens(urls[0], text)
        assert _tokens(urls[1], text) == want
        assert _tokens(math_teacher["vllm"], text) == want


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_handshake_takes_it_as_a_teacher_for_base(
    flavors: dict[str, tuple[str, str]], math_teacher: dict[str, str], dialect: str
) -> None:
    def start(urls: tuple[str, str]) -> DualVLLMCoordinator:
        return run_coordinator(pair_config(urls, dialect=dialect), PLAIN[:1], MATH_CHAT[:1], max_tokens=2).coordinator

    coord = start(_pair(flavors, math_teacher, dialect))
    assert coord.info is not None
    base, teacher = coord.info
    agree(base, teacher)  # what start-up checked: it did not refuse the pair
    assert teacher.model == "dualsample-teacher-math" and teacher.dialect == dialect
    assert teacher.probe_ids == base.probe_ids and teacher.special_ids == base.special_ids
    assert teacher.vocab_size == base.vocab_size == 259
    # and start-up settles what it settles with `teacher`
    usual = start(flavors[_flavor(dialect)])
    assert usual.info is not None and usual.info[1].special_ids == teacher.special_ids
    assert (coord.stop_ids, coord.exclude_ids) == (usual.stop_ids, usual.exclude_ids)


def test_next_token_distributions_differ_clearly_from_teacher(math_teacher: dict[str, str]) -> None:
    contexts = []
    for question, reply in CONVERSATIONS:
        prompt = _tokens(math_teacher["vllm"], chat([{"role": "user", "content": question}], True))
        answer = _tokens(math_teacher["vllm"], reply + "<|im_end|>")
        contexts += [prompt + answer[:i] for i in range(0, len(answer) + 1, 3)]
    with running_server("teacher", max_logprobs=-1) as url:
        teacher = _distributions(url, contexts)
    math = _distributions(math_teacher["vllm"], contexts)
    assert teacher.shape == math.shape == (len(contexts), 259)
    np.testing.assert_allclose(np.exp(math).sum(axis=1), 1.0, rtol=0, atol=1e-9)
    kl_teacher_math = np.sum(np.exp(teacher) * (teacher - math), axis=1)
    kl_math_teacher = np.sum(np.exp(math) * (math - teacher), axis=1)
    assert kl_teacher_math.mean() > MIN_MEAN_KL and kl_math_teacher.mean() > MIN_MEAN_KL
    assert np.all(kl_teacher_math >= -1e-9) and np.all(kl_math_teacher >= -1e-9)


def test_a_run_with_base_gives_the_same_records_in_every_dialect(
    flavors: dict[str, tuple[str, str]], math_teacher: dict[str, str]
) -> None:
    runs = {}
    for dialect in DIALECTS:
        config = pair_config(_pair(flavors, math_teacher, dialect), seed=13, dialect=dialect, max_batch_size=3)
        outs = run_coordinator(config, PLAIN, MATH_CHAT, max_tokens=24).outputs
        assert all(o.error is None for o in outs) and len(outs) == len(PLAIN)
        assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in outs)
        runs[dialect] = _records(outs)
    assert runs["vllm-completions"] == runs["vllm-generate"] == runs["sglang"]


def test_the_same_seed_gives_the_same_records(
    flavors: dict[str, tuple[str, str]], math_teacher: dict[str, str]
) -> None:
    urls = _pair(flavors, math_teacher, "vllm-completions")

    def records(seed: int, teacher: str | None = None) -> list[dict]:
        pair = urls if teacher is None else (urls[0], teacher)
        return _records(run_coordinator(pair_config(pair, seed=seed), PLAIN, MATH_CHAT, max_tokens=24).outputs)

    first = records(7)
    assert records(7) == first
    assert records(8) != first
    # the teacher matters: `teacher` in its place, with the same seed, samples otherwise
    assert records(7, flavors["vllm"][1]) != first
