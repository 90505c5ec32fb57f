"""Scenario 7: records exported for the trainers — TRL's messages, Axolotl's KD dataset,
verl's Parquet and slime's rollout samples — and what a format refuses when the run did
not keep what it needs."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from _servers import PLAIN, servers
from dualsample_rs import CoordinatorConfig, DualSampleError, generate_with_dual_prompts
from dualsample_rs.export import ExportRefused, export


def main(theta_url: str, t_url: str) -> None:
    # Exact scoring keeps both models' exact log probabilities (verl's k = 1 rows and
    # slime need them); save_topk keeps the teacher's 8 most likely ids at every position
    # (Axolotl's KD targets, verl's teacher_ids).
    config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0, scoring="exact", top_k=8, save_topk=8)
    outs = asyncio.run(generate_with_dual_prompts(PLAIN, PLAIN, config, max_tokens=20, show_progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp, "records.jsonl")
        records.write_text("".join(json.dumps(o.to_record()) + "\n" for o in outs))
        # TRL (SFT, GKD, GOLD): the prompt as the user's turn, the sample as the assistant's
        counts = asyncio.run(export("messages", str(records), str(Path(tmp, "messages.jsonl"))))
        first = json.loads(Path(tmp, "messages.jsonl").read_text().splitlines()[0])
        print(f"messages: {counts['written']} conversations, e.g. {first['messages'][1]['content']!r}")
        # Axolotl KD: the teacher's top-k per generated token
        counts = asyncio.run(export("axolotl-kd", str(records), str(Path(tmp, "kd.jsonl"))))
        row = json.loads(Path(tmp, "kd.jsonl").read_text().splitlines()[0])
        print(f"axolotl-kd: {counts['written']} rows, {len(row['target_token_ids'][0])} targets per token")
        # verl: prompt ids (tokenised on the base server, as the run did), log q*, and the
        # teacher's top-k per token
        verl = Path(tmp, "verl.parquet")
        counts = asyncio.run(export("verl", str(records), str(verl), theta_url=theta_url))
        print(f"verl: {counts['written']} rows in {verl.name} ({verl.stat().st_size} bytes)")
        # slime: a torch .pt of samples (the slime extra); without torch, say so
        try:
            counts = asyncio.run(export("slime", str(records), str(Path(tmp, "rollout.pt")), theta_url=theta_url))
            print(f"slime: {counts['written']} samples")
        except DualSampleError as err:  # torch missing: the message names the extra
            print(f"slime not written: {err}")
        # A run without save_topk: Axolotl's KD dataset is refused, naming the flag needed
        plain = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=0)
        outs = asyncio.run(generate_with_dual_prompts(PLAIN, PLAIN, plain, max_tokens=20, show_progress=False))
        records.write_text("".join(json.dumps(o.to_record()) + "\n" for o in outs))
        try:
            asyncio.run(export("axolotl-kd", str(records), str(Path(tmp, "kd2.jsonl"))))
        except ExportRefused as err:
            print(f"axolotl-kd refused: {err}")


if __name__ == "__main__":
    with servers(__doc__) as urls:
        main(*urls)
