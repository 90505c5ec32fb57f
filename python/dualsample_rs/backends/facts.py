"""What a server says about itself, read by the backends from its wire shapes: the
cards of the models it serves and what its tokenizer declares. Nothing above
`backends` sees those shapes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelCard:
    """One served model, from ``/v1/models`` (which vLLM and SGLang both answer)."""

    #: the name requests give as ``model``
    id: str
    #: the context length (prompt and generated tokens), where the card says
    max_model_len: int | None = None
    #: the engine as it names itself (``"vllm"``, ``"sglang"``), where the card says
    owned_by: str | None = None


@dataclass(frozen=True)
class TokenizerFacts:
    """What a server's tokenizer declares (vLLM's ``/tokenizer_info``), each where it does."""

    #: the end-of-sequence string
    eos_token: str | None = None
    #: the beginning-of-sequence string
    bos_token: str | None = None
    #: the longest input the tokenizer is configured for
    model_max_length: int | None = None
    #: the added tokens marked special, by string
    special_tokens: dict[str, int] = field(default_factory=dict)
