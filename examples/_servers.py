"""Shared by the examples: the servers to use, the reference servers when none are given.

Pass ``--theta-url`` and ``--t-url`` to point an example at your own servers; without
them it starts the package's two reference servers (needs ``dualsample_rs[server]``).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from dualsample_rs.server import running_server

QUESTIONS = ["Why is the sky blue?", "What is water made of?", "What causes wind?", "Why does ice float?"]
PLAIN = [f"Question: {q}\nAnswer:" for q in QUESTIONS]


@contextlib.contextmanager
def servers(description: str, **options: object) -> Iterator[tuple[str, str]]:
    """The URLs given on the command line, or two reference servers started with
    `options` (any ``dualsample serve`` flag, underscores for dashes)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--theta-url")
    parser.add_argument("--t-url")
    args = parser.parse_args()
    if args.theta_url and args.t_url:
        yield args.theta_url, args.t_url
        return
    with running_server("base", **options) as theta, running_server("teacher", **options) as t:
        yield theta, t
