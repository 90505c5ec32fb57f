"""Scenario 5: the one-call convenience — start, generate, close."""

from __future__ import annotations

import asyncio

from _servers import PLAIN, QUESTIONS, servers
from dualsample_rs import CoordinatorConfig, generate_with_dual_prompts


def main(theta_url: str, t_url: str) -> None:
    config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0)
    outs = asyncio.run(generate_with_dual_prompts(PLAIN, QUESTIONS, config, max_tokens=30, teacher_chat=True,
                                                  show_progress=False))  # fmt: skip
    for out in outs:
        print(f"{out.prompt_t!r} -> {out.generated_text!r}")


if __name__ == "__main__":
    with servers(__doc__) as urls:
        main(*urls)
