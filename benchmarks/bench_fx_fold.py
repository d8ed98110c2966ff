"""bnfold's FX fold beside torch.fx's own ``fuse``: ``python -m benchmarks.bench_fx_fold``.

For every zoo model, in one process: ``bnfold.fold`` and
``torch.fx.experimental.optimization.fuse`` (the peer torch ships), each judged on

* BN left in the graph (a correct, exact folder leaves ``ZOO[name].bn_left``),
* max relative error of the folded fp32 model against the unfolded model in float64, on a
  fresh input (a wrong fold shows as an error far above fp32 rounding, ~1e-7),
* fold time as a ratio (bnfold / fuse; median of several runs, the two tools' runs taken in
  alternation so that load on a shared machine falls on both alike).

Then fp16 and bf16 weights: worst distance of each tool's folded conv weight from the exact
float64 fold, in ulps (a correctly rounded fold is <= 0.5). Writes benchmarks/out/fx_fold.md.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import bnfold
from bnfold.models import zoo

OUT = Path(__file__).parent / "out" / "fx_fold.md"
WRONG = 1e-4  # a relative error above this is a wrong fold, not rounding


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel_err(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        out, want = model(x), ref(x.double())
    outs = out if isinstance(out, tuple) else (out,)
    wants = want if isinstance(want, tuple) else (want,)
    return max(float((o.double() - w).abs().max() / w.abs().max())
               for o, w in zip(outs, wants, strict=True))


def judge_alternately(runs: dict[str, Callable[[], nn.Module]], ref: nn.Module,
                      x: torch.Tensor, want_left: int, repeat: int = 5
                      ) -> dict[str, tuple[str, float | None]]:
    """Time every tool of ``runs`` in alternation, one run of each per round with the order
    reversed every other round, so load that comes and goes on a shared machine falls on all
    of them alike; then judge each tool's last result. Per tool: ``(verdict, median
    seconds)``, ``(crash: ..., None)`` for a tool that raised."""
    times: dict[str, list[float]] = {tool: [] for tool in runs}
    results: dict[str, nn.Module] = {}
    crashed: dict[str, str] = {}
    for round_ in range(repeat):
        for tool in list(runs) if round_ % 2 == 0 else list(reversed(runs)):
            if tool in crashed:
                continue
            start = time.perf_counter()
            try:
                results[tool] = runs[tool]()
            except Exception as exc:  # a peer crashing is a result to report
                crashed[tool] = f"crash: {type(exc).__name__}"
                continue
            times[tool].append(time.perf_counter() - start)
    judged: dict[str, tuple[str, float | None]] = {}
    for tool in runs:
        if tool in crashed:
            judged[tool] = (crashed[tool], None)
            continue
        err, left = _rel_err(results[tool], ref, x), _bn_count(results[tool])
        verdict = "WRONG" if err > WRONG else ("ok" if left == want_left else "ok, missed")
        judged[tool] = (f"{verdict} ({left} BN left, err {err:.1e})",
                        statistics.median(times[tool]))
    return judged


def zoo_table() -> list[str]:
    rows = ["| model | expected BN left | bnfold.fold | torch.fx fuse | time bnfold / fuse |",
            "| --- | --- | --- | --- | --- |"]
    ratios = []
    for name, entry in zoo.ZOO.items():
        model = zoo.get(name)
        ref = copy.deepcopy(model).double()
        example, fresh = zoo.example_input(name, seed=1), zoo.example_input(name, seed=7)
        (ours, t_ours), (peer, t_peer) = judge_alternately(
            {"bnfold": lambda m=model, e=example: bnfold.fold(m, e).model,
             "fuse": lambda m=model: fuse(m)}, ref, fresh, entry.bn_left).values()
        ratio = f"{t_ours / t_peer:.2f}x" if t_ours and t_peer else "-"
        if t_ours and t_peer:
            ratios.append(t_ours / t_peer)
        rows.append(f"| {name} | {entry.bn_left} | {ours} | {peer} | {ratio} |")
    rows.append(f"| **median** | | | | {statistics.median(ratios):.2f}x |")
    return rows


def _ulps(weight: torch.Tensor, exact: torch.Tensor) -> float:
    err = (weight.double() - exact).abs()
    ulp = torch.tensor(torch.finfo(weight.dtype).eps, dtype=torch.float64) * torch.exp2(
        torch.floor(torch.log2(weight.double().abs().clamp_min(1e-30))))
    return float((err / ulp).max())


@torch.no_grad()
def low_precision_table() -> list[str]:
    rows = ["| dtype | bnfold.fold (ulp) | torch.fx fuse (ulp) |", "| --- | --- | --- |"]
    for dtype in (torch.float16, torch.bfloat16):
        low = zoo.get("plain_cnn").to(dtype)
        conv, bn = low.features[0], low.features[1]
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        exact = conv.weight.double() * scale[:, None, None, None]
        ours = bnfold.fold(low, zoo.example_input("plain_cnn").to(dtype)).model
        peer = fuse(low)
        rows.append(f"| {str(dtype).removeprefix('torch.')} "
                    f"| {_ulps(ours.get_parameter('features.0.weight'), exact):.2f} "
                    f"| {_ulps(peer.get_parameter('features.0.weight'), exact):.2f} |")
    return rows


def main() -> None:
    torch.manual_seed(0)
    text = "\n".join(["# FX fold: bnfold vs torch.fx fuse", "", *zoo_table(), "",
                      "## fp16 / bf16 folded weights: worst distance from the exact fold", "",
                      *low_precision_table(), ""])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
