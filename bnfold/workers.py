"""A few daemon threads that run numpy loops side by side (numpy releases the GIL in them).

Why not ``concurrent.futures.ThreadPoolExecutor``: its workers are joined at interpreter
exit, and a Ctrl-C that lands while it starts one (``KeyboardInterrupt`` between the thread's
start and its registration) leaves a worker nobody tells to stop: ``bnfold fold`` then printed
"interrupted" and hung at exit until a second Ctrl-C. These threads are daemons, so nothing
waits for them at exit, and a job is only ever a computation into memory the caller owns (an
interrupted caller drops the results).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Threads a :func:`pool` runs.
WORKERS = min(4, os.cpu_count() or 1)


class Workers:
    """``n`` daemon threads taking jobs off one queue."""

    def __init__(self, n: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Any, Future]] = \
            queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._run, name=f"bnfold-fold-{i}", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, item, future = self._jobs.get()
            try:
                future.set_result(fn(item))
            except BaseException as exc:  # (handed to the caller, who raises it)
                future.set_exception(exc)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(item) for item in items]``, the calls spread over the threads; the first
        exception in ``items``' order is raised once every call is done."""
        futures: list[Future] = []
        for item in items:
            futures.append(Future())
            self._jobs.put((fn, item, futures[-1]))
        for future in futures:
            future.exception()  # (wait for all: no job outlives the call)
        return [future.result() for future in futures]


@functools.cache
def pool() -> Workers:
    """The process's :data:`WORKERS` threads, started at first use (a thread start costs
    about as much as a 1M-element product); a forked child starts its own (a parent's
    threads do not run there)."""
    return Workers(WORKERS)


os.register_at_fork(after_in_child=pool.cache_clear)
