"""bnfold.validate: ONNX vs ONNX and torch vs ONNX in ONNX Runtime; it must catch wrong models."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from conftest import HAS_CUDA_EP, requires_cuda
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnfold
from bnfold.algebra import BNParams, fold_forward
from bnfold.errors import BadInputError, UnsupportedError
from bnfold.validation import session as validate_mod
from bnfold.validation.metrics import compare_output
from bnfold.validation.result import SCHEMA


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
    fused = bnfold.validate(ref, hand_folded(ref), providers=("cpu",), samples=1, optimize=True)
    assert fused.passed and fused.settings["ort_graph_optimizations"] == "enabled"


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
    with pytest.raises(BadInputError, match=r"junk.npz: not an .npy/.npz file \(it does not"):
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
    fixed = onnx.ModelProto()
    fixed.CopyFrom(ref)
    fixed.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    with pytest.raises(BadInputError, match=r"input 'x' has shape \['batch', 3, 8, 8\]"):
        bnfold.validate(ref, fixed, providers=("cpu",))
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


def test_compare_output_an_infinite_reference_made_finite_is_an_infinite_error():
    ref = np.array([np.inf, -np.inf, 2.0], np.float32)
    cand = np.array([1.0, -np.inf, 2.0], np.float32)
    cmp = compare_output("f", [ref], [cand])
    assert not cmp.passed and cmp.max_abs == np.inf and cmp.max_rel == np.inf
    assert cmp.to_dict()["max_rel"] == "inf"


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


# --------------------------------------------------------------------------------------------
# Audit: providers, tolerances per compute dtype, signatures, external data, ORT noise.
# --------------------------------------------------------------------------------------------

def _bf16_mul() -> onnx.ModelProto:
    """A float32-in, float32-out model whose bfloat16 Mul the CPU EP has no kernel for (ORT
    NOT_IMPLEMENTED; bfloat16 inputs and outputs are refused before: ORT's Python API does not
    exchange them)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
         helper.make_node("Mul", ["b", "b"], ["m"]),
         helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT)], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("where", ["input", "output"])
def test_bfloat16_inputs_and_outputs_are_refused_in_one_line(where: str) -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16 if where == "output"
                          else TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16 if where == "input"
                                       else TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16 if where == "output"
                                       else TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedError, match=f"{where} '.' is bfloat16"):
        bnfold.validate(model, model, providers=("cpu",))


