"""Progress of one long fold: the passes call back, the CLI draws a bar only on a terminal."""

from __future__ import annotations

import io
import sys

import torch
from onnx_cases import Builder, feeds, reference, rel_err, run_ort
from test_fx_fold import prepared
from test_fx_fold import rel_err as fx_rel_err
from torch import nn

import bnfold
from bnfold.cli import render
from bnfold.passes.onnx.fold import fold_onnx


def _conv_bn_chain(n: int, seed: int = 5):
    """``n`` Conv+BN pairs in a row, then a BN that can only fold backward (kept first)."""
    b = Builder(seed)
    prev = "x"
    for i in range(n):
        b.node("Conv", [prev, b.rand(f"w{i}", [4, 4, 1, 1])], [f"c{i}"])
        prev = b.bn(f"c{i}", f"y{i}", 4)
    return b.model({"x": [2, 4, 3, 3]}, {prev: None})


def _calls() -> tuple[list[tuple[int, int]], object]:
    seen: list[tuple[int, int]] = []
    return seen, lambda done, total: seen.append((done, total))


def test_onnx_fold_reports_each_bn_once_and_stays_exact() -> None:
    model = _conv_bn_chain(5)
    seen, progress = _calls()
    out, report = fold_onnx(model, progress=progress)
    assert seen == [(i, 5) for i in range(1, 6)]
    assert len(report.folded) == 5
    x = feeds(model)
    assert rel_err(run_ort(out, x), reference(model, x)) < 1e-5


def test_fx_fold_reports_forward_then_backward_tries_and_stays_exact() -> None:
    model = prepared(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                   nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    seen: list[tuple[int, int]] = []
    gm, report = bnfold.fold(model, torch.randn(2, 3, 8, 8),
                             progress=lambda d, t: seen.append((d, t)))
    # three forward tries; the leading BN has no layer before it: one backward try
    assert seen == [(1, 3), (2, 3), (3, 3), (4, 4)]
    assert len(report.folded) == 3
    assert fx_rel_err(gm, model, torch.randn(2, 3, 8, 8)) < 1e-6


def test_bar_prints_nothing_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(render, "SHOW_AFTER_S", 0.0)
    with render.progress_bar("folding BNs") as update:
        fold_onnx(_conv_bn_chain(3), progress=update)
    assert err.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_on_a_terminal_past_the_delay(monkeypatch) -> None:
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(render, "SHOW_AFTER_S", 0.0)
    with render.progress_bar("folding BNs") as update:
        fold_onnx(_conv_bn_chain(3), progress=update)
    assert "folding BNs" in err.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    monkeypatch.setattr(render, "SHOW_AFTER_S", 3600.0)
    with render.progress_bar("folding BNs") as update:
        fold_onnx(_conv_bn_chain(3), progress=update)
    assert quiet.getvalue() == ""


def test_cli_fold_prints_no_bar_to_a_pipe(run_cli, tmp_path) -> None:
    import onnx

    src, out = tmp_path / "chain.onnx", tmp_path / "folded.onnx"
    onnx.save(_conv_bn_chain(4), src)
    done = run_cli("fold", src, "-o", out)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "4 folded" in done.stdout
    x = feeds(onnx.load(src))
    assert rel_err(run_ort(onnx.load(out), x), reference(onnx.load(src), x)) < 1e-5
