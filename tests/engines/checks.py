"""Runs of the package against real engines, and the checks every engine test makes of
their records against the engines' own answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator, GenerationOutput

from . import rebuild

QUESTIONS = ["Why is the sky blue?", "What is water made of?", "Why does ice float?", "What makes thunder?"]
PLAIN = [f"Question: {q}\nAnswer:" for q in QUESTIONS]


@dataclass
class Engine:
    """One engine's pair of servers, as the checks need them."""

    kind: str  # "vllm" or "sglang"
    theta: str
    teacher: str
    theta_model: str
    teacher_model: str
    #: the servers' log files, where known
    logs: tuple[str, ...] = ()

    def topk(self, which: str, k: int) -> Callable[[list[int]], rebuild.TopK]:
        url, model = (self.theta, self.theta_model) if which == "theta" else (self.teacher, self.teacher_model)
        get = rebuild.vllm_topk if self.kind == "vllm" else rebuild.sglang_topk
        return lambda ids: get(url, model, ids, k)

    def prompt_logprobs(self, which: str, ids: list[int], start: int) -> list[float]:
        url, model = (self.theta, self.theta_model) if which == "theta" else (self.teacher, self.teacher_model)
        get = rebuild.vllm_prompt_logprobs if self.kind == "vllm" else rebuild.sglang_prompt_logprobs
        return get(url, model, ids, start)

    def detokenize(self, ids: list[int]) -> str:
        r = httpx.post(self.theta + "/detokenize", json={"tokens": ids, "model": self.theta_model}, timeout=30)
        r.raise_for_status()
        data = r.json()
        return str(data["prompt"] if "prompt" in data else data["text"])


def run(
    theta: str | tuple[str, ...],
    teacher: str | tuple[str, ...],
    prompts: list[Any] = PLAIN,
    teacher_prompts: list[Any] | None = None,
    max_tokens: int = 16,
    **config: Any,
) -> tuple[list[GenerationOutput], dict[str, Any], DualVLLMCoordinator]:
    """Generate with the package; teacher prompts default to the questions in the
    teacher's chat template."""

    async def go() -> tuple[list[GenerationOutput], dict[str, Any], DualVLLMCoordinator]:
        cfg = CoordinatorConfig(theta_url=theta, t_url=teacher, seed=7, **config)
        async with DualVLLMCoordinator(cfg) as coord:
            chat = teacher_prompts is None
            outs = await coord.generate_batch_dual_prompts(
                prompts, QUESTIONS[: len(prompts)] if chat else teacher_prompts, max_tokens,
                show_progress=False, teacher_chat=chat,
            )  # fmt: skip
            return outs, coord.get_statistics(), coord

    return asyncio.run(go())


