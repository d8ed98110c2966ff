"""Branch merging in ONNX Runtime: ``python -m benchmarks.bench_reparam``.

For each re-parameterizable pattern of :mod:`bnfold.models.rep` (a RepVGG-style stage, a
MobileOne-style block with k = 3 over-parameterized branches and a scale branch, a RepViT-style
depthwise token mixer with identity), in one process, four ONNX models of the same function:

(a) the export with its branches (``torch.onnx.export``, dynamo, ``optimize=False``: BN kept),
(b) (a) after ``bnfold.fold_onnx`` (BN folding alone),
(c) (a) after ``bnfold.reparameterize_onnx`` (branches merged, then BN folded),
(d) the export of the model written directly in its merged deploy form (``rep.deploy``).

Latency: ONNX Runtime CPU, ``ORT_ENABLE_ALL``, one intra-op thread, batch 1; the four run
interleaved for many short rounds and each gets its fastest round (on a shared, loaded machine
other processes only ever add time, so the minimum is the stable estimate). Ratios are to (d).
Error: max |out - ref| / max |ref| against the unfolded torch model in float64 on the same
input. Writes benchmarks/out/reparam.md and, with matplotlib (``bench`` extra), the latencies
as bars to benchmarks/out/reparam.png (copied to docs/img/ for the README).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import bnfold
from benchmarks.plots import latency_bars
from bnfold.exporter import export_unfolded
from bnfold.models import rep

OUT = Path(__file__).parent / "out" / "reparam.md"
SHAPE = (1, 3, 128, 128)
ROUNDS, RUNS = 40, 5
VARIANTS = ("(a) export with branches", "(b) bnfold fold", "(c) fold + merge branches",
            "(d) deploy form")


def _export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "m.onnx"
        export_unfolded(model, (x,), path)
        return onnx.load(path)


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    for _ in range(RUNS):
        sess.run(None, feed)
    return (time.perf_counter() - start) / RUNS * 1e3


def bench(name: str) -> dict[str, object]:
    model = rep.get(name)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    exported = _export(model, x)
    models = [exported, bnfold.fold_onnx(exported).model,
              bnfold.reparameterize_onnx(exported).model, _export(rep.deploy(model), x)]
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    feed = {"x": x.numpy()}
    sessions = [_session(m) for m in models]
    errors = [float(np.abs(s.run(None, feed)[0] - ref).max() / np.abs(ref).max())
              for s in sessions]
    for s in sessions:
        _ms(s, feed)  # warm-up
    rounds: list[list[float]] = [[] for _ in sessions]
    for _ in range(ROUNDS):
        for i, s in enumerate(sessions):
            rounds[i].append(_ms(s, feed))
    ms = [min(r) for r in rounds]
    counts = [(sum(n.op_type == "Conv" for n in m.graph.node),
               sum(n.op_type == "BatchNormalization" for n in m.graph.node)) for m in models]
    return {"name": name, "ms": ms, "errors": errors, "counts": counts}


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [bench(name) for name in rep.PATTERNS]
    lines = [
        f"ONNX Runtime {ort.__version__} CPU, ORT_ENABLE_ALL, 1 thread, input {list(SHAPE)}; "
        f"fastest of {ROUNDS} interleaved rounds of {RUNS} runs; ratio = latency / (d); error = "
        "max relative error vs the unfolded model in float64. Run time "
        f"{time.perf_counter() - start:.0f} s.", "",
        "| model | variant | Conv / BN nodes | latency (ms) | ratio to (d) | error vs float64 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, errors, counts = r["ms"], r["errors"], r["counts"]
        for i, variant in enumerate(VARIANTS):
            lines.append(f"| {r['name'] if i == 0 else ''} | {variant} | {counts[i][0]} / "
                         f"{counts[i][1]} | {ms[i]:.3f} | {ms[i] / ms[3]:.2f} | "
                         f"{errors[i]:.1e} |")
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(text)
    ms = {str(r["name"]): list(r["ms"]) for r in rows}  # type: ignore[call-overload]
    print(latency_bars(ms, VARIANTS, OUT.with_suffix(".png"),
                       f"ONNX Runtime CPU, 1 thread, input {list(SHAPE)}: latency (bars) "
                       "and ratio to (d)"))


if __name__ == "__main__":
    main()
