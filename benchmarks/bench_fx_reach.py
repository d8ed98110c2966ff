"""BN left after the FX fold on the reach zoo: ``python -m benchmarks.bench_fx_reach``.

For every :mod:`bnfold.models.reach` model (one BN spelling or structure each, with the count
of BN-like sites an exact folder must leave): ``bnfold.fold`` and torch.fx's ``fuse``, each
judged on the BN-like sites left in the graph (BN modules, ``F.batch_norm`` calls and
constant per-channel affine chains, found by bnfold's own recognizers) and on the max
relative error against the unfolded model in float64 on a fresh input. Writes
benchmarks/out/fx_reach.md.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

import bnfold
from benchmarks.bench_fx_fold import WRONG, _rel_err
from bnfold.models import reach
from bnfold.passes.fx.affine import affine_chains
from bnfold.passes.fx.constants import Constants
from bnfold.passes.fx.sites import is_batchnorm
from bnfold.passes.fx.trace import Tracer

OUT = Path(__file__).parent / "out" / "fx_reach.md"


def bn_like_left(model: nn.Module) -> int:
    """BN calls and BN-like affine chains in ``model``'s graph (traced if not a graph)."""
    gm = model if isinstance(model, fx.GraphModule) else fx.GraphModule(
        model, Tracer().trace(copy.deepcopy(model)))
    bns = sum(is_batchnorm(gm, n) for n in gm.graph.nodes)
    return bns + len(affine_chains(gm, Constants(gm)))


def _judge(run, ref: nn.Module, x: torch.Tensor, want: int) -> str:
    try:
        folded = run()
    except Exception as exc:  # a peer crashing is a result to report
        return f"crash: {type(exc).__name__}"
    err, left = _rel_err(folded, ref, x), bn_like_left(folded)
    verdict = "WRONG" if err > WRONG else ("ok" if left == want else "ok, missed")
    return f"{verdict} ({left} left, err {err:.1e})"


def reach_table() -> list[str]:
    rows = ["| model | BN-like sites | exact folder leaves | bnfold.fold | torch.fx fuse |",
            "| --- | --- | --- | --- | --- |"]
    for name, entry in reach.REACH.items():
        model = reach.get(name)
        ref = copy.deepcopy(model).double()
        example, fresh = reach.example_input(name), reach.example_input(name, seed=7)
        ours = _judge(lambda m=model, e=example: bnfold.fold(m, e).model, ref, fresh,
                      entry.bn_left)
        peer = _judge(lambda m=model: fuse(m), ref, fresh, entry.bn_left)
        rows.append(f"| {name} | {entry.bn_total} | {entry.bn_left} | {ours} | {peer} |")
    return rows


def main() -> None:
    torch.manual_seed(0)
    text = "\n".join(["# FX fold reach: BN left after folding", "", *reach_table(), ""])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
