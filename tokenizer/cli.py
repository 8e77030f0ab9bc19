"""A helper the project's command-line tools share (`python -m tokenizer`, `pipeline/build.py`,
`python -m trainer.generate`; the tokenizer package is the one they all import)."""
from __future__ import annotations

import os


def after_broken_pipe(stream) -> int:
    """After a BrokenPipeError on `stream` (its reader went away: `... | head`): point its file descriptor at
    /dev/null, so the flush at interpreter exit raises nothing either, and return 141, the exit status of a
    writer killed by SIGPIPE (instead of a BrokenPipeError traceback, and another at exit)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass
    return 141
