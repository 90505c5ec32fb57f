"""Scenario 6: speculative rounds (several tokens per round trip, the same law) against one
token per step, on vLLM's tokens-in/out route with trace replay on the base's server."""

from __future__ import annotations

import asyncio

from _servers import PLAIN, QUESTIONS, servers
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator


async def main(theta_url: str, t_url: str) -> None:
    for speculate in (0, 4):
        config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0, dialect="vllm-generate",
                                   speculate=speculate)  # fmt: skip
        async with DualVLLMCoordinator(config) as coord:
            outs = await coord.generate_batch_dual_prompts(PLAIN * 8, QUESTIONS * 8, max_tokens=40, teacher_chat=True,
                                                           show_progress=False)  # fmt: skip
            s = coord.get_statistics()
        line = f"speculate {speculate}: {s['total_tokens']} tokens, {s['total_requests']} requests"
        if s["rounds"]:
            line += (f", {s['rounds']} rounds, {s['tokens_per_round']:.2f} tokens per round, "
                     f"acceptance rate {s['acceptance_rate']:.2f}")  # fmt: skip
            first = outs[0]
            line += f"\n  first sequence, round of each token: {first.round}\n  drafted: {first.drafted}"
        print(line)


if __name__ == "__main__":
    with servers(__doc__, enable_scale_out=True, enable_trace_replay=True, max_logprobs=64) as urls:
        asyncio.run(main(*urls))
