"""Fixed runs whose records must stay the same across refactors of the engine.

`python tests/golden/cases.py [NAME ...]` writes one JSONL file per case (those named,
else every case) from the current code (only when the records are meant to change);
`tests/test_golden.py` compares a fresh run of every case with the stored file
(tests/golden/compare.py says how exactly).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator

HERE = Path(__file__).parent
PROMPTS = [
    "Question: Why is the sky blue?\nAnswer:",
    "Question: What is water made of?\nAnswer:",
    "Question: What causes wind?\nAnswer:",
    "Question: Why does ice float?\nAnswer:",
    "Question: How is bread made?\nAnswer:",
]
TEACHER = [p.split("\n")[0][len("Question: ") :] for p in PROMPTS]

# name -> (flavor of the servers, config keywords, generate keywords)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "completions-topk": ("vllm", {"dialect": "vllm-completions"}, {}),
    "completions-exact-rescore": ("vllm", {"dialect": "vllm-completions", "scoring": "exact", "rescore": True}, {}),
    "completions-sampler": (
        "vllm",
        {
            "dialect": "vllm-completions",
            "alpha_method": "entropy",
            "missing": -12.0,
            "temperature": 0.8,
            "temperature_t": 1.3,
            "constraint_to_target": True,
            "target_top_p": 0.9,
            "force_first_token": False,
        },
        {"return_diagnostics": True, "teacher_chat": True},
    ),
    "completions-stability": (
        "vllm",
        {
            "dialect": "vllm-completions",
            "enable_stability_check": True,
            "stability_threshold_js": 0.05,
            "missing": "drop",
        },
        {},
    ),
    "completions-speculate-recompute": (
        "vllm",
        {"dialect": "vllm-completions", "speculate": 3, "verify_prompt_logprobs": True},
        {},
    ),
    "generate-topk": ("vllm", {"dialect": "vllm-generate"}, {}),
    "generate-exact": ("vllm", {"dialect": "vllm-generate", "scoring": "exact"}, {}),
    "generate-speculate": ("vllm", {"dialect": "vllm-generate", "speculate": 3, "rescore": True}, {}),
    "generate-speculate-exact": ("vllm", {"dialect": "vllm-generate", "speculate": 2, "scoring": "exact"}, {}),
    "generate-speculate-auto": ("vllm", {"dialect": "vllm-generate", "speculate": "auto"}, {}),
    "sglang-topk": ("sglang", {"dialect": "sglang", "alpha_method": "ess_balance"}, {"return_diagnostics": True}),
    "sglang-exact": ("sglang", {"dialect": "sglang", "scoring": "exact", "rescore": True}, {}),
    "sglang-speculate": ("sglang", {"dialect": "sglang", "speculate": 4}, {"teacher_chat": True}),
    "sglang-speculate-exact": ("sglang", {"dialect": "sglang", "speculate": "auto", "scoring": "exact"}, {}),
}


# Fields a speculate="auto" record leaves out of its stored form: which rounds made its
# tokens follows the kinds of round the machine's timings chose (docs/design.md, 3.3).
TIMED = ("round", "drafted")


async def run_case(urls: tuple[str, str], config: dict[str, Any], call: dict[str, Any]) -> bytes:
    """The records of one case, as `dualsample generate` writes them (under
    speculate="auto", without the `TIMED` fields)."""
    cfg = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], seed=5, max_batch_size=2, max_concurrency=4,
                            top_k=8, **config)  # fmt: skip
    async with DualVLLMCoordinator(cfg) as coord:
        call = {"teacher_chat": True, **call}
        outs = await coord.generate_batch_dual_prompts(PROMPTS, TEACHER, max_tokens=20, show_progress=False, **call)
    left_out = TIMED if config.get("speculate") == "auto" else ()
    records = [{k: v for k, v in o.to_record().items() if k not in left_out} for o in outs]
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records)


def main(names: list[str]) -> None:
    """Write the cases named (every case when none is)."""
    from dualsample_rs.server import running_flavors

    with running_flavors() as flavors:
        for name, (flavor, config, call) in CASES.items():
            if names and name not in names:
                continue
            data = asyncio.run(run_case(flavors[flavor], config, call))
            (HERE / f"{name}.jsonl").write_bytes(data)
            print(name, len(data), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
