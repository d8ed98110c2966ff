"""BN left after folding, per zoo model: ``python -m benchmarks.bench_bn_left``.

Every model of :mod:`bnfold.models.zoo` and :mod:`bnfold.models.reach` and the branch patterns
of :mod:`bnfold.models.rep`, one row each, one column per folder:

* ``bnfold FX`` and ``torch.fx fuse``: the torch model folded by ``bnfold.fold`` and by
  torch.fx's ``fuse``; BN-like sites left in the graph (BN calls, ``F.batch_norm`` and constant
  per-channel affine chains, found by bnfold's own FX recognizers);
* ``bnfold ONNX (dynamo)`` / ``(TorchScript)``: the model exported with its BNs kept (torch's
  dynamo exporter with ``optimize=False``; the TorchScript exporter with
  ``TrainingMode.PRESERVE`` at opset 17), folded by ``bnfold.fold_onnx``;
* the ONNX peers of :mod:`benchmarks.bench_onnx_fold` (onnxscript's BN rewrite rules,
  onnxoptimizer ``fuse_bn_into_conv``, onnxslim, ONNX Runtime ``ORT_ENABLE_BASIC``), each cell
  ``dynamo / TorchScript``; BN-like sites left (``BatchNormalization`` nodes and constant
  per-channel or scalar affine chains, counted with ``bnfold.inspect_onnx``).

A count is followed by ``WRONG (err ...)`` when the result differs from the unfolded model in
float64 (on a fresh input for FX, on the export's input for ONNX) by more than 1e-4, and a cell
is ``crash (...)`` when the tool raised. ``expected`` is the model's ``bn_left`` (for the rep
patterns :data:`REP_LEFT`): what an exact folder must leave. Table: stdout and
benchmarks/out/bn_left.md.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

import bnfold
from benchmarks.bench_fx_fold import _rel_err
from benchmarks.bench_onnx_fold import PEERS, TESTS, _table
from bnfold.passes.fx.model_copy import deep_copy

TOLERANCE = 1e-4
ONNX_PEERS = {"onnxscript": "onnxscript", "onnxoptimizer": "onnxoptimizer",
              "onnxslim": "onnxslim", "onnxruntime": "ORT basic"}
#: What an exact fold (no branch merging) leaves in the :mod:`bnfold.models.rep` patterns: the
#: identity-branch BNs and MobileOne's per-channel scale branch (a constant affine chain), each
#: reading an activation and feeding the branch sum, so no layer is next to it, and RepViT's BN
#: after the sum (a GELU follows it; merged, the sum is a conv it folds into). ``--merge-branches``
#: removes them all.
REP_LEFT = {"repvgg_stage": 2, "mobileone_block": 3, "repvit_mixer": 1}
COLUMNS = ["model", "bnfold FX", "bnfold ONNX (dynamo)", "bnfold ONNX (TorchScript)",
           *ONNX_PEERS.values(), "torch.fx fuse", "expected"]


def fx_sites_left(model: nn.Module) -> int:
    """BN calls and BN-like affine chains in ``model``'s graph (traced if not a graph)."""
    from bnfold.passes.fx.affine import affine_chains
    from bnfold.passes.fx.constants import Constants
    from bnfold.passes.fx.sites import is_batchnorm
    from bnfold.passes.fx.trace import Tracer

    gm = model if isinstance(model, fx.GraphModule) else fx.GraphModule(
        model, Tracer().trace(deep_copy(model)))
    bns = sum(is_batchnorm(gm, n) for n in gm.graph.nodes)
    return bns + len(affine_chains(gm, Constants(gm)))


def onnx_sites_left(model: onnx.ModelProto) -> int:
    from bnfold.passes.onnx.fold import inspect_onnx

    return len(inspect_onnx(model).entries)


def _cell(run: Callable[[], Any], error: Callable[[Any], float],
          left: Callable[[Any], int]) -> str:
    """``left(run())``, with ``WRONG (err ...)`` past the tolerance, or ``crash (...)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run()
        err = error(result)
    except Exception as exc:  # a folder crashing is a result to report
        return f"crash ({type(exc).__name__})"
    count = str(left(result))
    return count if err < TOLERANCE else f"WRONG {count} (err {err:.1e})"


def _fx_cells(source: Any, name: str) -> tuple[str, str]:
    """``bnfold FX`` and ``torch.fx fuse`` cells, judged on a fresh input."""
    model = source.get(name)
    ref = deep_copy(model).double()
    example, fresh = source.example_input(name), source.example_input(name, seed=7)

    def error(folded: nn.Module) -> float:
        return _rel_err(folded, ref, fresh)

    ours = _cell(lambda: bnfold.fold(model, example).model, error, fx_sites_left)
    return ours, _cell(lambda: fuse(model), error, fx_sites_left)


def _onnx_cells(source: Any, name: str) -> dict[str, list[str]]:
    """One cell per export (dynamo, TorchScript) for bnfold and each ONNX peer."""
    from onnx_cases import reference, rel_err, run_ort
    from test_onnx_reach import dynamo_export, torchscript_export

    model, x = source.get(name), source.example_input(name)
    cells: dict[str, list[str]] = {tool: [] for tool in ("bnfold", *ONNX_PEERS)}
    for export in (dynamo_export, torchscript_export):
        proto = export(model, x)
        feeds = {proto.graph.input[0].name: x.numpy()}
        try:
            with torch.no_grad():
                out = deep_copy(model).double()(x.double())
            want = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        except RuntimeError:  # the model casts to float32 itself
            want = reference(proto, feeds)

        def error(result: onnx.ModelProto, want: list[np.ndarray] = want,
                  feeds: dict[str, np.ndarray] = feeds) -> float:
            return rel_err(run_ort(result, feeds), want)

        for tool in cells:
            cells[tool].append(_cell(lambda fn=PEERS[tool], p=proto: fn(p), error,
                                     onnx_sites_left))
    return cells


def bn_left() -> str:
    sys.path.insert(0, str(TESTS))
    from bnfold.models import reach, rep, zoo

    rows = [COLUMNS]
    models = [(zoo, name, zoo.ZOO[name].bn_left) for name in zoo.ZOO] + \
        [(reach, name, reach.REACH[name].bn_left) for name in reach.REACH] + \
        [(rep, name, REP_LEFT[name]) for name in rep.PATTERNS]
    for source, name, expected in models:
        torch.manual_seed(0)
        fx_ours, fx_fuse = _fx_cells(source, name)
        onnx_cells = _onnx_cells(source, name)
        dynamo, torchscript = onnx_cells.pop("bnfold")
        rows.append([name, fx_ours, dynamo, torchscript,
                     *(" / ".join(c) for c in onnx_cells.values()), fx_fuse,
                     str(expected)])
    return _table(rows)


def main() -> None:
    from benchmarks.bench_onnx_fold import OUT

    body = bn_left()
    text = ("## BN left after folding (peer ONNX cells: dynamo / TorchScript export)\n\n"
            f"{body}\n")
    print(text, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "bn_left.md").write_text("# BN left after folding\n\n" + text)


if __name__ == "__main__":
    main()
