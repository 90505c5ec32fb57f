"""Scenario 1: the base sees a plain prompt, the teacher the same question in its chat template."""

from __future__ import annotations

import asyncio

from _servers import PLAIN, QUESTIONS, servers
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator


async def main(theta_url: str, t_url: str) -> None:
    config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0)
    async with DualVLLMCoordinator(config) as coord:
        outs = await coord.generate_batch_dual_prompts(PLAIN, QUESTIONS, max_tokens=40, teacher_chat=True,
                                                       show_progress=False)  # fmt: skip
    for out in outs:
        mean_alpha = sum(out.alpha_history) / len(out.alpha_history)
        print(f"{out.prompt_t!r} -> {out.generated_text!r} (mean alpha {mean_alpha:.2f})")


if __name__ == "__main__":
    with servers(__doc__) as urls:
        asyncio.run(main(*urls))
