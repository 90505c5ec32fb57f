"""Scenario 2: q* restricted to the teacher's top-p support, compared with no constraint."""

from __future__ import annotations

import asyncio

from _servers import PLAIN, QUESTIONS, servers
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator


async def run(theta_url: str, t_url: str, constrained: bool) -> dict:
    config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0, constraint_to_target=constrained,
                               target_top_p=0.9)  # fmt: skip
    async with DualVLLMCoordinator(config) as coord:
        outs = await coord.generate_batch_dual_prompts(PLAIN, QUESTIONS, max_tokens=40, teacher_chat=True,
                                                       show_progress=False)  # fmt: skip
        stats = coord.get_statistics()
    logq = [q for o in outs for q in o.logq]
    stats["mean_logq"] = sum(logq) / len(logq)
    return stats


async def main(theta_url: str, t_url: str) -> None:
    for constrained in (False, True):
        s = await run(theta_url, t_url, constrained)
        state = "on " if constrained else "off"
        print(f"constraint {state}: {s['total_tokens']} tokens, mean alpha {s['mean_alpha']:.3f}, "
              f"mean log q* {s['mean_logq']:.3f}, constraint applied at {s['constraint_applied']} tokens")  # fmt: skip


if __name__ == "__main__":
    with servers(__doc__) as urls:
        asyncio.run(main(*urls))
