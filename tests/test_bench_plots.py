"""The benchmark plots: curve averaging, the PNG, and the table-only path without matplotlib."""

from __future__ import annotations

import math
import sys

import pytest

from benchmarks.plots import _mean_curve, fold_time_vs_size, latency_bars, training_curves

CURVES = {("cnn", "0.01 (1x)"): {"plain": [[2.0, 1.0, 0.5], [2.0, 1.5]],
                                 "inserted": [[2.0, 0.5, 0.1], [2.0, 0.3, 0.1]]},
          ("cnn", "0.1 (10x)"): {"plain": [[2.0, math.inf]], "inserted": [[1.0, 0.2]]}}


def test_mean_curve_averages_the_runs_still_going() -> None:
    assert _mean_curve([[2.0, 1.0, 0.5], [4.0, 3.0]]) == [3.0, 2.0, 0.5]
    assert math.isnan(_mean_curve([[1.0, math.inf]])[1])
    assert _mean_curve([]) == []


def test_training_curves_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "out" / "training.png"
    assert training_curves(CURVES, path) == f"wrote {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "training.png"
    assert "matplotlib is not installed" in training_curves(CURVES, path)
    assert not path.exists()


def test_fold_time_vs_size_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "fold_scaling.png"
    times = {"bnfold": {300: 0.01, 3000: 0.1}, "peer": {300: 0.02, 3000: 0.5}}
    assert fold_time_vs_size(times, path) == f"wrote {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_bars_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "reparam.png"
    ms = {"repvgg": [0.4, 0.4, 0.36, 0.36], "mobileone": [0.47, 0.46, 0.17, 0.16]}
    assert latency_bars(ms, ("a", "b", "c", "d"), path, "t") == f"wrote {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
