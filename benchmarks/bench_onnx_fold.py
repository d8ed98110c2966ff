"""bnfold's ONNX fold beside its peers: ``python -m benchmarks.bench_onnx_fold [--big]``.

1. Correctness on known failure cases of ONNX folders (benchmarks/onnx_fold_cases.py), side by side
   with onnxscript's BN fusion rules, onnxoptimizer's ``fuse_bn_into_conv``, ONNX Runtime's own
   fusions (basic level, written out with ``optimized_model_filepath``) and onnxslim: who
   folds exactly, who is wrong, who writes an invalid model, who crashes.
2. Speed, as ratios: folding a generated ResNet-50-size model (25M parameters, 53 BN) file to
   file against ``onnx.load`` + ``onnx.save`` of the same file and against ONNX Runtime's
   basic-level optimize-and-save; fold time of each peer at 300 to 10k nodes (table, and a PNG
   plot with matplotlib); then fold time per node at 1k, 10k and 100k nodes beside
   ``onnx.load`` + ``onnx.save`` per node (the one table with absolute times), and what any
   Python fold of the 100k-node file pays before its own work (``onnx.checker``, reading
   the nodes, indexing the initializers, writing the new tensors), over load + save.
3. Peak RSS of load + fold + save on an external-data model, over the model's size (300 MB by
   default, 3 GB with ``--big``), each in a fresh process, above that process's import baseline;
   beside it the floor of a peer that loads the model whole (onnxscript, ONNX Runtime).
4. Start-up: wall time of ``bnfold --help`` and ``bnfold inspect`` of a 3-node model, each in a
   fresh process (best of 5), beside ``python -c "import onnx_ir"`` (what a dry run that read
   the model through onnx-ir would pay first).

Tables go to stdout and benchmarks/out/onnx_fold.md. Times are ratios, except the per-node table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.onnx_fold_cases import CASES, Case

OUT = Path(__file__).resolve().parent / "out"
TESTS = Path(__file__).resolve().parent.parent / "tests"


# ------------------------------------------------------------------------------ peers

def _bnfold(m: onnx.ModelProto) -> onnx.ModelProto:
    from bnfold.passes.onnx.fold import fold_onnx

    return fold_onnx(m).model


def _onnxscript(m: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
             fuse_batchnorm_into_gemm_rule]
    return rewrite(m, pattern_rewrite_rules=rules)


def _onnxoptimizer(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])


def _ort(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def _onnxslim(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return onnxslim.slim(m)


PEERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "bnfold": _bnfold, "onnxscript": _onnxscript, "onnxoptimizer": _onnxoptimizer,
    "onnxruntime": _ort, "onnxslim": _onnxslim,
}


# ------------------------------------------------------------------------------ correctness

def _judge(case: Case, original: onnx.ModelProto, result: onnx.ModelProto) -> str:
    """One cell: ``folded``/``kept`` when right, ``WRONG``/``INVALID``/``missed`` otherwise."""
    from onnx_cases import count, feeds, reference, rel_err, run_ort

    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as exc:
        return f"INVALID ({_first_line(exc)[:40]})"
    before, after = count(original), count(result)
    if case.expect == "keep":
        if after < before:
            return "WRONG: folded"
        return "kept (ok)"
    if after == before:
        return "missed"
    if not _weights_finite(result):
        return "WRONG: non-finite weights"
    x = feeds(original)
    if case.reference is not None:
        want = case.reference(original, next(iter(x.values())))
    else:
        want = reference(original, x)
    dtype = original.graph.input[0].type.tensor_type.elem_type
    try:
        if dtype == TensorProto.BFLOAT16:
            err, tol = rel_err(reference(result, x), want), 8e-3
        else:
            err = rel_err(run_ort(result, x), want)
            tol = 5e-3 if dtype == TensorProto.FLOAT16 else 1e-5
    except Exception as exc:
        return f"INVALID (runs: {_first_line(exc)[:40]})"
    if err > tol:
        return f"WRONG (err {err:.1e})"
    if case.name.startswith("fp16 Conv+BN"):
        try:
            return f"folded, {_fp16_ulps(original, result):.2g} ulp"
        except LookupError as exc:
            return f"folded ({exc})"
    return "folded (ok)"


def _weights_finite(m: onnx.ModelProto) -> bool:
    return all(np.all(np.isfinite(numpy_helper.to_array(t).astype(np.float64)))
               for t in m.graph.initializer if t.data_type in (1, 10, 11, 16))


def _fp16_ulps(original: onnx.ModelProto, result: onnx.ModelProto) -> float:
    """Max distance, in fp16 ulps, of the folded conv weight from the exact float64 fold."""
    a = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer}
    s = a["y_scale"] / np.sqrt(a["y_var"] + 1e-5)
    exact = a["w"] * s[:, None, None, None]
    conv = next(n for n in result.graph.node if n.op_type == "Conv")
    got = _constant(result, conv.input[1]).astype(np.float64)
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    return float(np.max(np.abs(got - exact) / ulp))


def _constant(m: onnx.ModelProto, name: str) -> np.ndarray:
    """The constant behind ``name``: an initializer, a Constant node, or a Cast of one."""
    for t in m.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    node = next(n for n in m.graph.node if name in n.output)
    if node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "Cast":  # ONNX Runtime inserts fp16 -> fp32 casts
        return _constant(m, node.input[0])
    raise LookupError(f"weight computed by a {node.op_type} node at run time")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def correctness() -> str:
    sys.path.insert(0, str(TESTS))
    rows = [["case", "must", *PEERS]]
    for case in CASES:
        row = [case.name, case.expect]
        for tool in PEERS.values():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = tool(case.build())
            except Exception as exc:
                row.append(f"CRASH ({_first_line(exc)[:40]})")
                continue
            row.append(_judge(case, case.build(), result))
        rows.append(row)
    return _table(rows)


# ------------------------------------------------------------------------------ speed

def chain_model(blocks: int, channels: int, kernel: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Conv -> BN -> Relu, ``blocks`` times (3 nodes per block), fp32, random statistics."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        w = rng.normal(0, 0.05, (channels, channels, kernel, kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        for name, arr in (("s", rng.random(channels) + 0.5), ("b", rng.normal(0, .5, channels)),
                          ("m", rng.normal(0, .5, channels)), ("v", rng.random(channels) + .3)):
            inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{name}{i}"))
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}",
                             pads=[kernel // 2] * 4),
            helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                             [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ort_optimize_file(src: Path, dst: Path) -> None:
    """ONNX Runtime's own basic-level optimize-and-save, file to file (its BN fusions)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def speed() -> str:
    from bnfold.io.fileio import load_for_pass, save_onnx
    from bnfold.passes.onnx.fold import fold_onnx

    rows = [["measure", "ratio"]]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "r50.onnx", Path(tmp) / "out.onnx"
        model = chain_model(53, 228)  # 53 x 228*228*9 = 24.8M parameters, 53 BN
        onnx.save(model, src)
        del model
        base = _best(lambda: onnx.save(onnx.load(str(src)), str(dst)))
        ort_time = _best(lambda: _ort_optimize_file(src, Path(tmp) / "ort.onnx"))

        def fold_file() -> None:  # the CLI's route: bnfold fold src -o dst (onnx.checker too)
            save_onnx(fold_onnx(load_for_pass(src)).model, dst)

        def fold_api() -> None:  # the API's: fold_onnx(path), tensors read lazily, no checker
            save_onnx(fold_onnx(src).model, dst)

        def fold_only() -> None:
            fold_onnx(load_for_pass(src))

        ours, api = _best(fold_file), _best(fold_api)
        rows.append(["ResNet-50 size (24.8M params, 53 BN): bnfold fold (CLI route: checks, "
                     "load, fold, save) / onnx.load+save", f"{ours / base:.2f}"])
        rows.append(["  of which load+fold (no save) / onnx.load+save",
                     f"{_best(fold_only) / base:.2f}"])
        rows.append(["ResNet-50 size: CLI route / ONNX Runtime basic optimize-and-save",
                     f"{ours / ort_time:.2f}"])
        rows.append(["ResNet-50 size: save_onnx(fold_onnx(path)) (API, no onnx.checker) / "
                     "onnx.load+save", f"{api / base:.2f}"])
        rows.append(["ResNet-50 size: save_onnx(fold_onnx(path)) / ONNX Runtime basic "
                     "optimize-and-save", f"{api / ort_time:.2f}"])
        onnx.save(_off_the_fast_path(chain_model(53, 228)), src)
        ort_time = _best(lambda: _ort_optimize_file(src, Path(tmp) / "ort.onnx"))
        rows.append(["ResNet-50 size, a model the fast path leaves (onnx-ir's passes): CLI "
                     "route / ONNX Runtime basic optimize-and-save",
                     f"{_best(fold_file) / ort_time:.2f}"])
    return _table(rows)


