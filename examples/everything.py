"""Scenario 4: everything at once — dual prompts, support constraint, first-token forcing,
stability fallback, excluded special tokens, temperatures, diagnostics and exact rescoring."""

from __future__ import annotations

import asyncio

from _servers import PLAIN, QUESTIONS, servers
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator


async def main(theta_url: str, t_url: str) -> None:
    config = CoordinatorConfig(
        theta_url=theta_url, t_url=t_url, seed=0, top_k=20,
        constraint_to_target=True, target_top_p=0.95, force_first_token=True,
        enable_stability_check=True, stability_threshold_js=0.4, exclude_special_tokens=True,
        temperature=0.9, temperature_t=0.8, rescore=True,
    )  # fmt: skip
    async with DualVLLMCoordinator(config) as coord:
        outs = await coord.generate_batch_dual_prompts(PLAIN, QUESTIONS, max_tokens=40, teacher_chat=True,
                                                       return_diagnostics=True, show_progress=False)  # fmt: skip
        stats = coord.get_statistics()
    for out in outs:
        kl = out.diagnostics["kl_theta"]["mean"]
        print(f"{out.generated_text!r}: {len(out.token_ids)} tokens, mean KL(q||pi_theta) {kl:.3f}, "
              f"sum exact log pi_theta {sum(out.logp_theta_exact or []):.2f}")  # fmt: skip
    keys = ("total_requests", "failed_requests", "total_tokens", "first_token_forced", "constraint_applied",
            "stability_fallbacks", "success_rate")  # fmt: skip
    print({k: stats[k] for k in keys})


if __name__ == "__main__":
    with servers(__doc__) as urls:
        asyncio.run(main(*urls))
