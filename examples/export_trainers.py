"""Scenario 7: records exported for the trainers — TRL's messages, verl's Parquet, and
what a format refuses when the run did not keep what it needs."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from _servers import PLAIN, servers
from dualsample_rs import CoordinatorConfig, generate_with_dual_prompts
from dualsample_rs.export import ExportRefused, export


def main(theta_url: str, t_url: str) -> None:
    # Exact scoring keeps both models' exact log probabilities, which verl and slime need.
    config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0, scoring="exact")
    outs = asyncio.run(generate_with_dual_prompts(PLAIN, PLAIN, config, max_tokens=20, show_progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp, "records.jsonl")
        records.write_text("".join(json.dumps(o.to_record()) + "\n" for o in outs))
        # TRL (SFT, GKD, GOLD): the prompt as the user's turn, the sample as the assistant's
        counts = asyncio.run(export("messages", str(records), str(Path(tmp, "messages.jsonl"))))
        first = json.loads(Path(tmp, "messages.jsonl").read_text().splitlines()[0])
        print(f"messages: {counts['written']} conversations, e.g. {first['messages'][1]['content']!r}")
        # verl: prompt ids (tokenised on the base server, as the run did), log q*, and the
        # teacher's exact log probability of each token (k = 1)
        verl = Path(tmp, "verl.parquet")
        counts = asyncio.run(export("verl", str(records), str(verl), theta_url=theta_url, teacher="token"))
        print(f"verl: {counts['written']} rows in {verl.name} ({verl.stat().st_size} bytes)")
        # Axolotl's KD dataset needs the teacher's top-k, which only --save-topk keeps
        try:
            asyncio.run(export("axolotl-kd", str(records), str(Path(tmp, "kd.jsonl"))))
        except ExportRefused as err:
            print(f"axolotl-kd refused: {err}")


if __name__ == "__main__":
    with servers(__doc__) as urls:
        main(*urls)
