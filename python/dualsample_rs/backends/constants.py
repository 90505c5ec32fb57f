"""Defaults and limits shared by the HTTP client, the handshake and the settings."""

from __future__ import annotations

# A step is one forward pass per sequence; a minute covers a loaded server. Connecting
# to a local or cluster server should be quick, so fail fast there.
DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_CONNECTIONS = 100
# The largest reply accepted. The largest legitimate one: 1,024 rows (vLLM's batch
# limit) of a 64-token speculative round with 128 entries per position at ~60 bytes of
# JSON each is ~500 MB; prompt log probabilities of a 128k-token context are smaller.
DEFAULT_MAX_REPLY_BYTES = 1 << 30
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
# A Retry-After longer than this is not honoured (the back-off is used instead).
MAX_RETRY_AFTER = 60.0
RETRYABLE_STATUS = frozenset({408, 409, 429})
# End-of-sequence strings tried through /tokenize when the server does not say.
KNOWN_EOS_STRINGS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")
# Special-token strings that are excluded from sampling when asked to and found.
KNOWN_SPECIAL_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<s>", "<pad>", "<|pad|>")
VOCAB_PROBE_TEXT = "Hello, world! The quick brown fox: 12345 ünïcödé 日本"
# vLLM refuses a request of more prompts than this.
MAX_PROMPTS_PER_REQUEST = 1024
# The largest log probability the kernel takes (a little above 0: rounding in a
# server's log-softmax); the Rust crate's `MAX_LOGP`, which tests/test_config.py checks.
MAX_LOGP = 1e-4
# The most tokens drafted per speculative round.
MAX_SPECULATE = 64
MIB = 1 << 20
