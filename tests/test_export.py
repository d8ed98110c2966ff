"""bnfold.export: FX fold, torch.onnx export, ONNX fold, three validations, atomic write."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import bnfold
from bnfold import exporter
from bnfold.errors import BadInputError, UnsafeFoldError, UnsupportedError, UntraceableError
from bnfold.models import zoo


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def float64_reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.double()(x.double()).numpy()
    model.float()
    return out


@pytest.mark.parametrize(("name", "opset"), [("plain_cnn", 17), ("conv_multi_use", None)])
def test_export_folds_validates_and_matches_float64(name, opset, tmp_path):
    model = zoo.get(name)
    path = tmp_path / f"{name}.onnx"
    report = bnfold.export(model, (zoo.example_input(name),), path, validate=("cpu",),
                           opset=opset)
    assert report.written and report.passed and path.exists()
    if opset is not None:  # exactly the opset asked for (torch.onnx itself starts at 18)
        assert [o.version for o in onnx.load(path).opset_import if o.domain == ""] == [opset]
    assert set(report.validations) == {"torch_vs_unfolded_onnx", "torch_vs_folded_onnx",
                                       "unfolded_vs_folded_onnx"}
    left = [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]
    assert len(left) == zoo.ZOO[name].bn_left
    c = report.counts()
    assert c["folded"] + c["kept"] == zoo.ZOO[name].bn_total and c["kept"] == len(left)
    assert all(e.reason for e in report.kept)
    assert report.to_dict()["schema"] == "bnfold.export/1"
    x = zoo.example_input(name, seed=777)  # fresh values, the exported (static) shape
    ref = float64_reference(model, x)
    out = ort_run(path, x)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_dynamic_batch_export(tmp_path):
    model = zoo.get("mlp_bn1d")
    batch = torch.export.Dim("batch", min=2)
    path = tmp_path / "mlp.onnx"
    report = bnfold.export(model, (zoo.example_input("mlp_bn1d"),), path, validate=("cpu",),
                           dynamic_shapes=({0: batch},))
    assert report.passed and report.counts()["folded"] == 2
    # Every validation also ran a sample with the dynamic batch at twice the example's.
    for v in report.validations.values():
        assert [s[0] for s in v.inputs[0]["shapes"]] == [4, 8], v.inputs
    dim0 = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param
    x = zoo.example_input("mlp_bn1d", seed=3, batch=7)
    ref = float64_reference(model, x)
    assert np.abs(ort_run(path, x) - ref).max() / np.abs(ref).max() < 1e-5


def test_failed_validation_raises_and_leaves_path_alone(tmp_path, monkeypatch):
    model = zoo.get("plain_cnn")
    path = tmp_path / "cnn.onnx"
    path.write_bytes(b"previous version")
    real = exporter._fold_both

    def wrong_fold(*args, **kwargs):
        folded = real(*args, **kwargs)
        w = next(v for v in folded.graph.initializers.values() if len(v.shape or ()) == 4)
        arr = w.const_value.numpy().copy()
        arr[0, 0, 0, 0] += 0.01
        w.const_value = onnx_ir_tensor(arr, w.name)
        return folded

    monkeypatch.setattr(exporter, "_fold_both", wrong_fold)
    with pytest.raises(bnfold.ValidationFailedError, match="not written") as info:
        bnfold.export(model, zoo.example_input("plain_cnn"), path, validate=("cpu",))
    assert isinstance(info.value, UnsafeFoldError)  # still caught as the refusal it was
    assert not info.value.report.passed and not info.value.report.written
    assert path.read_bytes() == b"previous version"


def onnx_ir_tensor(arr: np.ndarray, name: str):
    import onnx_ir as ir

    return ir.tensor(arr, name=name)


def test_opset_out_of_range_or_unreachable_is_refused(tmp_path):
    model, x = zoo.get("plain_cnn"), zoo.example_input("plain_cnn")
    for opset in (5, 99):
        with pytest.raises(BadInputError, match="opset must be an integer from 7"):
            bnfold.export(model, x, tmp_path / "m.onnx", opset=opset)
    with pytest.raises(UnsupportedError, match="could not be converted to opset 13"):
        bnfold.export(model, x, tmp_path / "m.onnx", opset=13)
    assert not (tmp_path / "m.onnx").exists()


def test_training_mode_and_bad_example_inputs_are_refused(tmp_path):
    model = zoo.get("plain_cnn")
    with pytest.raises(BadInputError, match="eval"):
        bnfold.export(model.train(), zoo.example_input("plain_cnn"), tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match="tensor"):
        bnfold.export(model.eval(), "not a tensor", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_fx_cannot_fold_is_folded_from_its_onnx_export(tmp_path, monkeypatch):
    def untraceable(*args, **kwargs):
        raise UntraceableError("cannot trace (simulated)")

    monkeypatch.setattr(bnfold, "fold", untraceable)
    model, x = zoo.get("plain_cnn"), zoo.example_input("plain_cnn")
    path = tmp_path / "m.onnx"
    report = bnfold.export(model, (x,), path, validate=("cpu",))
    assert report.written and any("FX fold skipped" in n for n in report.notes)
    assert [e.action for e in report.entries] == ["folded", "folded"]
    assert not [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]
    want = float64_reference(model, x)
    assert np.abs(ort_run(path, x) - want).max() / np.abs(want).max() < 1e-5


def test_an_export_error_in_colour_reaches_the_user_as_plain_text(tmp_path, monkeypatch):
    """torch.onnx formats some errors with terminal colour codes: the one line has none."""
    def coloured(*args, **kwargs):
        raise RuntimeError("\x1b[1m\x1b[31mFailed to export\x1b[0m the model: \x1b[33mop\x1b[0m")

    monkeypatch.setattr(torch.onnx, "export", coloured)
    model, x = zoo.get("plain_cnn"), zoo.example_input("plain_cnn")
    with pytest.raises(UntraceableError) as info:
        bnfold.export(model, (x,), tmp_path / "m.onnx")
    assert str(info.value) == "torch.onnx.export failed: Failed to export the model: op"
    assert not (tmp_path / "m.onnx").exists()
