"""Pausing Python's cyclic garbage collector while bnfold builds or walks a large graph."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a graph is many small linked objects, and the
    collector's repeated scans of them while a model is parsed, folded or serialized cost
    more than the work itself (reference counting still frees memory; the collector resumes,
    if it was on, on leaving)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
