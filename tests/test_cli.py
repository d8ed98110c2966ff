"""The ``bnfold`` command through real subprocesses: every subcommand, every exit code, the
bad-input corpus, and the JSON report's schema. A few in-process checks cover wiring only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import HAS_CUDA_EP
from onnx import helper, numpy_helper

from bnfold import cli

FOLD_KEYS = {"schema", "input", "output", "fold", "validation", "written", "passed"}
REPORT_KEYS = {"pass", "changed", "counts", "entries", "notes"}
VALIDATION_KEYS = {"schema", "passed", "reference", "candidate", "settings", "inputs", "notes",
                   "runs", "failures"}
RUN_KEYS = {"provider", "comparison", "status", "ran_on", "required", "passed", "outputs"}
OUTPUT_KEYS = {"output", "dtype", "shape", "atol", "rtol", "max_abs", "max_rel", "cosine",
               "worst", "passed"}


def check_validation_schema(doc: dict) -> None:
    assert doc.keys() >= VALIDATION_KEYS and doc["schema"] == "bnfold.validation/1"
    assert {"providers", "samples", "seed", "ort_graph_optimizations", "tolerance_rule"} <= \
        doc["settings"].keys()
    assert all({"name", "dtype", "shape", "source"} <= i.keys() for i in doc["inputs"])
    for run in doc["runs"]:
        assert run.keys() >= RUN_KEYS and run["status"] in ("ran", "unavailable")
        assert isinstance(run["passed"], bool) and isinstance(run["ran_on"], list)
        if run["status"] == "unavailable":
            assert "CUDA EP not available" in run["note"] and run["outputs"] == []
        for out in run["outputs"]:
            assert out.keys() >= OUTPUT_KEYS
            assert all(isinstance(out[k], (int, float)) for k in ("atol", "rtol", "cosine"))


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


def test_version_help_and_usage_errors(run_cli):
    assert run_cli("--version").stdout.startswith("bnfold ")
    res = run_cli("--help")
    assert res.returncode == 0 and "fold" in res.stdout and "exit codes" in res.stdout
    for args in ([], ["validate", "a.onnx"], ["validate", "a", "b", "--dim", "batch"]):
        res = run_cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr


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
    doc = json.loads(run_cli("inspect", models["a"], "--json").stdout)
    assert doc["schema"] == "bnfold.inspect/1" and doc["report"].keys() >= REPORT_KEYS


def test_validate_exit_codes(run_cli, models, tmp_path):
    good = tmp_path / "good.onnx"
    assert run_cli("fold", models["a"], "-o", good).returncode == 0
    res = run_cli("validate", models["a"], good, "--providers", "cpu")
    assert res.returncode == 0 and "validation PASSED" in res.stdout
    res = run_cli("validate", models["a"], models["wrong"], "--json", "--samples", "2")
    doc = json.loads(res.stdout)
    assert res.returncode == 1 and doc["passed"] is False and doc["failures"]
    check_validation_schema(doc)
    assert doc["settings"]["samples"] == 2
    # An explicit loose tolerance lets the same wrong model through: the flags are honoured.
    assert run_cli("validate", models["a"], models["wrong"], "--atol", "1",
                   "--rtol", "0", "--providers", "cpu").returncode == 0
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    res = run_cli("validate", models["a"], good, "--inputs", tmp_path / "x.npz", "--json",
                  "--providers", "cpu")
    assert res.returncode == 0 and json.loads(res.stdout)["inputs"][0]["shape"] == [5, 3, 8, 8]
    if not HAS_CUDA_EP:
        res = run_cli("validate", models["a"], good, "--require", "cuda")
        assert res.returncode == 1 and "FAIL (required)" in res.stdout


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
    return {"missing": tmp_path / "missing.onnx", "directory": tmp_path / "adir",
            "truncated": trunc, "random": rand, "tensor": tensor, "opset": opset,
            "ort": ort_bad}


def test_bad_input_corpus(run_cli, models, tmp_path):
    corpus = _corpus(tmp_path, models["a"])
    for kind, path in corpus.items():
        before = digest(path) if path.is_file() else None
        out = tmp_path / f"out_{kind}.onnx"
        # The ORT-unloadable model folds fine; it is bad input once ORT must run it.
        args = ["fold", path, "-o", out] + (["--validate", "--providers", "cpu"]
                                            if kind == "ort" else [])
        for cmd in (args, ["validate", models["a"], path, "--providers", "cpu"]):
            res = run_cli(*cmd)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2, (kind, cmd[0], res.stderr)
            assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), (kind, lines)
            assert "Traceback" not in res.stderr and not out.exists()
            assert before is None or digest(path) == before
    assert "opset 99" in run_cli("inspect", corpus["opset"]).stderr


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
    pytest.importorskip("bnfold.passes.onnx.insert", reason="ONNX insertion pass not built yet")
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
    assert seen == {"model": "plain_cnn", "as_json": True}

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