def tokenize(url: str, model: str, text: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
    body: dict[str, Any] = {"model": model}
    if messages is not None:
        body |= {"messages": messages, "add_generation_prompt": True, "add_special_tokens": False}
    else:
        body |= {"prompt": text, "add_special_tokens": True}
    r = httpx.post(url + "/tokenize", json=body, timeout=30)
    r.raise_for_status()
    return [int(t) for t in r.json()["tokens"]]


def check_records(
    engine: Engine,
    outs: list[GenerationOutput],
    stats: dict[str, Any],
    stop_ids: tuple[int, ...],
    *,
    exact: bool = False,
    rescored: bool = False,
    rebuilt: bool = False,
    top_k: int = 20,
    tol_exact: float = 1e-6,
) -> None:
    """What every record must be, against the engine's own answers."""
    assert stats["errors"] == 0, [o.error for o in outs if o.error]
    for i, out in enumerate(outs):
        ids = out.token_ids
        assert ids and out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            assert ids[-1] in stop_ids
        text_ids = ids[:-1] if out.finish_reason == "stop" else ids
        assert out.generated_text == engine.detokenize(text_ids)
        p_theta = tokenize(engine.theta, engine.theta_model, text=PLAIN[i])
        p_t = tokenize(engine.teacher, engine.teacher_model, messages=[{"role": "user", "content": QUESTIONS[i]}])
        if exact or rescored:
            want_theta = engine.prompt_logprobs("theta", p_theta + ids, len(p_theta))
            want_t = engine.prompt_logprobs("t", p_t + ids, len(p_t))
            got = (out.logp_theta, out.logp_t) if exact else (out.logp_theta_exact, out.logp_t_exact)
            assert got[0] is not None and got[1] is not None
            for g, w in ((got[0], want_theta), (got[1], want_t)):
                assert max(abs(a - b) for a, b in zip(g, w, strict=True)) < tol_exact, (g, w)
        if exact:
            assert all(out.observed_theta) and all(out.observed_t)
        if rebuilt:
            rebuild.check_record(
                ids, p_theta, p_t, out.alpha_history, out.logq, out.logp_theta, out.logp_t,
                engine.topk("theta", top_k), engine.topk("t", top_k), tol=1e-4,
            )  # fmt: skip


def run_mode(
    engine: Engine, dialect: str, mode: str, stop_ids: tuple[int, ...], tol_exact: float = 1e-6
) -> DualVLLMCoordinator:
    """A run in `mode` (``topk``, ``exact`` or ``rescore``) checked against the engine;
    ``topk`` runs are rebuilt position by position unless the dialect is ``auto``."""
    options: dict[str, Any] = {"dialect": dialect}
    if mode == "exact":
        options["scoring"] = "exact"
    if mode == "rescore":
        options["rescore"] = True
    outs, stats, coord = run(engine.theta, engine.teacher, **options)
    check_records(
        engine, outs, stats, stop_ids, exact=mode == "exact", rescored=mode == "rescore",
        rebuilt=mode == "topk" and dialect != "auto", tol_exact=tol_exact,
    )  # fmt: skip
    return coord


def check_saved_topk(engine: Engine, outs: list[GenerationOutput], n: int, top_k: int, tol: float = 1e-4) -> None:
    """The records' saved top ids (``save_topk`` n, both models) against what the engine
    lists itself at every generated position, asked one position at a time."""
    for i, out in enumerate(outs):
        p_theta = tokenize(engine.theta, engine.theta_model, text=PLAIN[i])
        p_t = tokenize(engine.teacher, engine.teacher_model, messages=[{"role": "user", "content": QUESTIONS[i]}])
        saved = (
            ("t", p_t, out.topk_ids_t, out.topk_logp_t),
            ("theta", p_theta, out.topk_ids_theta, out.topk_logp_theta),
        )
        for which, prompt, ids_saved, logp_saved in saved:
            assert ids_saved is not None and logp_saved is not None
            assert len(ids_saved) == len(out.token_ids) == len(logp_saved)
            listed = engine.topk(which, top_k)
            for pos in range(len(out.token_ids)):
                ids, logp = listed(prompt + out.token_ids[:pos])
                ranked = sorted(zip(logp, ids, strict=True), key=lambda e: -e[0])[:n]
                want_logp = [lp for lp, _ in ranked]
                assert len(logp_saved[pos]) == len(want_logp)
                assert max(abs(a - b) for a, b in zip(logp_saved[pos], want_logp, strict=True)) < tol
                # The same ids, but where two values tie at the last kept place.
                edge = want_logp[-1]
                firm = {t for lp, t in ranked if lp > edge + tol}
                assert firm <= set(ids_saved[pos]), (which, pos, ids_saved[pos], ranked)


def check_several_teachers(engine: Engine, dialect: str) -> int:
    """Two named teachers on the engine: its teacher (in its chat template) and its base
    model as a second teacher (plain). Records routed to each are the records a run with
    that teacher alone gives (on SGLang, the same tokens); a 0.5/0.5 mixture is rebuilt
    position by position from the engine's own lists mixed by the numpy twin. Returns the
    positions rebuilt."""
    import numpy as np
    from dualsample_rs import reference
    from dualsample_rs.config.coordinator import TeacherSettings
    from dualsample_rs.engine.sequence import WorkItem, stable_key

    teachers = {
        "chat": TeacherSettings(engine.teacher, chat=True),
        "plain": TeacherSettings(engine.theta),
    }
    route = ["chat", "plain", "plain", "chat"]

    def items(mix: dict[str, float] | None = None) -> list[WorkItem]:
        return [WorkItem(stable_key(i), PLAIN[i], QUESTIONS[i], i, teacher=None if mix else route[i], mix=mix)
                for i in range(len(route))]  # fmt: skip

    def generate(named: dict[str, TeacherSettings], work: list[WorkItem]) -> dict[Any, dict[str, Any]]:
        async def go() -> dict[Any, dict[str, Any]]:
            cfg = CoordinatorConfig(theta_url=engine.theta, teachers=named, dialect=dialect, seed=7)
            async with DualVLLMCoordinator(cfg) as coord:
                return {out.id: out.to_record() async for _, out in coord.iter_generate(work, 12, show_progress=False)}

        return asyncio.run(go())

    both = generate(teachers, items())
    for name in teachers:
        alone = generate({name: teachers[name]}, [i for i in items() if i.teacher == name])
        for key, record in alone.items():
            if engine.kind == "vllm":
                assert both[key] == record, (name, key)
                continue
            # SGLang's numbers move with the batch it forms (a run with two teachers sends
            # the base more at once): the same tokens, the numbers within 1e-4.
            assert both[key]["token_ids"] == record["token_ids"], (name, key)
            for field in ("alpha", "logq", "logp_theta", "logp_t"):
                assert max(abs(a - b) for a, b in zip(both[key][field], record[field], strict=True)) < 1e-4
    assert all(r["error"] is None for r in both.values())

    mixed = generate(teachers, items({"chat": 0.5, "plain": 0.5}))
    prompts = {
        "chat": [tokenize(engine.teacher, engine.teacher_model, messages=[{"role": "user", "content": q}])
                 for q in QUESTIONS],
        "plain": [tokenize(engine.theta, engine.theta_model, text=q) for q in QUESTIONS],
    }  # fmt: skip
    listed = {"chat": engine.topk("t", 20), "plain": engine.topk("theta", 20)}
    checked = 0
    for i, record in mixed.items():
        assert record["error"] is None and record["teachers"] == {"chat": 0.5, "plain": 0.5}
        ids = record["token_ids"]
        p_theta = tokenize(engine.theta, engine.theta_model, text=PLAIN[i])

        def mixed_topk(
            context: list[int], i: int = i, ids: list[int] = ids, record: dict[str, Any] = record
        ) -> rebuild.TopK:
            done = context[len(prompts["chat"][i]) :]  # the generated part, after the chat prompt
            tops = [listed[name](prompts[name][i] + done) for name in ("chat", "plain")]
            for name, (t_ids, t_lp) in zip(("chat", "plain"), tops, strict=True):
                pos = len(done)
                if ids[pos] in t_ids:  # each teacher's value of the token is the engine's own
                    got = record["logp_teachers"][name][pos]
                    assert abs(got - t_lp[t_ids.index(ids[pos])]) < 1e-4, (name, pos)
            m_ids, m_lp = reference.mix_teachers([np.array([t[0]]) for t in tops], [np.array([t[1]]) for t in tops],
                                                 [0.5, 0.5])  # fmt: skip
            keep = m_ids[0] >= 0
            return m_ids[0][keep].tolist(), m_lp[0][keep].tolist()

        checked += rebuild.check_record(
            ids, p_theta, prompts["chat"][i], record["alpha"], record["logq"], record["logp_theta"], record["logp_t"],
            engine.topk("theta", 20), mixed_topk, tol=1e-4,
        )  # fmt: skip
    return checked
