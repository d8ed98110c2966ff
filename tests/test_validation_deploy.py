"""Validation as deployment engineers do it: error distributions, golden .npz data, and
16-bit models checked against a higher-precision reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_cases import feeds, reference, run_ort

import bnfold
from bnfold.validation.metrics import compare_output
from bnfold.validation.upcast import upcast_to_float32


def test_error_statistics_are_the_distribution_of_the_errors() -> None:
    ref = np.linspace(1.0, 2.0, 200)
    delta = np.where(np.arange(200) < 150, 0.0, 1e-3)  # 75% exact, 25% off by 1e-3
    delta[-1] = 5e-2                                   # one outlier
    c = compare_output("y", [ref], [ref + delta], atol=0.0, rtol=1.0)
    errors = np.abs(delta)
    assert c.stats["abs"]["mean"] == pytest.approx(errors.mean())
    assert c.stats["abs"]["median"] == 0.0
    assert c.stats["abs"]["p99"] == pytest.approx(np.percentile(errors, 99))
    assert c.max_abs == pytest.approx(5e-2) and c.stats["abs"]["p99"] < c.max_abs
    assert c.stats["rel"]["mean"] == pytest.approx((errors / ref).mean())


def test_report_json_and_table_carry_the_statistics(conv_bn_proto, hand_folded) -> None:
    ref = conv_bn_proto()
    res = bnfold.validate(ref, hand_folded(ref), providers=("cpu",))
    out = res.to_dict()["runs"][0]["outputs"][0]
    assert set(out["stats"]) == {"abs", "rel"}
    assert set(out["stats"]["abs"]) == {"mean", "median", "p99"}
    assert out["stats"]["abs"]["p99"] <= out["max_abs"]
    assert "errors cpu y: |Δ| mean" in res.table()
    assert res.settings["reference_model"] == "as given"


# ---------------------------------------------------------------------------------------------
# 16-bit models: the reference is computed in float32 (ONNX) or float64 (torch).
# ---------------------------------------------------------------------------------------------

def test_upcast_graph_computes_in_float32_with_the_same_signature(conv_bn_proto) -> None:
    proto = conv_bn_proto(np.float16)
    up = upcast_to_float32(proto)
    onnx.checker.check_model(up, full_check=True)
    assert [(i.name, i.type.tensor_type.elem_type) for i in up.graph.input] == [
        ("x", TensorProto.FLOAT16)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in up.graph.output] == [
        ("y", TensorProto.FLOAT16)]
    assert all(t.data_type == TensorProto.FLOAT for t in up.graph.initializer)
    inputs = feeds(proto, seed=2)
    got = run_ort(up, inputs)[0].astype(np.float64)
    exact = reference(proto, inputs)[0]
    # float32 math rounded once to float16: within half a float16 ulp (plus float32 error)
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 0.5 * ulp + 1e-5 * np.abs(exact).max())


def test_float16_validation_uses_and_states_the_float32_reference(conv_bn_proto,
                                                                  hand_folded) -> None:
    ref = conv_bn_proto(np.float16)
    res = bnfold.validate(ref, hand_folded(ref), providers=("cpu",))
    assert res.passed, res.table()
    assert res.settings["reference_model"].startswith("the reference graph computed in float32")
    assert res.reference.endswith("(float32)")
    assert "reference: the reference graph computed in float32" in res.table()
    same = bnfold.validate(ref, hand_folded(ref), providers=("cpu",), upcast_reference=False)
    assert same.settings["reference_model"] == "as given"
    inputs = feeds(ref)
    exact = reference(ref, inputs)[0]
    want = run_ort(upcast_to_float32(ref), inputs)[0]
    assert np.abs(want.astype(np.float64) - exact).max() <= np.abs(
        run_ort(ref, inputs)[0].astype(np.float64) - exact).max() + 1e-12


def _mixed16() -> onnx.ModelProto:
    """``Cast16(Cast32(x * w16) + u32)``: a float16 model with one float32 tensor."""
    nodes = [helper.make_node("Mul", ["x", "w16"], ["m"]),
             helper.make_node("Cast", ["m"], ["m32"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["m32", "u32"], ["a"]),
             helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT16)]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes, "mixed16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 64])],
        [numpy_helper.from_array(rng.normal(size=64).astype(np.float16), "w16"),
         numpy_helper.from_array(rng.normal(size=64).astype(np.float32), "u32")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float16_reference_reads_external_data_beside_the_model(tmp_path, monkeypatch) -> None:
    """A 16-bit model whose tensors lie in a data file beside it, validated from another
    folder: the float32 reference reads the float16 ones from that file (it was looked up in
    the current folder), and ORT runs the upcast bytes with the model's folder for the
    float32 one, which stays external."""
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(_mixed16(), folder / "f.onnx")
    onnx.save(_mixed16(), folder / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    monkeypatch.chdir(tmp_path)
    res = bnfold.validate(str(folder / "m.onnx"), str(folder / "f.onnx"), providers=("cpu",))
    assert res.passed, res.table()
    assert res.settings["reference_model"].startswith("the reference graph computed in float32")


def _conv16(weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "W"], ["y"])
    graph = helper.make_graph(
        [node], "conv16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4, 3, 3])],
        [numpy_helper.from_array(weight.astype(np.float16), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_torch_reference_of_a_float16_model_runs_in_float64() -> None:
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).half().eval()
    model = _conv16(conv.weight.detach().numpy())
    x = torch.randn(2, 3, 5, 5).half()
    res = bnfold.validate(conv, model, (x,), providers=("cpu",))
    assert res.passed, res.table()
    assert res.settings["reference_model"].startswith("torch module run in float64")
    assert res.runs[0].ref_outputs[0][0].dtype == np.float16
    with torch.no_grad():
        conv.weight[1, 0, 0, 0] += 0.25
    assert not bnfold.validate(conv, model, (x,), providers=("cpu",)).passed


# ---------------------------------------------------------------------------------------------
# Golden data on the command line.
# ---------------------------------------------------------------------------------------------

def test_cli_saves_and_loads_golden_npz(conv_bn_proto, hand_folded, tmp_path, run_cli) -> None:
    ref = conv_bn_proto()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(ref, a)
    onnx.save(hand_folded(ref), b)
    ins, outs = tmp_path / "in.npz", tmp_path / "out.npz"
    res = run_cli("validate", a, b, "--samples", "2", "--save-inputs", ins,
                  "--save-outputs", outs, "--json")
    assert res.returncode == 0, res.stderr
    saved_in, saved_out = np.load(ins), np.load(outs)
    assert sorted(saved_in.files) == ["sample0/x", "sample1/x"]
    assert sorted(saved_out.files) == ["cpu/sample0/y", "cpu/sample1/y",
                                       "reference/sample0/y", "reference/sample1/y"]
    for i in range(2):
        feed = {"x": saved_in[f"sample{i}/x"]}
        np.testing.assert_array_equal(saved_out[f"reference/sample{i}/y"], run_ort(ref, feed)[0])
        np.testing.assert_array_equal(saved_out[f"cpu/sample{i}/y"],
                                      run_ort(hand_folded(ref), feed)[0])
    golden = tmp_path / "golden.npz"
    again = run_cli("validate", a, b, "--load-inputs", ins, "--save-inputs", golden, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["settings"]["samples"] == 2
    reloaded = np.load(golden)
    for key in saved_in.files:
        np.testing.assert_array_equal(reloaded[key], saved_in[key])


def test_cli_golden_refusals_are_one_line(conv_bn_proto, tmp_path, run_cli) -> None:
    a = tmp_path / "a.onnx"
    onnx.save(conv_bn_proto(), a)
    objects, plain = tmp_path / "obj.npz", tmp_path / "x.npz"
    np.savez(objects, x=np.array([{"pickled": True}], dtype=object))
    np.savez(plain, x=np.zeros((2, 3, 8, 8), np.float32))
    results = run_cli.many([
        ["validate", a, a, "--load-inputs", objects],
        ["validate", a, a, "--load-inputs", plain, "--inputs", plain],
        ["validate", a, a, "--load-inputs", tmp_path / "missing.npz"],
    ])
    for res, words in zip(results, ("object array", "not both", "no such file"), strict=True):
        assert res.returncode == 2 and words in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    ok = run_cli("validate", a, a, "--load-inputs", plain, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["settings"]["samples"] == 1
