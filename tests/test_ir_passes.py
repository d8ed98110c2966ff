"""bnfold's onnx-ir pass classes inside ``ir.passes.PassManager`` / ``Sequential``, next to
onnx-ir's common passes; every result is checked against a float64 evaluation of the unfolded
model on fresh inputs (non-trivial BN statistics)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from onnx_cases import Builder, count, feeds, reference, rel_err, run_ort

from bnfold.passes.onnx import FoldBatchNormPass, InsertBatchNormPass, ReparameterizePass


def conv_bn_chain(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN -> Add(BN, Conv): the second BN is kept (the Conv
    output also feeds the Add)."""
    b = Builder(seed)
    h = b.node("Conv", ["x", b.rand("w1", [4, 3, 3, 3]), b.rand("b1", [4])], ["h"])
    z = b.bn(h, "z", 4)
    r = b.node("Relu", [z], ["r"])
    h2 = b.node("Conv", [r, b.rand("w2", [4, 4, 1, 1])], ["h2"])
    b.node("Add", [b.bn(h2, "z2", 4), h2], ["y"])
    return b.model({"x": [2, 3, 6, 6]}, {"y": [2, 4, 4, 4]})


def test_fold_pass_in_a_pass_manager_with_common_passes() -> None:
    proto = conv_bn_chain()
    model = ir.serde.deserialize_model(proto)
    fold = FoldBatchNormPass()
    manager = ir.passes.PassManager(
        [fold, common.RemoveUnusedNodesPass(), common.CheckerPass(full_check=True)])
    result = manager(model)
    assert result.modified and result.model is model
    assert [e.action for e in fold.report.entries] == ["folded", "kept"]
    assert "also feeds" in fold.report.kept[0].reason
    out = ir.serde.serialize_model(result.model)
    assert count(out) == 1
    inputs = feeds(proto, seed=3)
    assert rel_err(run_ort(out, inputs), reference(proto, inputs)) < 1e-5


def test_steps_keep_every_report_and_a_second_run_changes_nothing() -> None:
    model = ir.serde.deserialize_model(conv_bn_chain(1))
    fold = FoldBatchNormPass(backward=False)
    result = ir.passes.PassManager([fold], steps=3, early_stop=True)(model)
    assert result.modified
    assert [len(r.folded) for r in fold.reports] == [1, 0]  # early stop after no change
    assert fold.report is fold.reports[-1] and not fold.report.changed


def test_exclude_option_reaches_the_fold() -> None:
    model = ir.serde.deserialize_model(conv_bn_chain(2))
    fold = FoldBatchNormPass(exclude="BatchNormalization_*")
    assert not fold(model).modified
    assert all("excluded by the user" in e.reason for e in fold.report.entries)


def test_insert_then_fold_in_sequential_is_the_identity_and_leaves_the_input() -> None:
    """Inference-mode BNs inserted with identity statistics and eps=0 (exactly the identity)
    fold away again: the result computes what the BN-free input computes, and the functional
    insert leaves its input as it was."""
    b = Builder(3)
    h = b.node("Conv", ["x", b.rand("w1", [4, 3, 3, 3]), b.rand("b1", [4])], ["h"])
    r = b.node("Relu", [h], ["r"])
    b.node("Gemm", [b.node("Flatten", [r], ["f"]), b.rand("w2", [5, 64])], ["y"], transB=1)
    proto = b.model({"x": [2, 3, 6, 6]}, {"y": None})
    model = ir.serde.deserialize_model(proto)
    insert, fold = InsertBatchNormPass(skip_last=False, eps=0.0), FoldBatchNormPass()
    pipeline = ir.passes.Sequential(insert, common.TopologicalSortPass(), fold)
    result = pipeline(model)
    assert result.model is not model
    assert ir.serde.serialize_model(model) == ir.serde.serialize_model(
        ir.serde.deserialize_model(proto))
    assert len(insert.report.inserted) == 2 and len(fold.report.folded) == 2
    out = ir.serde.serialize_model(result.model)
    assert count(out) == 0
    inputs = feeds(proto, seed=4)
    assert rel_err(run_ort(out, inputs), reference(proto, inputs)) < 1e-5


def test_unknown_insert_option_is_a_type_error_at_construction() -> None:
    with pytest.raises(TypeError):
        InsertBatchNormPass(positon="after_activation")
    assert FoldBatchNormPass().report is None


def repvgg_block(seed: int = 0) -> onnx.ModelProto:
    """Relu(Add(BN(Conv3x3(x)), BN(Conv1x1(x)), BN(x))) -> Conv -> BN: one mergeable block,
    then a plain Conv+BN."""
    b = Builder(seed)
    k3 = b.bn(b.node("Conv", ["x", b.rand("w3", [4, 4, 3, 3])], ["c3"], pads=[1] * 4), "z3", 4)
    k1 = b.bn(b.node("Conv", ["x", b.rand("w1", [4, 4, 1, 1])], ["c1"]), "z1", 4)
    s = b.node("Add", [b.node("Add", [k3, k1], ["s1"]), b.bn("x", "zi", 4)], ["s"])
    r = b.node("Relu", [s], ["r"])
    b.bn(b.node("Conv", [r, b.rand("w4", [2, 4, 1, 1])], ["c4"]), "y", 2)
    return b.model({"x": [2, 4, 6, 6]}, {"y": [2, 2, 6, 6]})


def test_reparameterize_pass_in_a_pass_manager_merges_and_folds_exactly() -> None:
    proto = repvgg_block()
    model = ir.serde.deserialize_model(proto)
    reparam = ReparameterizePass()
    manager = ir.passes.PassManager(
        [reparam, common.RemoveUnusedNodesPass(), common.CheckerPass(full_check=True)])
    result = manager(model)
    assert result.modified and result.model is model
    assert len(reparam.report.merged) == 1 and reparam.report.merged[0].details["branches"] == 3
    assert not reparam.report.kept
    out = ir.serde.serialize_model(result.model)
    assert count(out) == 0 and count(out, "Conv") == 2 and count(out, "Add") == 0
    inputs = feeds(proto, seed=5)
    assert rel_err(run_ort(out, inputs), reference(proto, inputs)) < 1e-5
    assert not reparam(model).modified  # nothing left to merge or fold
