"""The ``bnfold`` command through real subprocesses: every subcommand, every exit code, the
bad-input corpus, and the JSON report's schema. A few in-process checks cover wiring only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import HAS_CUDA_EP
from onnx import helper, numpy_helper

from bnfold.cli import commands as cli

FOLD_KEYS = {"schema", "input", "output", "fold", "validation", "written", "passed"}
REPORT_KEYS = {"pass", "changed", "counts", "entries", "notes"}
VALIDATION_KEYS = {"schema", "passed", "reference", "candidate", "settings", "inputs", "notes",
                   "runs", "failures"}
RUN_KEYS = {"provider", "comparison", "status", "ran_on", "required", "passed", "outputs"}
OUTPUT_KEYS = {"output", "dtype", "shape", "atol", "rtol", "tol_dtype", "max_abs", "max_rel",
               "cosine", "worst", "passed"}


def check_validation_schema(doc: dict) -> None:
    assert doc.keys() >= VALIDATION_KEYS and doc["schema"] == "bnfold.validation/1"
    assert {"providers", "require", "samples", "seed", "ort_graph_optimizations", "atol", "rtol",
            "tolerance_rule", "compute_dtype"} <= doc["settings"].keys()
    assert all({"name", "dtype", "shape", "source"} <= i.keys() for i in doc["inputs"])
    for run in doc["runs"]:
        assert run.keys() >= RUN_KEYS and run["status"] in ("ran", "unavailable")
        assert isinstance(run["passed"], bool) and isinstance(run["ran_on"], list)
        if run["status"] == "unavailable":
            assert "not available" in run["note"] or "cannot run" in run["note"]
            assert run["outputs"] == []
        for out in run["outputs"]:
            assert out.keys() >= OUTPUT_KEYS
            assert all(isinstance(out[k], (int, float)) for k in ("atol", "rtol", "cosine"))
            assert out["tol_dtype"] in ("float16", "bfloat16", "float32", "float64", "given")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def models(tmp_path, conv_bn_proto, hand_folded) -> dict[str, Path]:
    ref = conv_bn_proto()
    wrong = hand_folded(ref)
    w = numpy_helper.to_array(wrong.graph.initializer[0]).copy()
    w[2, 1, 1, 1] += 1e-3
    wrong.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    paths = {"a": tmp_path / "a.onnx", "wrong": tmp_path / "wrong.onnx"}
    onnx.save(ref, paths["a"])
    onnx.save(wrong, paths["wrong"])
    return paths


def test_version_help_and_usage_errors(run_cli, models, tmp_path):
    assert run_cli("--version").stdout.startswith("bnfold ")
    res = run_cli("--help")
    assert res.returncode == 0 and "fold" in res.stdout and "exit codes" in res.stdout
    a = models["a"]
    usage = [[], ["validate", "a.onnx"], ["validate", "a", "b", "--dim", "batch"],
             ["validate", a, a, "--atol", "nan"], ["validate", a, a, "--rtol", "-1"],
             ["validate", a, a, "--atol", "inf"]]
    bad = [["validate", a, a, "--samples", "0"], ["demo", "--model", "no_such_model"],
           ["fold", a], ["fold", a, "-o", tmp_path / "o.onnx", "--report", a],
           ["validate", a, a, "--report", tmp_path], ["inspect", a, "--report", a]]
    for args, res in zip(usage + bad, run_cli.many(usage + bad), strict=True):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and res.stdout == "", (args, res.stdout)
        assert "Traceback" not in res.stderr and "error: " in lines[-1], args
        if args in bad:
            assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), (args, lines)
    assert not (tmp_path / "o.onnx").exists() and digest(a) == digest(models["a"])


def test_fold_validate_report_and_json_schema(run_cli, models, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    res = run_cli("fold", models["a"], "-o", out, "--validate", "--providers", "cpu",
                  "--dim", "batch=3", "--report", rep)
    assert res.returncode == 0, res.stderr
    assert "folded" in res.stdout and "validation PASSED" in res.stdout and out.exists()
    doc = json.loads(rep.read_text())
    assert doc.keys() >= FOLD_KEYS and doc["schema"] == "bnfold.fold/1"
    assert doc["written"] is True and doc["passed"] is True
    assert doc["fold"].keys() >= REPORT_KEYS and doc["fold"]["counts"]["folded"] == 1
    entry = doc["fold"]["entries"][0]
    assert (entry["bn"], entry["action"], entry["into"]) == ("bn", "folded", "conv")
    check_validation_schema(doc["validation"])
    assert doc["validation"]["inputs"][0]["shape"] == [3, 3, 8, 8]
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu"]
    # --json: one JSON document on stdout, nothing else; fold without validation.
    res = run_cli("fold", models["a"], "-o", tmp_path / "o2.onnx", "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["validation"] is None and doc["written"] is True


def test_inspect_table_and_json(run_cli, models):
    res = run_cli("inspect", models["a"])
    assert res.returncode == 0 and "bn" in res.stdout and "conv" in res.stdout
    assert "would fold" in res.stdout and "1 would fold" in res.stdout  # a dry run says so
    doc = json.loads(run_cli("inspect", models["a"], "--json").stdout)
    assert doc["schema"] == "bnfold.inspect/1" and doc["report"].keys() >= REPORT_KEYS
    assert doc["report"]["dry_run"] is True and doc["report"]["changed"] is False


def test_validate_exit_codes(run_cli, models, tmp_path):
    good = tmp_path / "good.onnx"
    assert run_cli("fold", models["a"], "-o", good).returncode == 0
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    a, wrong = models["a"], models["wrong"]
    passed, failed, loose, given, required, cuda_only = run_cli.many([
        ["validate", a, good, "--providers", "cpu"],
        ["validate", a, wrong, "--json", "--samples", "2"],
        # An explicit loose tolerance lets the same wrong model through: the flags are honoured.
        ["validate", a, wrong, "--atol", "1", "--rtol", "0", "--providers", "cpu"],
        ["validate", a, good, "--inputs", tmp_path / "x.npz", "--json", "--providers", "cpu"],
        ["validate", a, good, "--require", "cuda"],
        ["validate", a, wrong, "--providers", "cuda", "--json"],
    ])
    assert passed.returncode == 0 and "validation PASSED" in passed.stdout
    doc = json.loads(failed.stdout)
    assert failed.returncode == 1 and doc["passed"] is False and doc["failures"]
    check_validation_schema(doc)
    assert doc["settings"]["samples"] == 2
    assert loose.returncode == 0
    assert given.returncode == 0 and json.loads(given.stdout)["inputs"][0]["shape"] == [5, 3, 8, 8]
    if not HAS_CUDA_EP:
        assert required.returncode == 1 and "FAIL (required)" in required.stdout
        # --providers cuda alone still runs the CPU EP: a validation never compares nothing.
        doc = json.loads(cuda_only.stdout)
        assert [r["status"] for r in doc["runs"]] == ["ran", "unavailable"]
        assert cuda_only.returncode == 1 and doc["passed"] is False


def test_fold_refuses_output_equal_to_input_unless_in_place(run_cli, models):
    before = digest(models["a"])
    res = run_cli("fold", models["a"], "-o", models["a"])
    assert res.returncode == 2 and "--in-place" in res.stderr and digest(models["a"]) == before
    res = run_cli("fold", models["a"], "-o", models["a"], "--in-place", "--json")
    assert res.returncode == 0 and digest(models["a"]) != before
    assert [n.op_type for n in onnx.load(models["a"]).graph.node] == ["Conv", "Relu"]


def test_failed_validation_writes_no_output(run_cli, models, tmp_path, monkeypatch):
    # "fold" of an already-wrong model validates against itself and passes; to see exit 1 we
    # validate a fold with tolerances no float computation can meet.
    out = tmp_path / "out.onnx"
    res = run_cli("fold", models["a"], "-o", out, "--validate", "--atol", "0", "--rtol", "0",
                  "--providers", "cpu", "--report", tmp_path / "r.json")
    assert res.returncode == 1 and not out.exists() and "not written" in res.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["written"] is False and doc["validation"]["passed"] is False


def _corpus(tmp_path: Path, good: Path) -> dict[str, Path]:
    """Files a user passes where an ONNX model is expected, each wrong in its own way."""
    import torch

    torch.save({"w": torch.ones(3)}, tmp_path / "checkpoint.onnx")  # zip archive
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "arrays.npz", x=np.ones(3))
    (tmp_path / "adir").mkdir()
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(good.read_bytes()[:300])
    rand = tmp_path / "random.onnx"
    rand.write_bytes(np.random.default_rng(0).bytes(600))
    tensor = tmp_path / "tensor.onnx"
    tensor.write_bytes(numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString())
    opset = tmp_path / "opset99.onnx"
    m = onnx.load(good)
    m.opset_import[0].version = 99
    onnx.save(m, opset)
    ort_bad = tmp_path / "ort_cannot_load.onnx"
    m = onnx.load(good)
    m.graph.node[2].op_type, m.graph.node[2].domain = "Foo", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(m, ort_bad)
    old = tmp_path / "opset6.onnx"
    m = onnx.load(good)
    m.opset_import[0].version = 6
    onnx.save(m, old)
    return {"missing": tmp_path / "missing.onnx", "directory": tmp_path / "adir",
            "truncated": trunc, "random": rand, "tensor": tensor, "opset": opset,
            "opset6": old, "ort": ort_bad, "torch zip": tmp_path / "checkpoint.onnx",
            "torch pickle": tmp_path / "legacy.pt", "npz": tmp_path / "arrays.npz"}


def test_bad_input_corpus(run_cli, models, tmp_path):
    corpus = _corpus(tmp_path, models["a"])
    before = {k: digest(p) for k, p in corpus.items() if p.is_file()}
    commands, kinds = [], []
    for kind, path in corpus.items():
        out = tmp_path / f"out_{kind}.onnx"
        # The ORT-unloadable model folds fine; it is bad input once ORT must run it.
        cmds = [["fold", path, "-o", out] + (["--validate", "--providers", "cpu"]
                                             if kind == "ort" else [])]
        if kind in ("missing", "random", "opset", "ort", "torch zip"):
            cmds.append(["validate", models["a"], path, "--providers", "cpu", "--json"])
        if kind in ("directory", "opset", "opset6", "torch zip", "torch pickle", "npz"):
            cmds.append(["inspect", path, "--json"])
        commands += cmds
        kinds += [kind] * len(cmds)
    inspected = {}
    for kind, cmd, res in zip(kinds, commands, run_cli.many(commands), strict=True):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (kind, cmd[0], res.stderr)
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), (kind, lines)
        assert "Traceback" not in res.stderr and not (tmp_path / f"out_{kind}.onnx").exists()
        assert "--json" not in cmd or res.stdout == ""
        if cmd[0] == "inspect":
            inspected[kind] = lines[0]
    assert {k: digest(p) for k, p in corpus.items() if p.is_file()} == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert "opset 99" in inspected["opset"] and "opset 6" in inspected["opset6"]
    assert "zip archive" in inspected["torch zip"] and "zip archive" in inspected["npz"]
    assert "Python pickle" in inspected["torch pickle"]
    assert "is a directory" in inspected["directory"]


def test_folder_continues_past_failures_and_summarises(run_cli, models, tmp_path):
    src = tmp_path / "models"
    (src / "sub").mkdir(parents=True)
    (src / "one.onnx").write_bytes(models["a"].read_bytes())
    (src / "sub" / "two.onnx").write_bytes(models["a"].read_bytes())
    (src / "broken.onnx").write_bytes(b"garbage")
    out = tmp_path / "folded"
    res = run_cli("fold", src, "-o", out, "--json", "--validate", "--providers", "cpu")
    doc = json.loads(res.stdout)
    assert res.returncode == 2 and doc["schema"] == "bnfold.fold-folder/1"
    assert doc["summary"] == {"files": 3, "ok": 2, "validation_failed": 0, "bad_input": 1}
    assert (out / "one.onnx").exists() and (out / "sub" / "two.onnx").exists()
    assert not (out / "broken.onnx").exists()
    (src / "broken.onnx").unlink()
    res = run_cli("fold", src, "-o", out)
    assert res.returncode == 0 and "2 files: 2 ok" in res.stdout
    assert run_cli("fold", src, "-o", src).returncode == 2


def test_insert_subcommand(run_cli, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=1)], "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "W"),
         numpy_helper.from_array(np.zeros(3, np.float32), "B")])
    src, out = tmp_path / "mlp.onnx", tmp_path / "mlp_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    res = run_cli("insert", src, "-o", out, "--json", "--include-last")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnfold.insert/1" and out.exists()
    assert "BatchNormalization" in [n.op_type for n in onnx.load(out).graph.node]
    assert run_cli("insert", src, "-o", src).returncode == 2


def test_demo_wiring_and_unexpected_errors_in_process(monkeypatch, capsys):
    import bnfold.demo

    seen = {}
    monkeypatch.setattr(bnfold.demo, "run_demo", lambda **kw: seen.update(kw) or 0)
    assert cli.main(["demo", "--model", "plain_cnn", "--json"]) == 0
    assert seen == {"model": "plain_cnn", "as_json": True, "train": True}
    assert cli.main(["demo", "--skip-training"]) == 0
    assert seen == {"model": "resnet_small", "as_json": False, "train": False}

    def boom(args):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(cli, "cmd_inspect", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _rewire(parser(), boom))
    assert cli.main(["inspect", "x.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: RuntimeError: something unexpected" in err[0]


def _rewire(parser, func):
    parser.set_defaults()
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices["inspect"].set_defaults(func=func)
    return parser


def test_json_is_the_only_thing_on_stdout(run_cli, models, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "m.onnx").write_bytes(models["a"].read_bytes())
    a, wrong = models["a"], models["wrong"]
    commands = {
        "fold": ["fold", a, "-o", tmp_path / "f.onnx", "--validate", "--providers", "cpu"],
        "folder": ["fold", tmp_path / "dir", "-o", tmp_path / "out", "--validate"],
        "inspect": ["inspect", a],
        "validate": ["validate", a, wrong, "--providers", "cpu", "--samples", "1"],
        "insert": ["insert", a, "-o", tmp_path / "i.onnx"],
    }
    results = run_cli.many([[*c, "--json"] for c in commands.values()])
    for name, res in zip(commands, results, strict=True):
        assert res.returncode == (1 if name == "validate" else 0), (name, res.stderr)
        doc = json.loads(res.stdout)  # the whole of stdout is one JSON document
        assert doc["schema"].startswith("bnfold."), name
        assert "Traceback" not in res.stderr


def test_write_failures_leave_no_partial_or_temp_file(models, tmp_path, monkeypatch, capsys):
    import errno

    from bnfold.io import staged_save

    def disk_full(model, f, **_):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staged_save, "write_model", disk_full)  # an onnx-ir model
    monkeypatch.setattr(staged_save, "write_proto", disk_full)  # a ModelProto (fast path)
    out = tmp_path / "out" / "m.onnx"
    assert cli.main(["fold", str(models["a"]), "-o", str(out), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bnfold: error: {out}: could not write (No space left on device)"] or (
        len(err) == 1 and "No space left on device" in err[0])
    assert not out.parent.exists()  # (nor the folder made for it)
    monkeypatch.undo()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(staged_save.tempfile, "mkstemp", denied)
    for argv in (["fold", str(models["a"]), "-o", str(out)],
                 ["inspect", str(models["a"]), "--report", str(tmp_path / "r.json")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Permission denied" in err[0] and "internal" not in err[0]
    assert not out.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_on_the_output_folder(run_cli, models, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    res = run_cli("fold", models["a"], "-o", locked / "m.onnx")
    assert res.returncode == 2 and "Permission denied" in res.stderr
    assert list(locked.iterdir()) == []


def test_outputs_get_normal_file_modes_and_in_place_keeps_the_mode(run_cli, models, tmp_path):
    out, rep = tmp_path / "new" / "out.onnx", tmp_path / "r.json"  # a missing folder is made
    assert run_cli("fold", models["a"], "-o", out, "--report", rep).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(rep.stat().st_mode) == 0o666 & ~umask
    models["a"].chmod(0o640)
    assert run_cli("fold", models["a"], "--in-place").returncode == 0
    assert stat.S_IMODE(models["a"].stat().st_mode) == 0o640
    assert [n.op_type for n in onnx.load(models["a"]).graph.node] == ["Conv", "Relu"]


def test_fold_validate_of_an_external_data_model_from_another_folder(run_cli, conv_bn_proto,
                                                                    tmp_path):
    ref = conv_bn_proto()
    ref.graph.node[-1].output[0] = "r"  # a weight the fold leaves external
    ref.graph.node.append(helper.make_node("Mul", ["r", "S"], ["y"]))
    ref.graph.initializer.append(numpy_helper.from_array(np.full((6, 1, 1), 2.0, np.float32),
                                                         "S"))
    (tmp_path / "m").mkdir()
    onnx.save_model(ref, tmp_path / "m" / "a.onnx", save_as_external_data=True,
                    location="a.data", size_threshold=0)
    res = run_cli("fold", "m/a.onnx", "-o", "m/b.onnx", "--validate", "--providers", "cpu",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "b.onnx").exists()


def test_folder_skips_its_own_outputs_and_records_internal_errors(models, tmp_path,
                                                                  monkeypatch, capsys):
    src = tmp_path / "models"
    (src / "deep" / "er").mkdir(parents=True)
    for rel in ("one.onnx", "deep/er/two.onnx", "three.onnx"):
        (src / rel).write_bytes(models["a"].read_bytes())
    (src / "README.txt").write_text("not a model")
    out = src / "folded"  # inside the input folder
    assert cli.main(["fold", str(src), "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["files"] == 3
    assert cli.main(["fold", str(src), "-o", str(out), "--json"]) == 0  # not 6 files
    assert json.loads(capsys.readouterr().out)["summary"]["files"] == 3
    shutil.rmtree(out)
    from bnfold.io import fileio

    def flaky(real):
        def load(path):
            if "three" in str(path):
                raise RuntimeError("a bug in a pass")
            return real(path)
        return load

    for loader in ("load_checked", "load_for_pass"):  # (what the CLI folds reads)
        monkeypatch.setattr(fileio, loader, flaky(getattr(fileio, loader)))
    assert cli.main(["fold", str(src), "--in-place", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"] == {"files": 3, "ok": 2, "validation_failed": 0, "bad_input": 1}
    bad = next(r for r in doc["results"] if r["exit_code"] == 2)
    assert bad["input"].endswith("three.onnx") and "internal error: RuntimeError" in bad["error"]
    assert [n.op_type for n in onnx.load(src / "one.onnx").graph.node] == ["Conv", "Relu"]


def test_insert_options(run_cli, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="fc2", transB=1)], "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.ones((5, 4), np.float32), "W1"),
         numpy_helper.from_array(np.zeros(5, np.float32), "B1"),
         numpy_helper.from_array(np.ones((3, 5), np.float32), "W2"),
         numpy_helper.from_array(np.zeros(3, np.float32), "B2")])
    src = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    o = {k: tmp_path / f"{k}.onnx" for k in ("default", "all", "after", "only", "bad", "train")}
    results = run_cli.many([
        ["insert", src, "-o", o["default"], "--json"],
        ["insert", src, "-o", o["all"], "--no-skip-last", "--eps", "1e-3", "--momentum", "0.2",
         "--drop-bias", "--json"],
        ["insert", src, "-o", o["after"], "--position", "after_activation", "--json"],
        ["insert", src, "-o", o["only"], "--include-last", "--include", "fc2", "--exclude",
         "fc1", "--json"],
        ["insert", src, "-o", o["bad"], "--momentum", "2"],
        ["insert", src, "-o", o["train"], "--training-mode", "--json"],
    ])
    assert [r.returncode for r in results] == [0, 0, 0, 0, 2, 0], [r.stderr for r in results]

    def bns(path: Path) -> list[onnx.NodeProto]:
        return [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]

    def after(path: Path) -> list[str]:  # what each BN reads
        nodes = onnx.load(path).graph.node
        producer = {out: n.name for n in nodes for out in n.output}
        return [producer[n.input[0]] for n in bns(path)]

    assert after(o["default"]) == ["fc1"]  # skip-last by default
    assert sorted(after(o["all"])) == ["fc1", "fc2"]
    attrs = {a.name: a.f for a in bns(o["all"])[0].attribute}
    assert attrs["epsilon"] == pytest.approx(1e-3) and attrs["momentum"] == pytest.approx(0.8)
    gemms = [n for n in onnx.load(o["all"]).graph.node if n.op_type == "Gemm"]
    assert all(len(n.input) == 2 for n in gemms)  # --drop-bias
    assert after(o["after"]) == ["act"]
    assert after(o["only"]) == ["fc2"]
    assert "momentum" in results[4].stderr and not o["bad"].exists()
    train = {a.name: a.i for a in bns(o["train"])[0].attribute if a.name == "training_mode"}
    assert train == {"training_mode": 1} and len(bns(o["train"])[0].output) == 3
    assert not any(a.name == "training_mode" and a.i for a in bns(o["default"])[0].attribute)


def test_freeze_initializer_inputs(run_cli, tmp_path):
    """--freeze-initializer-inputs folds BNs whose weights are also graph inputs (fold, with
    --merge-branches too, and inspect), says so, and leaves the input file as it was."""
    from test_onnx_fold import _weights_as_inputs

    src = tmp_path / "in.onnx"
    onnx.save(_weights_as_inputs(), src)
    before = src.read_bytes()
    res = run_cli("fold", src, "-o", tmp_path / "kept.onnx")
    assert res.returncode == 0 and "2 kept" in res.stdout
    assert "--freeze-initializer-inputs" in res.stdout
    for extra in ([], ["--merge-branches"]):
        out = tmp_path / f"out{len(extra)}.onnx"
        res = run_cli("fold", src, "-o", out, "--freeze-initializer-inputs", "--validate",
                      "--providers", "cpu", *extra)
        assert res.returncode == 0, res.stderr
        assert "froze 11 graph input(s)" in res.stdout and "validation PASSED" in res.stdout
        model = onnx.load(out)
        assert [i.name for i in model.graph.input] == ["x"]
        assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    doc = json.loads(run_cli("inspect", src, "--freeze-initializer-inputs", "--json").stdout)
    assert doc["report"]["counts"]["folded"] == 2 and "froze 11" in doc["report"]["notes"][0]
    assert src.read_bytes() == before


def test_a_ctrl_c_while_the_command_loads_is_one_line() -> None:
    """The console script's first import is interrupted: "interrupted", exit 130, as during
    the command (it printed a KeyboardInterrupt traceback)."""
    import subprocess
    import sys
    import textwrap

    code = """
        import builtins, sys
        real = builtins.__import__
        def interrupted(name, *args, **kwargs):
            if name == "bnfold.cli.commands":
                raise KeyboardInterrupt
            return real(name, *args, **kwargs)
        builtins.__import__ = interrupted
        from bnfold.cli import main
        sys.exit(main(["--help"]))
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == "bnfold: error: interrupted\n"


def test_a_closed_standard_output_is_refused_before_anything_is_written(models, tmp_path):
    """Started with fd 1 closed (``>&-``), Python has no ``sys.stdout``: the JSON would be
    lost with exit 0, and a table raised an internal error. One line, exit 2, nothing."""
    import subprocess
    import sys

    out = tmp_path / "o.onnx"
    for args in (["fold", str(models["a"]), "-o", str(out), "--json"],
                 ["fold", str(models["a"]), "-o", str(out)]):
        done = subprocess.run([sys.executable, "-m", "bnfold.cli", *args],
                              preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE,
                              text=True, timeout=300, check=False)
        assert done.returncode == 2 and "standard output is closed" in done.stderr
        assert len(done.stderr.splitlines()) == 1 and not out.exists()
