"""ONNX fold time, file to file, per zoo model beside each peer: ``python -m
benchmarks.bench_onnx_zoo``.

Every model of :mod:`bnfold.models.zoo`, :mod:`bnfold.models.reach` and :mod:`bnfold.models.rep`,
exported with its BNs kept (TorchScript exporter, ``TrainingMode.PRESERVE``, opset 17, and the
dynamo exporter with ``optimize=False``), is folded file to file in one process by:

* bnfold: the route ``bnfold fold IN -o OUT`` takes (``load_for_pass``, ``fold_onnx``,
  ``save_onnx``; a plain model is folded on its protobuf, :mod:`bnfold.passes.onnx.direct`);
* onnxscript's BN rewrite rules, onnxoptimizer's ``fuse_bn_into_conv`` and onnxslim, each
  ``onnx.load`` + rewrite + ``onnx.save``; ONNX Runtime's basic-level optimize-and-save
  (``optimized_model_filepath``).

Each time is the best of :data:`REPEAT` runs; the table gives bnfold's time over the fastest
peer's (and which peer that is) and over ONNX Runtime's, with the medians, and the time of
bnfold's reading and writing alone (``load_for_pass`` + ``save_onnx``, no fold: the checks
and the durable atomic write, two ``fsync`` calls, that every route pays) over the fastest
peer's, the floor under the first ratio. Table: stdout and benchmarks/out/onnx_zoo.md.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from benchmarks.bench_onnx_fold import OUT, PEERS, TESTS, _ort_optimize_file, _table

REPEAT = 10


def _bnfold(src: Path, dst: Path) -> None:
    from bnfold.io.fileio import load_for_pass, save_onnx
    from bnfold.passes.onnx.fold import fold_onnx

    save_onnx(fold_onnx(load_for_pass(src)).model, dst)


def _bnfold_io(src: Path, dst: Path) -> None:
    """bnfold's read and write of ``src`` with no fold between (the floor under a fold)."""
    from bnfold.io.fileio import load_for_pass, save_onnx

    save_onnx(load_for_pass(src), dst)


def _via_proto(rewrite: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[Path, Path],
                                                                                  None]:
    def run(src: Path, dst: Path) -> None:
        onnx.save(rewrite(onnx.load(str(src))), str(dst))
    return run


def _onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        onnxslim.slim(str(src), str(dst))


TOOLS: dict[str, Callable[[Path, Path], None]] = {
    "bnfold": _bnfold,
    "onnxscript": _via_proto(PEERS["onnxscript"]),
    "onnxoptimizer": _via_proto(PEERS["onnxoptimizer"]),
    "onnxruntime": _ort_optimize_file,
    "onnxslim": _onnxslim,
}


def _best(run: Callable[[Path, Path], None], src: Path, dst: Path, repeat: int = REPEAT
          ) -> float | None:
    """Best of ``repeat`` runs, or ``None`` when the tool fails on this model."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run(src, dst)
        except Exception:  # a peer that crashes on a model is left out of that row
            return None
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class Ratios:
    """Per model: bnfold's time over the fastest peer's and over ONNX Runtime's, and its
    reading and writing alone (the floor) over the fastest peer's; and their medians."""

    to_fastest: list[float] = field(default_factory=list)
    to_ort: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)

    def add(self, ours: float, peers: dict[str, float], src: Path, dst: Path,
            repeat: int = REPEAT) -> tuple[str, list[str]]:
        """Record one model (``peers``: each peer's time); the fastest peer and the cells."""
        fastest = min(peers, key=peers.__getitem__)
        floor = _best(_bnfold_io, src, dst, repeat)
        assert floor is not None  # (bnfold read and wrote this model just before)
        ort = peers.get("onnxruntime")
        self.to_fastest.append(ours / peers[fastest])
        self.floors.append(floor / peers[fastest])
        if ort is not None:
            self.to_ort.append(ours / ort)
        return fastest, [f"{ours / peers[fastest]:.2f}",
                         "-" if ort is None else f"{ours / ort:.2f}", f"{self.floors[-1]:.2f}"]

    def medians(self) -> list[str]:
        return [f"{statistics.median(x):.2f}" for x in (self.to_fastest, self.to_ort,
                                                          self.floors)]


def exporters() -> dict[str, Callable[[torch.nn.Module, torch.Tensor], onnx.ModelProto]]:
    """The two exports the tests fold, by name, each keeping every BN (tests/
    test_onnx_reach.py): TorchScript with ``TrainingMode.PRESERVE``, dynamo with
    ``optimize=False``."""
    sys.path.insert(0, str(TESTS))
    from test_onnx_reach import dynamo_export, torchscript_export

    return {"TorchScript": torchscript_export, "dynamo": dynamo_export}


def zoo_speed() -> str:
    from bnfold.models import reach, rep, zoo

    sources = [(zoo, n) for n in zoo.ZOO] + [(reach, n) for n in reach.REACH] + \
        [(rep, n) for n in rep.PATTERNS]
    rows = [["model (export)", "bnfold ms", "fastest peer", "bnfold / fastest peer",
             "bnfold / ORT basic", "bnfold read+write alone / fastest peer"]]
    ratios = Ratios()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        for source, name in sources:
            torch.manual_seed(0)
            model, x = source.get(name), source.example_input(name)
            for label, export in exporters().items():
                onnx.save(export(model, x), str(src))
                times = {tool: _best(run, src, dst) for tool, run in TOOLS.items()}
                ours = times.pop("bnfold")
                peers = {t: s for t, s in times.items() if s is not None}
                if ours is None or not peers:
                    continue
                fastest, cells = ratios.add(ours, peers, src, dst)
                rows.append([f"{name} ({label})", f"{ours * 1e3:.1f}", fastest, *cells])
    rows.append(["**median**", "", "", *ratios.medians()])
    return _table(rows)


def main() -> None:
    body = zoo_speed()
    text = f"## ONNX fold time per zoo model, file to file (ratios)\n\n{body}\n"
    print(text, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "onnx_zoo.md").write_text("# bnfold ONNX fold time per zoo model\n\n" + text)


if __name__ == "__main__":
    main()