@pytest.mark.skipif(HAS_CUDA_EP, reason="checks the report when CUDA EP is missing")
def test_cpu_always_runs_and_a_validation_that_ran_nothing_never_passes(
        conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    res = bnfold.validate(ref, hand_folded(ref), providers=("cuda",), samples=1)
    assert [r.provider for r in res.runs] == ["cpu", "cuda"]
    assert res.runs[0].status == "ran" and res.runs[1].status == "unavailable" and res.passed
    wrong = bnfold.validate(ref, perturbed(hand_folded(ref), 2, 1e-3), providers=("cuda",))
    assert not wrong.passed
    with pytest.raises(UnsupportedError, match=r"no execution provider could run.*Mul"):
        bnfold.validate(_bf16_mul(), _bf16_mul(), samples=1)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_tolerances_must_be_finite_and_non_negative(conv_bn_proto, bad):
    ref = conv_bn_proto()
    for key in ("atol", "rtol"):
        with pytest.raises(BadInputError, match=f"{key} must be a finite number"):
            bnfold.validate(ref, ref, providers=("cpu",), **{key: bad})


def _keep_io_float32(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 model wrapped in Casts: float32 inputs and outputs (``keep_io_types``)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    g.node[0].input[0], g.node[-1].output[0] = "x16", "y16"
    g.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
    g.node.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
    g.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    g.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def test_tolerance_follows_the_compute_dtype_of_a_float16_model_with_float32_io(
        conv_bn_proto, hand_folded):
    ref16 = conv_bn_proto(np.float16)
    ref = _keep_io_float32(ref16)
    res = bnfold.validate(ref, _keep_io_float32(hand_folded(ref16)), providers=("cpu",))
    (c,) = res.runs[0].comparisons
    assert res.passed, res.table()  # a float32 tolerance (1e-5) fails this correct fold ~25x
    assert (c.dtype, c.tol_dtype, c.rtol) == ("float32", "float16", 5e-3)
    assert res.settings["compute_dtype"] == "float16"
    wrong = _keep_io_float32(perturbed(hand_folded(ref16), 2, 0.1))
    assert not bnfold.validate(ref, wrong, providers=("cpu",)).passed
    given = bnfold.validate(ref, ref, providers=("cpu",), atol=0.0, rtol=0.0)
    assert given.runs[0].comparisons[0].tol_dtype == "given"


def _gemm_bn(dtype: type, *, fold: bool, ulps: float = 0.0) -> onnx.ModelProto:
    """Gemm -> BN (or its exact fold, one weight moved by ``ulps`` of its dtype)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(0, 0.3, (16, 32)), rng.normal(0, 0.5, 16)
    gamma, beta = rng.uniform(0.5, 1.5, 16), rng.normal(0, 0.5, 16)
    mean, var = rng.normal(0, 0.5, 16), rng.uniform(0.3, 3, 16)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if fold:
        folded = fold_forward(w.astype(dtype), b.astype(dtype), BNParams(
            mean.astype(dtype), var.astype(dtype), float(np.float32(1e-5)), gamma.astype(dtype),
            beta.astype(dtype)))
        wf = folded.weight.copy()
        wf[3, 5] += ulps * np.finfo(dtype).eps * abs(wf[3, 5])
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
        inits = {"W": wf, "B": folded.bias}
    else:
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1),
                 helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])]
        inits = {"W": w, "B": b, "g": gamma, "b": beta, "m": mean, "v": var}
    graph = helper.make_graph(
        nodes, "gemm_bn", [helper.make_tensor_value_info("x", elem, ["n", 32])],
        [helper.make_tensor_value_info("y", elem, ["n", 16])],
        [numpy_helper.from_array(np.asarray(v, dtype), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("dtype", "caught_ulps"), [
    (np.float64, 2 ** 20), (np.float32, 2 ** 12), (np.float16, 2 ** 8)])
def test_default_tolerance_passes_a_correct_fold_and_catches_one_wrong_weight(
        dtype, caught_ulps):
    ref = _gemm_bn(dtype, fold=False)
    ok = bnfold.validate(ref, _gemm_bn(dtype, fold=True), providers=("cpu",), samples=5)
    assert ok.passed and ok.runs[0].comparisons[0].worst["ratio"] < 0.1, ok.table()
    wrong = _gemm_bn(dtype, fold=True, ulps=caught_ulps)
    assert not bnfold.validate(ref, wrong, providers=("cpu",), samples=5).passed


def _multi_io(*, unknown_rank: bool = False, table: int = 10) -> onnx.ModelProto:
    """Inputs a: float [batch, seq, 4] and idx: int64 [batch, seq]; three outputs."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["y1"]),
             helper.make_node("Gather", ["E", "idx"], ["g"]),
             helper.make_node("Add", ["y1", "g"], ["y2"]),
             helper.make_node("Cast", ["idx"], ["idxf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["idxf"], ["s"], keepdims=0)]
    a_shape = None if unknown_rank else ["batch", "seq", 4]
    graph = helper.make_graph(
        nodes, "multi", [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape),
                         helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "s")],
        [numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.normal(size=(table, 5)).astype(np.float32), "E")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_several_inputs_and_outputs_int64_and_dynamic_dims(capfd):
    m = _multi_io()
    res = bnfold.validate(m, m, providers=("cpu",), dims={"batch": 3, "sq": 5})
    assert res.passed and [c.output for c in res.runs[0].comparisons] == ["y1", "y2", "s"]
    assert [(i["name"], i["dtype"], i["shape"]) for i in res.inputs] == [
        ("a", "float32", [3, 2, 4]), ("idx", "int64", [3, 2])]
    assert "dim 'seq' not given, used 2" in res.notes
    assert any("ignored: sq" in n and "batch, seq" in n for n in res.notes)
    a, idx = np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int64)
    assert bnfold.validate(m, m, providers=("cpu",), inputs={"a": a, "idx": idx}).passed
    with pytest.raises(BadInputError, match="dim 'seq' is 3 in input 'a' but 4 in input 'idx'"):
        bnfold.validate(m, m, providers=("cpu",), inputs={"a": a, "idx": np.zeros((2, 4), int)})
    with pytest.raises(BadInputError, match="dtype int32"):
        bnfold.validate(m, m, providers=("cpu",), inputs={"a": a, "idx": idx.astype(np.int32)})
    with pytest.raises(BadInputError, match="unknown rank"):
        bnfold.validate(_multi_io(unknown_rank=True), _multi_io(unknown_rank=True))
    # Generated integers that the model cannot take: one error that says where they came from,
    # and ORT's own log stays silent.
    small = _multi_io(table=3)
    capfd.readouterr()
    with pytest.raises(BadInputError, match=r"Gather.*the inputs were generated"):
        bnfold.validate(small, small, providers=("cpu",))
    assert capfd.readouterr().err == ""


def test_in_memory_model_with_external_data_from_another_folder(conv_bn_proto, tmp_path,
                                                                 monkeypatch):
    ref = conv_bn_proto()
    g = ref.graph
    g.node[-1].output[0] = "r"  # an unfolded weight stays external after the fold
    g.node.append(helper.make_node("Mul", ["r", "S"], ["y"]))
    g.initializer.append(numpy_helper.from_array(np.full((6, 1, 1), 2.0, np.float32), "S"))
    (tmp_path / "m").mkdir()
    onnx.save_model(ref, tmp_path / "m" / "a.onnx", save_as_external_data=True,
                    location="a.data", size_threshold=0)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    folded, _ = bnfold.fold_onnx(tmp_path / "m" / "a.onnx")
    res = bnfold.validate(tmp_path / "m" / "a.onnx", folded, providers=("cpu",))
    assert res.passed, res.table()


def test_cuda_session_that_fails_to_open_is_unavailable_not_bad_input(
        conv_bn_proto, hand_folded, monkeypatch):
    real_session = validate_mod.ort.InferenceSession

    def session(source, options, providers):
        if "CUDAExecutionProvider" in str(providers[0]):
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return real_session(source, options, providers=providers)

    real = validate_mod.ort.get_available_providers
    monkeypatch.setattr(validate_mod.ort, "get_available_providers",
                        lambda: list(dict.fromkeys(["CUDAExecutionProvider", *real()])))
    monkeypatch.setattr(validate_mod.ort, "InferenceSession", session)
    ref = conv_bn_proto()
    res = bnfold.validate(ref, hand_folded(ref), samples=1, require=("cuda",))
    cuda = res.runs[1]
    assert cuda.status == "unavailable" and "no CUDA-capable device" in cuda.note
    assert res.runs[0].passed and not res.passed


def test_torch_reference_uses_given_inputs(conv_bn_proto, hand_folded):
    ref = conv_bn_proto()
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    res = bnfold.validate(_torch_twin(ref), hand_folded(ref), inputs=[{"x": x}, {"x": x[:2]}],
                          providers=("cpu",))
    assert res.passed and res.settings["samples"] == 2
    assert res.inputs[0]["shapes"] == [[5, 3, 8, 8], [2, 3, 8, 8]]


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_integer_outputs_past_2_to_the_53_compare_as_integers(dtype) -> None:
    """float64 holds integers exactly only up to 2**53: two int64 outputs one apart above it
    compared equal (a wrong pass)."""
    big = np.array([2**60, 2**60 + 7, 5], dtype)
    off = big.copy()
    off[1] += 1
    result = compare_output("i", [big], [off])
    assert not result.passed and "1 element(s) differ" in result.reason
    assert result.max_abs == 1.0 and compare_output("i", [big], [big.copy()]).passed


def _sequence_output(stacked: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    if stacked:
        nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["s"])]
        out = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 2, 3])
        inits = [numpy_helper.from_array(np.array([0], np.int64), "axes")]
    else:
        nodes = [helper.make_node("SequenceConstruct", ["x"], ["s"])]
        out = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2, 3])
        inits = []
    graph = helper.make_graph(nodes, "g", [x], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("which", ["reference", "candidate"])
def test_a_sequence_output_is_refused_on_either_side(which: str) -> None:
    seq, tensor = _sequence_output(False), _sequence_output(True)
    ref, cand = (seq, tensor) if which == "reference" else (tensor, seq)
    with pytest.raises(UnsupportedError, match="is a sequence_type"):
        bnfold.validate(ref, cand, providers=("cpu",))


def test_export_checks_samples_and_a_torch_model_returning_no_tensor(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 4, 4)
    for samples in (0, -3, 20_000):
        with pytest.raises(BadInputError, match="samples must be an integer"):
            bnfold.export(model, (x,), tmp_path / "m.onnx", validate=("cpu",), samples=samples)

    class _NoOutput(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    with pytest.raises(BadInputError, match="returns NoneType, not tensors"):
        bnfold.export(_NoOutput().eval(), (x,), tmp_path / "n.onnx", validate=("cpu",))
    assert not list(tmp_path.iterdir())


def test_golden_inputs_of_a_model_without_inputs_load_back(tmp_path, run_cli) -> None:
    """``--save-inputs`` of a model with no inputs writes an empty .npz; ``--load-inputs``
    reads it back (it refused it as "not an .npz of named input arrays")."""
    const = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "c")
    graph = helper.make_graph([helper.make_node("Relu", ["c"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [const])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    golden = tmp_path / "in.npz"
    assert run_cli("validate", path, path, "--providers", "cpu", "--save-inputs",
                   golden).returncode == 0
    res = run_cli("validate", path, path, "--providers", "cpu", "--load-inputs", golden)
    assert res.returncode == 0, res.stderr


def _reshape_to(shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array(shape, np.int64), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_candidate_that_fails_where_the_reference_runs_fails_validation(tmp_path) -> None:
    """A batch baked into the candidate (the typical wrong rewrite) fails on a batch of 5 that
    the reference runs: a failed validation (exit 1), not bad input (exit 2)."""
    samples = tmp_path / "x.npz"
    np.savez(samples, x=np.ones((5, 3), np.float32))
    for kwargs in ({"dims": {"N": 5}}, {"inputs": [str(samples)]}):
        result = bnfold.validate(_reshape_to([-1, 3]), _reshape_to([2, 3]), providers=("cpu",),
                                 **kwargs)
        assert not result.passed
        assert "did not run where the reference did" in result.runs[0].comparisons[0].reason
        json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(BadInputError, match="failed to run"):  # (the reference itself fails)
        bnfold.validate(_reshape_to([2, 3]), _reshape_to([-1, 3]), providers=("cpu",),
                        dims={"N": 5})


def test_an_initializer_nothing_reads_does_not_loosen_the_tolerance() -> None:
    """One unused float16 initializer made the compute dtype float16 (rtol 5e-3), so a 0.1%
    error in a float32 computation passed."""
    def scale(by: float, unused: bool) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(np.array([1.0, 2.0, by], np.float32), "c")]
        if unused:
            inits.append(numpy_helper.from_array(np.ones(3, np.float16), "spare"))
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "c"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    result = bnfold.validate(scale(3.0, False), scale(3.003, True), providers=("cpu",))
    assert not result.passed and result.settings["compute_dtype"] == "float32"
