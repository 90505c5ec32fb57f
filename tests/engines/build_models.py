"""Builds the tiny Qwen2 models that the real engines (vLLM, SGLang) serve in the tests.

Run it with the engine venv's python, which has torch, transformers and tokenizers:

    ~/.cache/dualsample_rs/engines/vllm/bin/python tests/engines/build_models.py

It writes ``$MODELS_DIR/<recipe hash>/`` (see ``paths.py``) and prints that directory on
its last line. The hash covers this file, the training text (``corpus.py``) and
``PARAMS``, so a change to any of them builds a new set; a finished set (``.complete``
present) is reused as is. Everything is seeded and trained for a fixed number of steps,
so the same recipe gives the same weights on the same software.

The set:

- one byte-level BPE tokenizer shared by all models: ``PARAMS["bpe_size"]`` learned ids,
  then the special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and
  ``<|begin_of_text|>`` (in that order), and a ChatML chat template;
- ``base/``: trained on prose, eos ``<|endoftext|>`` (like Qwen2.5);
- ``teacher/``: trained on ChatML conversations, eos ``<|im_end|>`` (like its Instruct twin);
- ``base_bos/`` and ``teacher_bos/``: the same weights, but the tokenizer adds
  ``<|begin_of_text|>`` in front of every encoded text (as Llama 3 and Gemma do) and
  ``generation_config.json`` carries the sampling defaults of an instruct model
  (top_k 20, top_p 0.8, temperature 0.7). Half of the training documents start with
  that token, so both variants see familiar input.

``config.json``'s vocab_size is the tokenizer length rounded up to a multiple of 64, as
Qwen pads its embedding matrix: the ids between are valid for the model but no text
encodes to them. ``manifest.json`` at the top records the ids and sizes.

Importing this module needs only the standard library (``model_root()`` tells where a
recipe lives); the build itself imports torch and friends.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    from .paths import MODELS_DIR
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paths import MODELS_DIR

REPO = Path(__file__).resolve().parents[2]
CORPUS_PY = REPO / "python" / "dualsample_rs" / "server" / "corpus.py"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, BEGIN_OF_TEXT]

PARAMS: dict[str, Any] = {
    "seed": 1234,
    "bpe_size": 996,  # learned ids (256 bytes + merges); the 4 special tokens follow
    "vocab_multiple": 64,  # config.json vocab_size = tokenizer length rounded up to this
    "world_facts_repeat": 2,  # weight of the non-ASCII facts in the training text
    "documents": 900,  # per model
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "seq_len": 256,
    "batch_size": 16,
    "steps": 300,
    "lr": 3e-3,
    "warmup": 20,
    "bos_fraction": 0.5,
    "threads": 2,
    "instruct_sampling": {"top_k": 20, "top_p": 0.8, "temperature": 0.7},
}

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The BOS variant's template writes the BOS itself, as Llama 3's does; a chat request must
# then be tokenized without special tokens (vLLM's default for chat) to get exactly one.
CHATML_TEMPLATE_BOS = "{{- bos_token }}" + CHATML_TEMPLATE

MARKER = ".complete"

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs,
# newlines, spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _load_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_dualsample_corpus", CORPUS_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(b"\0")
    h.update(CORPUS_PY.read_bytes())
    h.update(b"\0")
    h.update(json.dumps(PARAMS, sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_root(models_dir: Path | None = None) -> Path:
    """Where this recipe's models are (or will be) built."""
    return (models_dir or MODELS_DIR) / recipe_hash()


def is_built(models_dir: Path | None = None) -> bool:
    return (model_root(models_dir) / MARKER).is_file()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tokenizer


