"""Scenario 3: the first token taken from the teacher (alpha = 1), compared with mixing from the start."""

from __future__ import annotations

import asyncio

from _servers import PLAIN, QUESTIONS, servers
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator


async def main(theta_url: str, t_url: str) -> None:
    for forced in (True, False):
        config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0, force_first_token=forced)
        async with DualVLLMCoordinator(config) as coord:
            outs = await coord.generate_batch_dual_prompts(PLAIN, QUESTIONS, max_tokens=20, teacher_chat=True,
                                                           show_progress=False)  # fmt: skip
            stats = coord.get_statistics()
        first = [o.alpha_history[0] for o in outs]
        print(f"forcing {'on ' if forced else 'off'}: first-token alphas {[round(a, 2) for a in first]}, "
              f"{stats['first_token_forced']} forced; first tokens {[o.token_ids[0] for o in outs]}")  # fmt: skip


if __name__ == "__main__":
    with servers(__doc__) as urls:
        asyncio.run(main(*urls))
