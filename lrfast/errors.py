"""The errors lrfast raises of its own, and the one test of an out-of-memory error every layer shares."""

from __future__ import annotations

import torch


class OutOfMemoryError(torch.OutOfMemoryError, MemoryError):
    """Not even one candidate fits in memory (catchable as torch.OutOfMemoryError or MemoryError)."""


class DistributedError(RuntimeError):
    """A collective of a distributed range test failed or timed out: another rank raised or stalled."""


def first_line(e: BaseException) -> str:
    """The first line of an error's message (whole sentences, where cutting at a length would end mid-word)."""
    return (str(e).strip().splitlines() or [""])[0]


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error, host or device, as torch raises it."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
