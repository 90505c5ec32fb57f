"""The command line: `dualsample generate | serve | demo | export | report` (parsing.py
reads the arguments, jobs.py runs the work)."""

from .parsing import main

__all__ = ["main"]
