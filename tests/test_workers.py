"""The fold's worker threads (``bnfold/workers.py``): results in order, errors in order, and a
Ctrl-C while they start never keeps the process from exiting."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bnfold.workers import Workers, pool

ROOT = Path(__file__).resolve().parents[1]


def test_map_returns_in_order_and_raises_the_first_error_in_order() -> None:
    workers = Workers(3)
    assert workers.map(lambda i: i * i, range(20)) == [i * i for i in range(20)]
    done: list[int] = []

    def job(i: int) -> int:
        done.append(i)
        if i in (4, 7):
            raise ValueError(f"job {i}")
        return i

    with pytest.raises(ValueError, match="job 4"):
        workers.map(job, range(10))
    assert sorted(done) == list(range(10))  # every job ran before the error was raised


def test_the_threads_are_daemons() -> None:
    pool().map(abs, [-1])
    threads = [t for t in threading.enumerate() if t.name.startswith("bnfold-fold")]
    assert threads and all(t.daemon for t in threads)


def test_a_ctrl_c_while_a_worker_starts_does_not_hang_the_exit() -> None:
    """A ``KeyboardInterrupt`` right after a fold's worker thread started (the moment where a
    ``ThreadPoolExecutor`` loses track of it and the interpreter then waits for it forever)."""
    code = """
        import threading
        import numpy as np
        from bnfold.algebra import BATCH_MAX_WEIGHT, BNParams, fold_forward_many

        start = threading.Thread.start
        def interrupted(self):
            start(self)
            raise KeyboardInterrupt
        threading.Thread.start = interrupted
        c = 8
        w = np.ones((c, BATCH_MAX_WEIGHT // c + 1), np.float32)
        bn = BNParams(mean=np.zeros(c), var=np.ones(c), eps=1e-5)
        try:
            fold_forward_many([w, w], [None, None], [bn, bn])
        except KeyboardInterrupt:
            print("interrupted")
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "interrupted" and done.returncode == 0, done.stderr
