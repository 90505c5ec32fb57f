"""Two named teachers in one run: each question routed to its teacher (a chat teacher and a
maths teacher), then every question from a 50/50 mixture of the two.

Without URLs it starts three reference servers: the base, the chat teacher and the
maths teacher (``teacher-math``, trained on other text with the same tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Iterator

from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.server import running_server

QUESTIONS = [
    ("Why is the sky blue?", "chat"),
    ("Ana has 12 apples and gets 30 more. How many apples does Ana have now?", "math"),
    ("What causes wind?", "chat"),
    ("Ben has 9 books and gets 4 more. How many books does Ben have now?", "math"),
]


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str, str]]:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--theta-url", "--chat-url", "--math-url"):
        parser.add_argument(flag)
    args = parser.parse_args()
    if args.theta_url and args.chat_url and args.math_url:
        yield args.theta_url, args.chat_url, args.math_url
        return
    with running_server("base") as b, running_server("teacher") as c, running_server("teacher-math") as m:
        yield b, c, m


async def main(theta_url: str, chat_url: str, math_url: str) -> None:
    # Each teacher could have its own dialect, replicas, temperature, chat setting or
    # prompt field; the teachers of a mixture share one temperature.
    config = CoordinatorConfig(theta_url=theta_url, teachers={"chat": chat_url, "math": math_url}, seed=0)
    plain = [f"Question: {q}\nAnswer:" for q, _ in QUESTIONS]
    questions = [q for q, _ in QUESTIONS]
    async with DualVLLMCoordinator(config) as coord:
        # Each teacher gets the question in its chat template.
        routed = await coord.generate_batch_dual_prompts(
            plain, questions, 40, teacher_chat=True, show_progress=False, teachers=[name for _, name in QUESTIONS]
        )
        print("routed, each question to its teacher:")
        for out in routed:
            print(f"  [{out.teacher}] {out.prompt_t!r} -> {out.generated_text!r}")
        mixed = await coord.generate_batch_dual_prompts(
            plain, questions, 40, teacher_chat=True, show_progress=False, teachers=[{"chat": 0.5, "math": 0.5}] * 4
        )
        print("from the mixture chat 0.5, math 0.5:")
        for out in mixed:
            if out.error:
                raise SystemExit(out.error)
            own = {name: round(sum(v), 2) for name, v in (out.logp_teachers or {}).items()}
            print(f"  {out.prompt_t!r} -> {out.generated_text!r} (sum log p per teacher {own})")
        for name, counts in coord.get_statistics()["teachers"].items():
            print(f"  per teacher: {name}: {counts['sequences']} sequences, {counts['tokens']} tokens")


if __name__ == "__main__":
    with servers() as urls:
        asyncio.run(main(*urls))
