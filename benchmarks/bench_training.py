"""Does inserting BatchNorm help training? ``python -m benchmarks.bench_training``.

Trains BN-free nets from ``bnfold.models.plain`` on scikit-learn's bundled 8x8 digits (no
download): a small CNN and two deep MLPs with saturating activations (8 sigmoid / 8 tanh
layers), each

* as written (no BN),
* after ``bnfold.insert_bn`` (BN before each activation, head left alone),
* with the same BNs written by hand in the model code,

with SGD (momentum 0.9) at a normal learning rate and at 10x and 100x it, over several seeds.
The inserted and hand-written nets start from the same weights (BN construction draws no random
numbers) and see the same batches, so their loss curves must be identical; the table says
whether they were. Writes ``benchmarks/out/training.md`` and prints it, and the loss curves
with and without inserted BN to ``benchmarks/out/training.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from benchmarks.plots import training_curves
from bnfold.models import plain
from bnfold.training_demo import Digits, load_digits

OUT = Path(__file__).parent / "out" / "training.md"
MODELS = {"cnn": "digits_cnn", "mlp_sigmoid": "deep_mlp_sigmoid", "mlp_tanh": "deep_mlp_tanh"}
VARIANTS = ("plain", "inserted", "hand-written")


@dataclass
class Run:
    losses: list[float]
    steps_to_target: int | None
    test_acc: float
    diverged: bool


def build(model: str, variant: str, seed: int, example: torch.Tensor) -> nn.Module:
    """The net for ``variant``: plain, plain + ``bnfold.insert_bn``, or the hand-written twin."""
    name = MODELS[model]
    if variant == "hand-written":
        return plain.get(name, seed=seed, twin=True)
    net = plain.get(name, seed=seed)
    if variant == "inserted":
        net, _ = bnfold.insert_bn(net, example_inputs=example)
    return net


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    acc = (net(x).argmax(1) == y).float().mean().item()
    net.train()
    return acc


def train(net: nn.Module, data: Digits, *, lr: float, steps: int, seed: int,
          batch: int = 64, target: float = 0.9, eval_every: int = 10) -> Run:
    """SGD with momentum; same batch order for every variant of a seed."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    reached: int | None = None
    net.train()
    for step in range(1, steps + 1):
        if len(order) < batch:
            order = torch.randperm(len(data.x_train), generator=gen)
        idx, order = order[:batch], order[batch:]
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        if not math.isfinite(loss.item()):
            return Run(losses, reached, float("nan"), diverged=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if reached is None and step % eval_every == 0 and \
                accuracy(net, data.x_test, data.y_test) >= target:
            reached = step
    acc = accuracy(net, data.x_test, data.y_test)
    return Run(losses, reached, acc, diverged=not math.isfinite(acc))


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    if len(finite) == 1:
        return f"{finite[0]:.3f}"
    return f"{statistics.mean(finite):.3f} ± {statistics.stdev(finite):.3f}"


def _steps(values: list[int | None]) -> str:
    hit = sorted(v for v in values if v is not None)
    if not hit:
        return f"never (0/{len(values)})"
    return f"{statistics.median(hit):g} ({len(hit)}/{len(values)})"


def run_all(lrs: dict[str, float], steps: int, seeds: list[int], target: float,
            log: Callable[[str], None], curves: dict[tuple[str, str], dict[str, Any]] | None = None,
            ) -> tuple[list[list[str]], list[str]]:
    data = load_digits()
    rows: list[list[str]] = []
    findings: list[str] = []
    tail = max(1, steps // 15)
    for model, base_lr in lrs.items():
        example = data.x_train[:4] if model == "cnn" else data.x_train[:4].flatten(1)
        by_lr: dict[float, dict[str, list[Run]]] = {}
        for factor in (1, 10, 100):
            lr = base_lr * factor
            runs: dict[str, list[Run]] = {v: [] for v in VARIANTS}
            for seed in seeds:
                for variant in VARIANTS:
                    net = build(model, variant, seed, example)
                    runs[variant].append(train(net, data, lr=lr, steps=steps, seed=seed,
                                               target=target))
            same = sum(a.losses == b.losses for a, b in
                       zip(runs["inserted"], runs["hand-written"], strict=True))
            for variant in VARIANTS:
                rs = runs[variant]
                rows.append([
                    model, f"{lr:g} ({factor}x)", variant,
                    _mean_sd([statistics.mean(r.losses[-tail:]) if not r.diverged
                              else float("nan") for r in rs]),
                    _steps([r.steps_to_target for r in rs]),
                    _mean_sd([r.test_acc for r in rs]),
                    f"{sum(r.diverged for r in rs)}/{len(rs)}",
                    f"{same}/{len(seeds)}" if variant == "inserted" else "",
                ])
            findings.append(_finding(model, lr, factor, runs, len(seeds)))
            by_lr[lr] = runs
            if curves is not None:  # loss curves for the plot (plots.training_curves)
                curves[(model, f"{lr:g} ({factor}x)")] = {
                    v: [r.losses for r in runs[v]] for v in ("plain", "inserted")}
            log(f"{model} lr={lr:g}: done")
        findings.append(_best_lr_finding(model, by_lr))
    return rows, findings


def _mean_acc(runs: list[Run]) -> float:
    finite = [r.test_acc for r in runs if math.isfinite(r.test_acc)]
    return statistics.mean(finite) if len(finite) == len(runs) else float("nan")


def _best_lr_finding(model: str, by_lr: dict[float, dict[str, list[Run]]]) -> str:
    """Each variant at its own best learning rate: a tuned baseline, not one shared LR."""
    parts = []
    for variant in ("plain", "inserted"):
        accs = {lr: _mean_acc(runs[variant]) for lr, runs in by_lr.items()}
        finite = {lr: a for lr, a in accs.items() if math.isfinite(a)}
        if not finite:
            parts.append(f"{variant} diverged at every LR")
            continue
        lr = max(finite, key=lambda k: finite[k])
        parts.append(f"{variant} {finite[lr]:.3f} (lr {lr:g})")
    return (f"{model}, each variant at its best LR of those tried: test accuracy "
            f"{' vs '.join(parts)}.")


def _finding(model: str, lr: float, factor: int, runs: dict[str, list[Run]], n: int) -> str:
    """One line per setting, from the numbers only: who reached the target, who learned less."""
    def acc(v: str) -> float:
        finite = [r.test_acc for r in runs[v] if math.isfinite(r.test_acc)]
        return statistics.mean(finite) if finite else float("nan")

    def hit(v: str) -> int:
        return sum(r.steps_to_target is not None for r in runs[v])

    def stuck(v: str) -> int:  # not better than chance (10 classes) at the end
        return sum(r.diverged or r.test_acc < 0.2 for r in runs[v])

    line = (f"{model} at lr {lr:g} ({factor}x): test accuracy plain {acc('plain'):.3f} vs "
            f"inserted {acc('inserted'):.3f}; reached the target plain {hit('plain')}/{n}, "
            f"inserted {hit('inserted')}/{n}; at chance or diverged plain {stuck('plain')}/{n}, "
            f"inserted {stuck('inserted')}/{n}.")
    if acc("plain") > acc("inserted"):
        line += " Here the net without BN did better."
    return line


def markdown(rows: list[list[str]], findings: list[str], steps: int, seeds: list[int],
             target: float, seconds: float) -> str:
    head = ["model", "LR", "variant", f"train loss after {steps} steps",
            f"steps to {target:.0%} test acc (median, runs that got there)", "test accuracy",
            "diverged", "curve == hand-written"]
    lines = [
        "# Training with and without inserted BatchNorm (scikit-learn digits)",
        "",
        f"SGD momentum 0.9, batch 64, {steps} steps, seeds {seeds}; mean ± sd over seeds. "
        f"Train loss = mean of the last {max(1, steps // 15)} batches. Test accuracy in eval "
        f"mode on a fixed 20% split (360 images), checked every 10 steps for the target. "
        f"Run time {seconds:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "## Per setting",
        "",
        *(f"- {f}" for f in findings),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=0.01, help="the normal learning rate")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    curves: dict[tuple[str, str], dict[str, Any]] = {}
    rows, findings = run_all({m: args.lr for m in args.models}, args.steps,
                             list(range(args.seeds)), args.target,
                             log=lambda s: print(s, flush=True), curves=curves)
    text = markdown(rows, findings, args.steps, list(range(args.seeds)), args.target,
                    time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(training_curves(curves, args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
