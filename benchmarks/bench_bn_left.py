"""BN left after folding, per zoo model: ``python -m benchmarks.bench_bn_left``.

Every model of :mod:`bnfold.models.zoo` and :mod:`bnfold.models.reach` is exported twice with
its BNs kept (torch's dynamo exporter with ``optimize=False``, the TorchScript exporter with
``TrainingMode.PRESERVE`` at opset 17) and folded by bnfold and by the ONNX peers of
:mod:`benchmarks.bench_onnx_fold`. A cell is ``dynamo / TorchScript``: how many BN-like sites
are left (``BatchNormalization`` nodes and constant per-channel or scalar affine chains,
counted with ``bnfold.inspect_onnx``), with ``WRONG`` when the result differs from the
unfolded model in float64 by more than 1e-4, ``crash`` when the tool raised. ``expected`` is
the model's ``bn_left``: what an exact folder must leave. Table: stdout and
benchmarks/out/bn_left.md.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import torch

from benchmarks.bench_onnx_fold import PEERS, TESTS, _table

TOLERANCE = 1e-4


def _sites_left(model: onnx.ModelProto) -> int:
    from bnfold.passes.onnx.fold import inspect_onnx

    return len(inspect_onnx(model).entries)


def _cell(tool: Callable[[onnx.ModelProto], onnx.ModelProto], proto: onnx.ModelProto,
          want: list[np.ndarray], feeds: dict[str, np.ndarray]) -> str:
    """``sites left`` in ``tool(proto)``, or ``WRONG ...``/``crash (...)``."""
    from onnx_cases import rel_err, run_ort

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = tool(proto)
        err = rel_err(run_ort(result, feeds), want)
    except Exception as exc:
        return f"crash ({type(exc).__name__})"
    left = str(_sites_left(result))
    return left if err < TOLERANCE else f"WRONG {left} (err {err:.1e})"


def bn_left() -> str:
    sys.path.insert(0, str(TESTS))
    from onnx_cases import reference
    from test_onnx_reach import dynamo_export, torchscript_export

    from bnfold.models import reach, zoo

    rows = [["model", "expected", *PEERS]]
    models = [(zoo, name, zoo.ZOO[name]) for name in zoo.ZOO] + \
        [(reach, name, reach.REACH[name]) for name in reach.REACH]
    for source, name, entry in models:
        model, x = source.get(name), source.example_input(name)
        cells: dict[str, list[str]] = {tool: [] for tool in PEERS}
        for export in (dynamo_export, torchscript_export):
            proto = export(model, x)
            feeds = {proto.graph.input[0].name: x.numpy()}
            try:
                with torch.no_grad():
                    out = model.double()(x.double())
                want = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
            except RuntimeError:  # the model casts to float32 itself
                want = reference(proto, feeds)
            model.float()
            for tool, fn in PEERS.items():
                cells[tool].append(_cell(fn, proto, want, feeds))
        rows.append([name, str(entry.bn_left), *(" / ".join(c) for c in cells.values())])
    return _table(rows)


def main() -> None:
    from benchmarks.bench_onnx_fold import OUT

    body = bn_left()
    text = f"## BN left after folding (dynamo / TorchScript export)\n\n{body}\n"
    print(text, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "bn_left.md").write_text("# BN left after folding\n\n" + text)


if __name__ == "__main__":
    main()