def _off_the_fast_path(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with an ``Identity`` between its first Conv and BN (a no-op the onnx-ir
    passes look through and the protobuf fast path does not take)."""
    conv = model.graph.node[0]
    out = conv.output[0]
    conv.output[0] = f"{out}_pre"
    model.graph.node.insert(1, helper.make_node("Identity", [conv.output[0]], [out]))
    return model


def scale() -> str:
    """Fold time against graph size: Conv(1x1)+BN+Relu chains of 1k, 10k and 100k nodes, file
    to file (the CLI's route), beside a plain ``onnx.load`` + ``onnx.save`` of the same file,
    and bnfold's reading and writing alone (``load_for_pass`` + ``save_onnx``, no fold: the
    checks, ``onnx.checker`` and the durable write), the floor under the fold's ratio."""
    from bnfold.io.fileio import load_for_pass, save_onnx
    from bnfold.passes.onnx.fold import fold_onnx

    rows = [["nodes", "bnfold file to file, us/node", "onnx.load+save, us/node",
             "bnfold / load+save", "bnfold read+write alone / load+save"]]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "chain.onnx", Path(tmp) / "out.onnx"
        for nodes in (1_000, 10_000, 100_000):
            onnx.save(chain_model(nodes // 3, 8, kernel=1), src)
            repeat = 3 if nodes < 100_000 else 1
            base = _best(lambda: onnx.save(onnx.load(str(src)), str(dst)), repeat)
            ours = _best(lambda: save_onnx(fold_onnx(load_for_pass(src)).model, dst), repeat)
            floor = _best(lambda: save_onnx(load_for_pass(src), dst), repeat)
            rows.append([f"{nodes:,}", f"{ours / nodes * 1e6:.0f}", f"{base / nodes * 1e6:.1f}",
                         f"{ours / base:.1f}", f"{floor / base:.1f}"])
    return _table(rows)


def floor() -> str:
    """What any fold of the 100k-node chain in Python pays before its own work, each step over
    ``onnx.load`` + ``onnx.save`` of the file (best of 3): ``onnx.checker``, reading every
    node's op, domain, inputs and outputs, indexing the initializers by name, and writing one
    new weight and one new bias per block into a new graph (the nodes but the BNs copied)."""
    rows = [["step (100k-node chain)", "time / onnx.load+save"]]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "chain.onnx", Path(tmp) / "out.onnx"
        blocks = 100_000 // 3
        onnx.save(chain_model(blocks, 8, kernel=1), src)
        base = _best(lambda: onnx.save(onnx.load(str(src)), str(dst)))
        model = onnx.load(str(src))
        graph = model.graph
        weight, bias = np.zeros((8, 8, 1, 1), np.float32).tobytes(), bytes(32)

        def walk() -> None:
            for node in graph.node:
                _ = node.op_type, node.domain, list(node.input), list(node.output)

        def write() -> None:
            out = onnx.GraphProto()
            out.node.extend(n for n in graph.node if n.op_type != "BatchNormalization")
            for i in range(blocks):
                for name, dims, data in ((f"w{i}", (8, 8, 1, 1), weight), (f"b{i}", (8,), bias)):
                    t = out.initializer.add()
                    t.name, t.data_type, t.raw_data = name, TensorProto.FLOAT, data
                    t.dims.extend(dims)
        steps = {"onnx.checker.check_model": lambda: onnx.checker.check_model(model),
                 "read every node's op and names": walk,
                 "index the initializers by name":
                     lambda: {t.name: t for t in graph.initializer},
                 "write the folded weights and biases": write}
        total = 1.0
        for step, fn in steps.items():
            ratio = _best(fn) / base
            total += ratio
            rows.append([step, f"{ratio:.2f}"])
        rows.append(["load + save + the above", f"{total:.2f}"])
    return _table(rows)


SIZES = (300, 1_000, 3_000, 10_000)
BUDGET_S = 5.0  # a tool slower than this at one size is not timed at the larger ones


def scaling() -> str:
    """Fold time of each peer at several graph sizes (Conv -> BN -> Relu chains), as ratios to
    bnfold's time at the smallest size; plotted to benchmarks/out/fold_scaling.png. A tool
    that takes more than :data:`BUDGET_S` at one size is not run at the larger ones."""
    from benchmarks.plots import fold_time_vs_size

    models = {n: chain_model(n // 3, 8, kernel=1) for n in SIZES}
    times: dict[str, dict[int, float]] = {}
    for tool, fn in PEERS.items():
        by_size: dict[int, float] = {}
        try:
            for n, m in models.items():
                first = _best(lambda m=m, fn=fn: fn(m), repeat=1)  # also warms up imports
                by_size[n] = first if first > BUDGET_S else min(
                    first, _best(lambda m=m, fn=fn: fn(m), repeat=1))
                if by_size[n] > BUDGET_S:
                    break
        except Exception as exc:  # a peer that is not installed or fails: left out, said so
            print(f"{tool}: left out of the scaling plot ({_first_line(exc)})", flush=True)
        if by_size:
            times[tool] = by_size
    unit = times["bnfold"][SIZES[0]]
    rows = [["tool", *(f"{n} nodes" for n in SIZES)]]
    rows += [[tool, *(f"{by[n] / unit:.1f}" if n in by else f"not run (> {BUDGET_S:g} s before)"
                      for n in SIZES)] for tool, by in times.items()]
    note = fold_time_vs_size(times, OUT / "fold_scaling.png")
    return (f"{_table(rows)}\n\nfold time (ModelProto in and out) / bnfold's at {SIZES[0]} "
            f"nodes; {note}")


# ------------------------------------------------------------------------------ memory

# Peak from /proc's VmHWM (this process's own memory map): ru_maxrss would inherit the
# parent's peak through vfork + exec.
_RSS_CHILD = """
import sys
from bnfold.io.fileio import save_onnx
from bnfold.passes.onnx.fold import fold_onnx
if sys.argv[1] == "fold":
    folded, report = fold_onnx(sys.argv[2])
    save_onnx(folded, sys.argv[3])
    assert len(report.folded) == int(sys.argv[4]), report.table()
elif sys.argv[1] == "whole":  # how onnxscript and ORT see it: the model loaded whole
    import onnx
    onnx.save(onnx.load(sys.argv[2]), sys.argv[3], save_as_external_data=True)
hwm = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(int(hwm.split()[1]) * 1024)
"""


def write_external_model(path: Path, total_bytes: int, blocks: int = 32) -> int:
    """A Conv+BN chain of about ``total_bytes`` of weights, written tensor by tensor to
    external data (never whole in memory); returns the number of BNs."""
    import onnx_ir as ir

    from bnfold.io.fileio import save_onnx

    channels = int((total_bytes / (4 * 9 * blocks)) ** 0.5)
    proto = chain_model(blocks, 4, kernel=3)
    model = ir.serde.deserialize_model(proto)
    rng = np.random.default_rng(0)
    for i in range(blocks):
        shape = (channels, channels, 3, 3)
        model.graph.initializers[f"w{i}"].const_value = ir.LazyTensor(
            lambda s=shape, k=i: ir.Tensor(np.random.default_rng(k).normal(
                0, 0.05, s).astype(np.float32)), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))
        for name in "sbmv":
            arr = (rng.random(channels) + 0.5).astype(np.float32)
            model.graph.initializers[f"{name}{i}"].const_value = ir.Tensor(arr)
    model.graph.inputs[0].shape = ir.Shape([1, channels, 8, 8])
    save_onnx(model, path)  # streams the lazy weights to <name>.<hash>.data one at a time
    return blocks


def memory(big: bool) -> str:
    from bnfold.io.external_data import files_named_by

    size = 3 * 1024**3 if big else 300 * 1024**2
    rows = [["external-data model, load (+fold) + save", "peak RSS / model size",
             "peak RSS above an import-only process / model size"]]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "ext.onnx", Path(tmp) / "out.onnx"
        n_bn = write_external_model(src, size)
        data = sum(p.stat().st_size for p in files_named_by(src))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))

        def peak(mode: str) -> int:
            return int(subprocess.run(
                [sys.executable, "-c", _RSS_CHILD, mode, str(src), str(dst), str(n_bn)],
                check=True, capture_output=True, text=True, env=env).stdout.split()[-1])

        fold, imports = peak("fold"), peak("imports")
        rows.append([f"bnfold: {data / 1024**2:.0f} MB, {n_bn} Conv+BN (all folded)",
                     f"{fold / data:.2f}", f"{(fold - imports) / data:.2f}"])
        whole = peak("whole")
        rows.append(["peer's floor: onnx.load (data loaded whole) + onnx.save, no fold",
                     f"{whole / data:.2f}", f"{(whole - imports) / data:.2f}"])
    return _table(rows)


# ------------------------------------------------------------------------------ start-up

def startup() -> str:
    """Wall seconds of each command in a fresh process, best of 5 (absolute: these goals
    are absolute)."""
    rows = [["command (fresh process)", "wall s, best of 5", "goal"]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.onnx"
        model = chain_model(1, 4)
        onnx.save(model, path)
        bnfold = [sys.executable, "-m", "bnfold.cli"]
        for label, argv, goal in (
                ("bnfold --help", [*bnfold, "--help"], "<= 0.3 s"),
                (f"bnfold inspect ({len(model.graph.node)}-node model)",
                 [*bnfold, "inspect", str(path)], "<= 0.7 s"),
                ('python -c "import onnx_ir"', [sys.executable, "-c", "import onnx_ir"], "")):
            seconds = _best(lambda argv=argv: subprocess.run(
                argv, check=True, capture_output=True), repeat=5)
            rows.append([label, f"{seconds:.2f}", goal])
    return _table(rows)


# ------------------------------------------------------------------------------ main

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    fmt.insert(1, " | ".join("-" * w for w in widths))
    return "\n".join(f"| {line} |" for line in fmt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="3 GB external-data model")
    args = parser.parse_args(argv or [])
    sections = [("Correctness on the known failure cases of ONNX folders", correctness),
                ("Speed (ratios)", speed),
                ("Fold time vs graph size (ratios)", scaling),
                ("Fold time against graph size", scale),
                ("What a Python fold of 100k nodes pays before its own work", floor),
                ("Memory", lambda: memory(args.big)),
                ("Start-up", startup)]
    write_sections("onnx_fold.md", "bnfold ONNX fold benchmark", sections)


def write_sections(name: str, title: str, sections: list[tuple[str, Callable[[], str]]]
                   ) -> None:
    """Run each section's table, print it under its heading as it comes, and write them all
    to benchmarks/out/``name`` under ``title``."""
    text = []
    for heading, fn in sections:
        block = f"## {heading}\n\n{fn()}\n"
        print(block, flush=True)
        text.append(block)
    OUT.mkdir(exist_ok=True)
    (OUT / name).write_text(f"# {title}\n\n" + "\n".join(text))


if __name__ == "__main__":
    main(sys.argv[1:])
