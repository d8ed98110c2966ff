"""``bnfold demo``: the main job end to end on a built-in zoo model.

1. fold the model's BNs in its torch.fx graph and check the folded model against the unfolded
   one evaluated in float64 on fresh random inputs;
2. export the unfolded model to ONNX with BN kept, fold it with the ONNX pass, and validate
   original vs folded in ONNX Runtime (CPU, and CUDA when present);
3. insert BN into a BN-free net, train it a few epochs on scikit-learn's digits, fold, compare.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

import bnfold
from bnfold.errors import BadInputError
from bnfold.models import zoo


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def fold_section(model_name: str) -> dict[str, Any]:
    """Fold ``model_name`` with the FX pass; compare with float64 on fresh inputs."""
    model = zoo.get(model_name)
    x = zoo.example_input(model_name, seed=1234, batch=8)
    folded, report = bnfold.fold(model, zoo.example_input(model_name))
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        out = folded(x)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    err = max(_rel_err(o, r) for o, r in zip(outs, refs, strict=True))
    left = len(report.kept)
    return {"model": model_name, "report": report, "max_rel_err_vs_float64": err,
            "bn_left": left, "bn_left_expected": zoo.ZOO[model_name].bn_left}


def onnx_section(model_name: str, workdir: Path) -> dict[str, Any]:
    """Export with BN kept, fold the ONNX graph, validate both in ONNX Runtime."""
    from bnfold.exporter import export_unfolded

    model = zoo.get(model_name)
    x = zoo.example_input(model_name, seed=99)
    src = workdir / f"{model_name}.onnx"
    export_unfolded(model, (x,), src)
    folded, report = bnfold.fold_onnx(src)
    dst = workdir / f"{model_name}.folded.onnx"
    from bnfold.io.fileio import save_onnx

    save_onnx(folded, dst)
    result = bnfold.validate(src, dst, providers=("cpu", "cuda"))
    return {"report": report, "validation": result}


def run_demo(model: str = "resnet_small", as_json: bool = False, train: bool = True) -> int:
    """Run the demo; print tables (or one JSON document); return the process exit code."""
    from rich.console import Console

    if model not in zoo.ZOO:
        raise BadInputError(f"unknown zoo model {model!r}; choose from {', '.join(zoo.ZOO)}")
    console = Console(stderr=as_json, soft_wrap=True)
    console.rule(f"[bold]1. fold {model} in its torch.fx graph")
    fx = fold_section(model)
    console.out(fx["report"].table(), highlight=False)
    console.print(
        f"folded model vs unfolded model in float64: max relative error "
        f"{fx['max_rel_err_vs_float64']:.2e}; BN left {fx['bn_left']} "
        f"(expected {fx['bn_left_expected']})"
    )
    ok = fx["max_rel_err_vs_float64"] < 1e-5 and fx["bn_left"] == fx["bn_left_expected"]

    console.rule(f"[bold]2. export {model} to ONNX with BN, fold it, validate in ONNX Runtime")
    with tempfile.TemporaryDirectory() as tmp:
        ox = onnx_section(model, Path(tmp))
    console.out(ox["report"].table(), highlight=False)
    console.out(ox["validation"].table(), highlight=False)
    ok = ok and ox["validation"].passed

    training: dict[str, Any] | None = None
    if train:
        console.rule("[bold]3. insert BN into a BN-free net, train on digits, fold, compare")
        if importlib.util.find_spec("sklearn") is None:
            console.print("skipped: needs scikit-learn for its bundled digits "
                          "(pip install 'bnfold[test]')")
        else:
            from bnfold.training_demo import run_training_demo

            training = run_training_demo(console=console)
            ok = ok and bool(training.get("ok", True))

    if as_json:
        doc = {
            "ok": ok,
            "fx_fold": {**{k: v for k, v in fx.items() if k != "report"},
                        "report": fx["report"].to_dict()},
            "onnx_fold": {"report": ox["report"].to_dict(),
                          "validation": ox["validation"].to_dict()},
            "training": training,
        }
        print(json.dumps(doc, indent=2, default=str, allow_nan=False))
    console.rule("[bold green]demo passed" if ok else "[bold red]demo FAILED")
    return 0 if ok else 1