def _strip_specials(text: str) -> list[str]:
    pieces = [text]
    for tok in SPECIAL_TOKENS:
        pieces = [part for piece in pieces for part in piece.split(tok)]
    return [p for p in pieces if p]


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    # The same text pipeline as Qwen2's tokenizer.json: transformers builds a Qwen2Tokenizer
    # for model_type qwen2 with exactly these parts, whatever tokenizer.json says, so
    # writing them here keeps every loader (tokenizers, transformers 4 or 5) in agreement.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=PARAMS["bpe_size"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator([p for t in texts for p in _strip_specials(t)], trainer=trainer)
    learned = tok.get_vocab_size()
    if learned != PARAMS["bpe_size"]:
        raise SystemExit(f"BPE learned {learned} ids, wanted {PARAMS['bpe_size']}: lower bpe_size")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def _bos_tokenizer(tok: Any) -> Any:
    from tokenizers import Tokenizer, processors

    bos_tok = Tokenizer.from_str(tok.to_str())
    bos_id = bos_tok.token_to_id(BEGIN_OF_TEXT)
    bos_tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT}:0 $A:0",
                pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )
    return bos_tok


def _write_tokenizer(tok: Any, out: Path, *, eos: str, bos: str | None, template: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": PARAMS["max_position_embeddings"],
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map: dict[str, Any] = {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": eos,
        "pad_token": ENDOFTEXT,
    }
    if bos is not None:
        special_map["bos_token"] = bos
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# --------------------------------------------------------------------------- model


def _pack(docs: list[list[int]], seq_len: int, pad_id: int) -> tuple[Any, Any]:
    """Greedy packing: every row starts at a document start; the tail is padding."""
    import torch

    rows: list[list[int]] = []
    row: list[int] = []
    for ids in docs:
        ids = ids[:seq_len]
        if len(row) + len(ids) > seq_len:
            rows.append(row)
            row = []
        row = row + ids
    if row:
        rows.append(row)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return input_ids, labels


def _train(name: str, docs: list[list[int]], vocab_size: int, pad_id: int, seed: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=PARAMS["hidden_size"],
        intermediate_size=PARAMS["intermediate_size"],
        num_hidden_layers=PARAMS["num_hidden_layers"],
        num_attention_heads=PARAMS["num_attention_heads"],
        num_key_value_heads=PARAMS["num_key_value_heads"],
        max_position_embeddings=PARAMS["max_position_embeddings"],
        max_window_layers=PARAMS["num_hidden_layers"],
        rope_theta=PARAMS["rope_theta"],
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config).float()
    model.train()
    input_ids, labels = _pack(docs, PARAMS["seq_len"], pad_id)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PARAMS["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps, warmup, bs = PARAMS["steps"], PARAMS["warmup"], PARAMS["batch_size"]

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = torch.randperm(len(input_ids), generator=gen)
    cursor = 0
    start = time.monotonic()
    for step in range(steps):
        if cursor + bs > len(order):
            order = torch.randperm(len(input_ids), generator=gen)
            cursor = 0
        idx = order[cursor : cursor + bs]
        cursor += bs
        loss = model(input_ids=input_ids[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 60 == 0 or step == steps - 1:
            _log(f"  {name} step {step:4d}/{steps} loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)")
    model.eval()
    return model


def _save_model(model: Any, out: Path, *, bos_id: int, eos_ids: list[int], sampling: dict[str, Any] | None) -> None:
    model.config.bos_token_id = bos_id
    model.config.eos_token_id = eos_ids[0]
    model.config.pad_token_id = None
    model.save_pretrained(str(out), safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    # Readers on transformers 4.x look for these flat keys.
    config["rope_theta"] = PARAMS["rope_theta"]
    config["torch_dtype"] = "float32"
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    if sampling:
        gen.update({"do_sample": True, **sampling})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _summary(model: Any, tok: Any, prompt: str, add_bos: int | None) -> list[tuple[str, float]]:
    import torch

    ids = tok.encode(prompt).ids
    if add_bos is not None:
        ids = [add_bos, *ids]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, 3)
    pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
    return [(tok.id_to_token(i) or f"<{i}>", round(p, 3)) for p, i in pairs]


# --------------------------------------------------------------------------- build


def build(models_dir: Path | None = None, force: bool = False) -> Path:
    root = model_root(models_dir)
    if (root / MARKER).is_file() and not force:
        _log(f"models already built in {root}")
        return root

    import random

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(PARAMS["threads"])
    t0 = time.monotonic()
    corpus = _load_corpus()
    facts = corpus.FACTS + corpus.WORLD_FACTS * PARAMS["world_facts_repeat"]
    seed = PARAMS["seed"]
    base_texts = corpus.base_documents(seed=seed, n=PARAMS["documents"], facts=facts)
    teacher_texts = corpus.teacher_documents(seed=seed + 1, n=PARAMS["documents"], facts=facts)

    tok = _train_tokenizer(base_texts + teacher_texts)
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    tok_len = tok.get_vocab_size(with_added_tokens=True)
    multiple = PARAMS["vocab_multiple"]
    vocab_size = -(-tok_len // multiple) * multiple
    _log(f"tokenizer: {tok_len} ids {ids}; model vocab_size {vocab_size} ({time.monotonic() - t0:.1f} s)")

    rng = random.Random(seed)

    def encode(texts: list[str]) -> list[list[int]]:
        out = []
        for enc in tok.encode_batch(texts):
            doc = list(enc.ids)
            if rng.random() < PARAMS["bos_fraction"]:
                doc = [ids[BEGIN_OF_TEXT], *doc]
            out.append(doc)
        return out

    base_docs = encode(base_texts)
    teacher_docs = encode(teacher_texts)
    _log(f"training text: base {sum(map(len, base_docs))} tokens, teacher {sum(map(len, teacher_docs))} tokens")

    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bos_tok = _bos_tokenizer(tok)
    eot, im_end, bos = ids[ENDOFTEXT], ids[IM_END], ids[BEGIN_OF_TEXT]
    sampling = PARAMS["instruct_sampling"]
    roles = {
        "base": (base_docs, ENDOFTEXT, [eot], seed + 10),
        "teacher": (teacher_docs, IM_END, [im_end, eot], seed + 20),
    }
    peek = {}
    for role, (docs, eos, eos_ids, role_seed) in roles.items():
        model = _train(role, docs, vocab_size, eot, role_seed)
        _save_model(model, tmp / role, bos_id=eot, eos_ids=eos_ids, sampling=None)
        _write_tokenizer(tok, tmp / role, eos=eos, bos=None, template=CHATML_TEMPLATE)
        _save_model(model, tmp / f"{role}_bos", bos_id=bos, eos_ids=eos_ids, sampling=sampling)
        _write_tokenizer(bos_tok, tmp / f"{role}_bos", eos=eos, bos=BEGIN_OF_TEXT, template=CHATML_TEMPLATE_BOS)
        prose = "The sun is a star at the center"
        question = corpus.chat([{"role": "user", "content": "What is the sun?"}], add_generation_prompt=True)
        peek[role] = {"prose": _summary(model, tok, prose, None), "chat": _summary(model, tok, question, None)}
        _log(f"  {role} next-token top 3: {peek[role]}")

    manifest = {
        "recipe": recipe_hash(),
        "params": PARAMS,
        "tokenizer_len": tok_len,
        "vocab_size": vocab_size,
        "special_ids": ids,
        "models": {
            "base": {"eos": ENDOFTEXT, "adds_bos": False, "generation_defaults": None},
            "teacher": {"eos": IM_END, "adds_bos": False, "generation_defaults": None},
            "base_bos": {"eos": ENDOFTEXT, "adds_bos": True, "generation_defaults": sampling},
            "teacher_bos": {"eos": IM_END, "adds_bos": True, "generation_defaults": sampling},
        },
        "next_token_top3": peek,
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    (tmp / MARKER).write_text(recipe_hash() + "\n")
    if force:
        shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:
        if not (root / MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"built in {time.monotonic() - t0:.0f} s")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=None, help=f"default {MODELS_DIR}")
    parser.add_argument("--force", action="store_true", help="rebuild even when built")
    parser.add_argument("--where", action="store_true", help="print the target directory only")
    args = parser.parse_args()
    if args.where:
        print(model_root(args.models_dir))
        return
    print(build(args.models_dir, force=args.force))


if __name__ == "__main__":
    main()
