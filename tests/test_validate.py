"""bnfold.validate: ONNX vs ONNX and torch vs ONNX in ONNX Runtime; it must catch wrong models."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from conftest import HAS_CUDA_EP, requires_cuda
from onnx import numpy_helper
from torch import nn

import bnfold
from bnfold import validation as validate_mod
from bnfold.compare import compare_output
from bnfold.errors import BadInputError, UnsupportedError
from bnfold.validation_result import SCHEMA


def perturbed(proto: onnx.ModelProto, channel: int, delta: float) -> onnx.ModelProto:
    """A copy with one conv weight element of output ``channel`` moved by ``delta``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for i, t in enumerate(out.graph.initializer):
        if t.name == "W":
            w = numpy_helper.to_array(t).copy()
            w[channel, 1, 1, 1] += delta
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "W"))
    return out


def test_exact_fold_passes_with_metrics_and_stated_defaults(conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    calls = []
    res = bnfold.validate(ref, hand_folded(ref), providers=("cpu",), dims={"batch": 4},
                          samples=3, progress=lambda done, total: calls.append((done, total)))
    assert res.passed, res.table()
    (run,) = res.runs
    assert run.ran_on[0] == "CPUExecutionProvider"
    (c,) = run.comparisons
    assert c.dtype == "float32" and c.shape == [4, 6, 8, 8]
    assert 0 < c.max_abs < 1e-4 and c.cosine > 1 - 1e-9
    assert c.rtol == 1e-5 and c.atol > 0
    assert res.inputs[0]["shape"] == [4, 3, 8, 8]
    assert res.settings["ort_graph_optimizations"] == "disabled"
    assert "float32 1e-05" in res.settings["tolerance_rule"]
    assert calls[-1] == (6, 6)  # 3 samples x 2 models x 1 provider
    default = bnfold.validate(ref, hand_folded(ref), providers=("cpu",), samples=1)
    assert default.inputs[0]["shape"][0] == 2
    assert any("dim 'batch' not given, used 2" in n for n in default.notes)


def test_one_perturbed_weight_is_caught_and_located(conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    res = bnfold.validate(ref, perturbed(hand_folded(ref), channel=2, delta=1e-3),
                          providers=("cpu",))
    assert not res.passed
    c = res.runs[0].comparisons[0]
    assert not c.passed and c.worst["index"][1] == 2 and c.worst["ratio"] > 1
    assert "allowed" in c.reason and res.failures()


def test_dtype_aware_tolerance_is_right_both_ways(conv_bn_proto, hand_folded):
    # float32: a small wrong weight that a fixed allclose(rtol=1e-3, atol=1e-4) accepts.
    ref = conv_bn_proto()
    wrong = perturbed(hand_folded(ref), channel=3, delta=8e-5)
    res = bnfold.validate(ref, wrong, providers=("cpu",), samples=1, seed=3)
    r_out, w_out = _outputs(ref, wrong, res)
    assert np.allclose(w_out, r_out, rtol=1e-3, atol=1e-4)
    assert not res.passed
    # float16: a correct fold that the same fixed allclose rejects passes here.
    ref16 = conv_bn_proto(np.float16)
    res16 = bnfold.validate(ref16, hand_folded(ref16), providers=("cpu",), samples=1, seed=3)
    r16, c16 = _outputs(ref16, hand_folded(ref16), res16)
    assert not np.allclose(c16, r16, rtol=1e-3, atol=1e-4)
    assert res16.passed and res16.runs[0].comparisons[0].rtol == 5e-3


def _outputs(ref: onnx.ModelProto, cand: onnx.ModelProto, res) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    rng = np.random.default_rng(res.settings["seed"])
    shape = res.inputs[0]["shape"]
    x = rng.standard_normal(shape).astype(res.inputs[0]["dtype"])
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
           .run(None, {"x": x})[0] for m in (ref, cand)]
    return run[0], run[1]


@pytest.mark.skipif(HAS_CUDA_EP, reason="checks the report when CUDA EP is missing")
def test_missing_cuda_is_a_note_unless_required(conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    res = bnfold.validate(ref, hand_folded(ref), samples=1)
    cuda = res.runs[1]
    assert cuda.status == "unavailable" and "CUDA EP not available" in cuda.note
    assert res.passed
    req = bnfold.validate(ref, hand_folded(ref), samples=1, providers=("cpu",), require=("cuda",))
    assert not req.passed and "required" in req.failures()[0]
    assert "FAIL (required)" in req.table()


def test_silent_cpu_fallback_is_reported_not_trusted(conv_bn_proto, hand_folded, monkeypatch):
    # Pretend onnxruntime-gpu is installed but its CUDA libraries fail: ORT falls back to CPU.
    real = validate_mod.ort.get_available_providers
    monkeypatch.setattr(validate_mod.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", *real()])
    if HAS_CUDA_EP:
        pytest.skip("a real CUDA EP is present")
    ref = conv_bn_proto()
    res = bnfold.validate(ref, hand_folded(ref), samples=1, require=("cuda",))
    cuda = res.runs[1]
    assert cuda.status == "unavailable" and "fell back to CPUExecutionProvider" in cuda.note
    assert not res.passed


def test_inputs_from_npz_npy_and_their_errors(conv_bn_proto, hand_folded, tmp_path):
    ref = conv_bn_proto()
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "x.npy", x)
    for src in (tmp_path / "x.npz", tmp_path / "x.npy", [{"x": x}, {"x": x[:1]}]):
        res = bnfold.validate(ref, hand_folded(ref), providers=("cpu",), inputs=src)
        assert res.passed and res.inputs[0]["shape"] == [3, 3, 8, 8]
        assert res.settings["samples"] == (2 if isinstance(src, list) else 1)
    np.savez(tmp_path / "bad.npz", y=x)
    with pytest.raises(BadInputError, match="missing"):
        bnfold.validate(ref, ref, providers=("cpu",), inputs=tmp_path / "bad.npz")
    with pytest.raises(BadInputError, match="dtype"):
        bnfold.validate(ref, ref, providers=("cpu",), inputs={"x": x.astype(np.float64)})
    with pytest.raises(BadInputError, match="shape"):
        bnfold.validate(ref, ref, providers=("cpu",), inputs={"x": x[:, :2]})
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(BadInputError, match="not a readable"):
        bnfold.validate(ref, ref, providers=("cpu",), inputs=tmp_path / "junk.npz")


def test_bad_models_and_options_raise_one_line_errors(conv_bn_proto, tmp_path):
    ref = conv_bn_proto()
    with pytest.raises(BadInputError, match="no such file"):
        bnfold.validate(tmp_path / "missing.onnx", ref)
    with pytest.raises(BadInputError, match="unknown provider"):
        bnfold.validate(ref, ref, providers=("tpu",))
    old = onnx.ModelProto()
    old.CopyFrom(ref)
    old.opset_import[0].version = 99
    with pytest.raises(UnsupportedError, match="opset 99"):
        bnfold.validate(ref, old, providers=("cpu",))
    other = onnx.ModelProto()
    other.CopyFrom(ref)
    other.graph.input[0].name = "image"
    other.graph.node[0].input[0] = "image"
    with pytest.raises(BadInputError, match="different inputs"):
        bnfold.validate(ref, other, providers=("cpu",))
    with pytest.raises(BadInputError, match="cannot load"):
        broken = onnx.ModelProto()
        broken.CopyFrom(ref)
        broken.graph.node[0].op_type = "NoSuchOp"
        broken.graph.node[0].domain = "com.example"
        broken.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
        bnfold.validate(ref, broken, providers=("cpu",))


def test_files_and_strict_json_report(conv_bn_proto, hand_folded, tmp_path):
    ref = conv_bn_proto()
    onnx.save(ref, tmp_path / "a.onnx")
    onnx.save(perturbed(ref, 0, 0.5), tmp_path / "b.onnx")
    res = bnfold.validate(tmp_path / "a.onnx", tmp_path / "b.onnx", providers=("cpu",))
    data = json.loads(res.to_json())
    assert data["schema"] == SCHEMA and data["passed"] is False
    assert data["reference"].endswith("a.onnx") and data["failures"]
    out = data["runs"][0]["outputs"][0]
    assert {"output", "dtype", "shape", "atol", "rtol", "max_abs", "max_rel", "cosine",
            "worst", "passed", "reason"} <= out.keys()
    assert set(out["worst"]) == {"sample", "index", "ref", "cand", "ratio"}


def test_compare_output_exact_for_ints_nan_aware_and_bf16():
    a = np.arange(6, dtype=np.int64)
    assert compare_output("i", [a], [a.copy()]).passed
    b = a.copy()
    b[3] += 1
    assert not compare_output("i", [a], [b]).passed
    f = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    assert compare_output("f", [f], [f.copy()]).passed
    g = f.copy()
    g[3] = np.nan
    bad = compare_output("f", [f], [g])
    assert not bad.passed and bad.worst["index"] == [3]
    json.dumps(bad.to_dict(), allow_nan=False)
    bf = np.linspace(-3, 3, 64).astype(ml_dtypes.bfloat16)
    near = (bf.astype(np.float32) * (1 + 2 ** -8)).astype(ml_dtypes.bfloat16)
    assert compare_output("b", [bf], [near]).passed
    assert not compare_output("b", [bf], [(bf.astype(np.float32) + 0.5).astype(bf.dtype)]).passed
    shape = compare_output("s", [a], [a[:3]])
    assert not shape.passed and "shape" in shape.reason


def _torch_twin(proto: onnx.ModelProto) -> nn.Module:
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in proto.graph.initializer}
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
    with torch.no_grad():
        conv.weight.copy_(init["W"])
        conv.bias.copy_(init["B"])
        bn.weight.copy_(init["gamma"])
        bn.bias.copy_(init["beta"])
        bn.running_mean.copy_(init["mean"])
        bn.running_var.copy_(init["var"])
    return nn.Sequential(conv, bn, nn.ReLU()).eval()


def test_torch_reference_export_parity(conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    module = _torch_twin(ref)
    x = torch.randn(2, 3, 8, 8)
    res = bnfold.validate(module, hand_folded(ref), (x,), providers=("cpu",))
    assert res.passed, res.table()
    assert res.reference.startswith("torch Sequential") and res.settings["samples"] == 3
    with torch.no_grad():
        module[0].weight[4, 0, 0, 0] += 1e-3
    bad = bnfold.validate(module, hand_folded(ref), x, providers=("cpu",))
    assert not bad.passed and bad.runs[0].comparisons[0].worst["index"][1] == 4
    with pytest.raises(BadInputError, match="training mode"):
        bnfold.validate(module.train(), ref, x, providers=("cpu",))


@pytest.mark.cuda
@requires_cuda
def test_cuda_really_runs_and_matches_cpu(conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    res = bnfold.validate(ref, hand_folded(ref), require=("cuda",))
    assert res.passed, res.table()
    cuda = next(r for r in res.runs if r.provider == "cuda")
    assert cuda.ran_on[0] == "CUDAExecutionProvider"
    assert any(r.provider == "cpu vs cuda" for r in res.runs)
    wrong = bnfold.validate(ref, perturbed(hand_folded(ref), 2, 1e-3), providers=("cuda",))
    assert not wrong.passed
