"""Fold time on full-size architectures, bnfold beside its peers: ``python -m
benchmarks.bench_arch [NAME ...] [--repeat N] [--no-dynamo] [--width W] [--small]``
(``--width``/``--small``: narrower nets and small inputs, for a quick look).

The zoo benchmarks (:mod:`benchmarks.bench_onnx_zoo`, :mod:`benchmarks.bench_fx_fold`) fold
nets of a few kilobytes, where every tool's fixed costs decide the ratio. Here every family of
:mod:`bnfold.models.arch` is built at its real size (ResNet-50: 25.6M parameters) with random
weights and randomized BN statistics, as a deployment engineer meets it:

* ONNX, file to file: exported by TorchScript (``TrainingMode.PRESERVE``, opset 17) and by
  dynamo (``optimize=False``), both with every BN kept, then folded by each tool of
  :data:`benchmarks.bench_onnx_zoo.TOOLS` (bnfold on the CLI's route, with ``onnx.checker``
  and a durable write; the peers ``onnx.load`` + rewrite + ``onnx.save``, ONNX Runtime its
  basic-level optimize-and-save); best of ``--repeat`` runs. Each row gives the BNs every tool
  left, so a fast peer that folds less shows as such.
* FX: ``bnfold.fold(model, example_inputs)`` (one forward pass for shapes) beside
  ``torch.fx.experimental.optimization.fuse``, median of ``--repeat`` runs taken in
  alternation (one of each tool per round), each judged on the BNs left and its error
  against the unfolded model in float64 on a fresh input.

Tables: stdout and benchmarks/out/arch.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch.fx.experimental.optimization import fuse

import bnfold
from benchmarks.bench_fx_fold import judge_alternately
from benchmarks.bench_onnx_fold import _table, write_sections
from benchmarks.bench_onnx_zoo import TOOLS, Ratios, _best, exporters
from bnfold.models import arch
from bnfold.models.stats import random_input

EXPORTS = ("TorchScript", "dynamo")


def _bn_left(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type == "BatchNormalization" for node in graph.node)


def onnx_table(names: list[str], repeat: int, exports: tuple[str, ...] = EXPORTS,
               width: float = 1.0, small: bool = False) -> str:
    """The ONNX table of ``names`` (``width``, ``small``: :func:`bnfold.models.arch.get`'s
    channel multiplier and the small input, for a quick run)."""
    rows = [["model (export)", "MB", "BN", "bnfold ms", "BN left: bnfold", "fastest peer (BN left)",
             "bnfold / fastest peer", "bnfold / ORT basic", "bnfold read+write alone / fastest"]]
    ratios, export = Ratios(), exporters()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        for name in names:
            model, x = arch.get(name, width=width), arch.example_input(name, small=small)
            for how in exports:
                onnx.save(export[how](model, x), str(src))
                times: dict[str, float | None] = {}
                left: dict[str, int] = {}
                for tool, run in TOOLS.items():
                    times[tool] = _best(run, src, dst, repeat)
                    if times[tool] is not None:
                        left[tool] = _bn_left(dst)
                ours = times.pop("bnfold")
                peers = {t: s for t, s in times.items() if s is not None}
                if ours is None or not peers:
                    rows.append([f"{name} ({how})", "", "", "bnfold failed" if ours is None
                                 else "every peer failed", "", "", "", "", ""])
                    continue
                fastest, cells = ratios.add(ours, peers, src, dst, repeat)
                rows.append([f"{name} ({how})", f"{src.stat().st_size / 1e6:.1f}",
                             str(arch.ARCHS[name].bn_total), f"{ours * 1e3:.0f}",
                             str(left["bnfold"]), f"{fastest} ({left[fastest]})", *cells])
                print(" | ".join(rows[-1]), flush=True)
    rows.append(["**median**", "", "", "", "", "", *ratios.medians()])
    return _table(rows)


def fx_table(names: list[str], repeat: int, width: float = 1.0, small: bool = False) -> str:
    """The FX table of ``names`` (``width``, ``small``: as in :func:`onnx_table`)."""
    rows = [["model", "BN", "exact BN left", "bnfold.fold", "torch.fx fuse", "bnfold ms",
             "bnfold / fuse"]]
    ratios = []
    for name in names:
        entry = arch.ARCHS[name]
        model, example = arch.get(name, width=width), arch.example_input(name, small=small)
        ref = arch.get(name, width=width).double()
        fresh = random_input(entry.small_input if small else entry.input_shape, seed=7)
        runs: dict[str, Callable[[], torch.nn.Module]] = {
            "bnfold": lambda m=model, e=example: bnfold.fold(m, e).model,
            "fuse": lambda m=model: fuse(m)}
        (ours, t_ours), (peer, t_peer) = judge_alternately(
            runs, ref, fresh, entry.bn_left, repeat).values()
        ratio = "-"
        if t_ours and t_peer:
            ratios.append(t_ours / t_peer)
            ratio = f"{t_ours / t_peer:.2f}"
        rows.append([name, str(entry.bn_total), str(entry.bn_left), ours, peer,
                     "-" if t_ours is None else f"{t_ours * 1e3:.0f}", ratio])
        print(" | ".join(rows[-1]), flush=True)
    rows.append(["**median**", "", "", "", "", "", f"{statistics.median(ratios):.2f}"])
    return _table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"architectures (default: all of "
                        f"{', '.join(arch.ARCHS)})")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel multiplier (default 1: the real sizes)")
    parser.add_argument("--small", action="store_true", help="the small inputs")
    parser.add_argument("--no-dynamo", action="store_true",
                        help="TorchScript exports only (dynamo's take ~10 s a model)")
    args = parser.parse_args(argv)
    names = args.names or list(arch.ARCHS)
    exports = EXPORTS[:1] if args.no_dynamo else EXPORTS
    write_sections("arch.md", "bnfold on full-size architectures", [
        ("Full-size architectures: ONNX, file to file",
         lambda: onnx_table(names, args.repeat, exports, args.width, args.small)),
        ("Full-size architectures: FX, with example inputs",
         lambda: fx_table(names, args.repeat, args.width, args.small))])


if __name__ == "__main__":
    main()
