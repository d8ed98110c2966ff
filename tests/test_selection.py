"""Per-BN control (include / exclude globs) and module paths of dynamo-exported BNs.

Every fold here is checked against a float64 evaluation of the unfolded model on fresh random
inputs (BNs with non-trivial statistics), so a filter that folded or dropped the wrong BN fails.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx_cases import count, feeds, reference, rel_err, run_ort
from test_fx_fold import rel_err as torch_rel_err

import bnfold
from bnfold.errors import BadInputError
from bnfold.exporter import export_unfolded
from bnfold.models import zoo
from bnfold.passes.onnx.names import module_path
from bnfold.selection import Selection

RESNET_BNS = ["stem.1", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "layer2.down.1",
              "layer3.bn1", "layer3.bn2", "layer3.down.1"]


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory: pytest.TempPathFactory):
    """resnet_small exported by the dynamo exporter with its BNs kept: (path, proto)."""
    path = tmp_path_factory.mktemp("sel") / "resnet_small.onnx"
    export_unfolded(zoo.get("resnet_small"), (zoo.example_input("resnet_small"),), path)
    return path, onnx.load(path)


def kept(report: bnfold.Report) -> dict[str, str]:
    return {e.module or e.bn: e.reason or "" for e in report.kept}


# ---------------------------------------------------------------------------------------------
# Selection on its own.
# ---------------------------------------------------------------------------------------------

def test_exclude_wins_and_a_prefix_selects_the_modules_inside() -> None:
    sel = Selection.of(include=["layer2"], exclude="layer2.down.*")
    assert sel.refusal(["node_7", "layer2.bn1"]) is None
    assert sel.refusal(["layer2.down.1"]) == "excluded by the user (exclude 'layer2.down.*')"
    assert "matched by no include glob: 'layer2'" in sel.refusal(["layer1.bn1", None])
    assert Selection.of().refusal(["anything"]) is None


@pytest.mark.parametrize("bad", [3, [None], ["ok", 1], [""], {"a": 1}])
def test_globs_that_are_not_strings_are_refused(bad) -> None:
    with pytest.raises(BadInputError, match="BN name globs"):
        bnfold.fold(zoo.get("resnet_small"), exclude=bad)
    with pytest.raises(BadInputError, match="BN name globs"):
        bnfold.fold_onnx(onnx.ModelProto(), include=bad)


# ---------------------------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------------------------

def test_fx_exclude_keeps_exactly_those_bns_and_stays_exact() -> None:
    model, x = zoo.get("resnet_small"), zoo.example_input("resnet_small")
    gm, report = bnfold.fold(model, x, exclude=["layer2.*", "stem.1"])
    assert set(kept(report)) == {"stem.1", "layer2.bn1", "layer2.bn2", "layer2.down.1"}
    assert all(r.startswith("excluded by the user (exclude ") for r in kept(report).values())
    assert len(report.folded) == 5
    bns = [m for m in gm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4
    fresh = zoo.example_input("resnet_small", seed=7)
    assert torch_rel_err(gm, model, fresh) < 1e-6


def test_fx_include_folds_only_the_selected_bns() -> None:
    model, x = zoo.get("resnet_small"), zoo.example_input("resnet_small")
    gm, report = bnfold.fold(model, x, include="layer3")
    assert [e.bn for e in report.folded] == ["layer3.bn1", "layer3.bn2", "layer3.down.1"]
    assert set(kept(report)) == set(RESNET_BNS) - {"layer3.bn1", "layer3.bn2", "layer3.down.1"}
    assert torch_rel_err(gm, model, zoo.example_input("resnet_small", seed=8)) < 1e-6


# ---------------------------------------------------------------------------------------------
# ONNX: module paths from the exporter's metadata, and globs on them.
# ---------------------------------------------------------------------------------------------

def test_dynamo_bns_carry_their_module_path(resnet_onnx) -> None:
    _, proto = resnet_onnx
    _, report = bnfold.fold_onnx(proto)
    assert [e.module for e in report.entries] == RESNET_BNS
    assert report.entries[0].bn.startswith("node__native_batch_norm")
    assert report.to_dict()["entries"][0]["module"] == "stem.1"
    assert f"{report.entries[1].bn} (layer1.bn1)" in report.table()


def test_module_path_without_metadata_is_none() -> None:
    import onnx_ir as ir

    node = ir.node("BatchNormalization", [])
    assert module_path(node) is None
    node.metadata_props["namespace"] = ": M/features: Sequential/features.3: BatchNorm2d/bn: aten.x"
    assert module_path(node) == "features.3"
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'a', 'a.b', 'op']"
    assert module_path(node) == "a.b"


@pytest.mark.parametrize(("kwargs", "left"), [
    ({"exclude": ["layer2.*"]}, {"layer2.bn1", "layer2.bn2", "layer2.down.1"}),
    ({"include": "layer1.bn?"}, set(RESNET_BNS) - {"layer1.bn1", "layer1.bn2"}),
    ({"exclude": "node__native_batch_norm_legit_no_training__0"}, {"stem.1"}),
])
def test_onnx_globs_on_module_paths_and_node_names(resnet_onnx, kwargs, left) -> None:
    _, proto = resnet_onnx
    folded, report = bnfold.fold_onnx(proto, **kwargs)
    assert set(kept(report)) == left
    assert all("excluded by the user" in r for r in kept(report).values())
    assert count(folded) == len(left)
    inputs = feeds(proto, seed=5)
    assert rel_err(run_ort(folded, inputs), reference(proto, inputs)) < 1e-5


def test_cli_fold_include_exclude_repeatable(resnet_onnx, tmp_path, run_cli) -> None:
    path, proto = resnet_onnx
    out = tmp_path / "folded.onnx"
    res = run_cli("fold", path, "-o", out, "--exclude", "layer2.*", "--exclude", "stem.*",
                  "--include", "layer*", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["fold"]["counts"] == {"folded": 5, "kept": 4, "inserted": 0, "skipped": 0}
    kept_modules = {e["module"] for e in doc["fold"]["entries"] if e["action"] == "kept"}
    assert kept_modules == {"stem.1", "layer2.bn1", "layer2.bn2", "layer2.down.1"}
    folded = onnx.load(out)
    inputs = feeds(proto, seed=6)
    assert count(folded) == 4
    assert rel_err(run_ort(folded, inputs), reference(proto, inputs)) < 1e-5
    table = run_cli("fold", path, "-o", tmp_path / "t.onnx", "--exclude", "layer2.*")
    assert "(layer2.down.1)" in table.stdout and "excluded by the user" in table.stdout
    bad = run_cli("fold", path, "-o", tmp_path / "u.onnx", "--exclude")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_input_proto_unchanged(resnet_onnx) -> None:
    _, proto = resnet_onnx
    before = proto.SerializeToString()
    bnfold.fold_onnx(proto, exclude="layer1*")
    assert proto.SerializeToString() == before
