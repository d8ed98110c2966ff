"""torch.export programs in and out of fold / insert_bn, and .pt2 archives in the CLI.

Each folded program is run on fresh inputs (another batch size than the example, through the
dynamic dim) and compared with a float64 evaluation of the unfolded model (BNs with
non-trivial statistics)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.export import Dim, ExportedProgram

import bnfold
from bnfold.errors import BadInputError
from bnfold.models import plain, zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.programs import load_program, save_program

BN_OPS = ("batch_norm", "_native_batch_norm_legit_no_training")


def resnet() -> tuple[torch.nn.Module, ExportedProgram]:
    model = randomize_bn_stats(zoo.get("resnet_small"), seed=3).eval()
    program = torch.export.export(model, (zoo.example_input("resnet_small"),),
                                  dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    return model, program


def bn_ops(program: ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function"
               and getattr(n.target, "__name__", "").split(".")[0] in BN_OPS)


def float64_error(program: ExportedProgram, model: torch.nn.Module, batch: int) -> float:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = program.module()(x).double()
    return float((got - want).abs().max() / want.abs().max())


def test_fold_returns_a_program_that_runs_like_the_input() -> None:
    model, program = resnet()
    before = {k: v.clone() for k, v in program.state_dict.items()}
    folded, report = bnfold.fold(program)
    assert isinstance(folded, ExportedProgram)
    assert len(report.folded) == 9 and bn_ops(program) == 9 and bn_ops(folded) == 0
    assert folded.graph_signature.user_inputs == program.graph_signature.user_inputs
    assert folded.call_spec.in_spec == program.call_spec.in_spec
    assert folded.call_spec.out_spec == program.call_spec.out_spec
    assert [str(r) for r in folded.range_constraints.values()] == [
        str(r) for r in program.range_constraints.values()]
    assert not any("running_mean" in k or ".bn" in k for k in folded.state_dict)
    assert all(torch.equal(program.state_dict[k], v) for k, v in before.items())
    for batch in (5, 1):
        assert float64_error(folded, model, batch) < 1e-6


def test_saved_folded_program_loads_and_runs(tmp_path) -> None:
    model, program = resnet()
    folded, _ = bnfold.fold(program, exclude="layer3.*")
    save_program(folded, tmp_path / "f.pt2")
    loaded = load_program(tmp_path / "f.pt2")
    assert bn_ops(loaded) == 3
    assert float64_error(loaded, model, 4) < 1e-6


def test_a_decomposed_program_is_folded_and_decomposed_again() -> None:
    model, program = resnet()
    lowered = program.run_decompositions()
    folded, report = bnfold.fold(lowered)
    assert len(report.folded) == 9 and bn_ops(folded) == 0
    assert folded.dialect == "ATEN"
    assert float64_error(folded, model, 3) < 1e-6


def test_insert_bn_on_a_program_matches_insert_bn_on_the_module() -> None:
    """The program gets the BNs insert_bn gives the module, named after the layers' modules,
    in training mode (batch statistics: insertion is for training graphs)."""
    model = plain.get("digits_cnn").eval()
    x = torch.randn(4, 1, 8, 8)
    inserted, report = bnfold.insert_bn(torch.export.export(model, (x,)))
    gm, same = bnfold.insert_bn(model, example_inputs=x)
    assert [e.bn for e in report.inserted] == [e.bn for e in same.inserted] == [
        "conv1_bn", "conv2_bn", "fc1_bn"]
    assert bn_ops(inserted) == 3
    fresh = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(inserted.module()(fresh), gm.train()(fresh))


def test_inplace_on_a_program_is_refused() -> None:
    _, program = resnet()
    with pytest.raises(BadInputError, match="inplace"):
        bnfold.fold(program, inplace=True)


def test_cli_fold_and_inspect_pt2(tmp_path, run_cli) -> None:
    model, program = resnet()
    src, out = tmp_path / "m.pt2", tmp_path / "out" / "folded.pt2"
    torch.export.save(program, src)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt2")
    fold, inspect, ckpt, validate, freeze, freeze_inspect, as_onnx = run_cli.many([
        ["fold", src, "-o", out, "--exclude", "stem.*", "--json"],
        ["inspect", src, "--json"],
        ["inspect", tmp_path / "ckpt.pt2"],
        ["fold", src, "-o", tmp_path / "v.pt2", "--validate"],
        ["fold", src, "-o", tmp_path / "v.pt2", "--freeze-initializer-inputs"],
        ["inspect", src, "--freeze-initializer-inputs"],
        ["fold", src, "-o", tmp_path / "v.onnx"],
    ])
    assert fold.returncode == 0, fold.stderr
    doc = json.loads(fold.stdout)
    assert doc["written"] and doc["fold"]["counts"]["folded"] == 8
    assert float64_error(torch.export.load(out), model, 2) < 1e-6
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["report"]["dry_run"]
    assert json.loads(inspect.stdout)["report"]["counts"]["folded"] == 9
    for bad in (ckpt, validate, freeze, freeze_inspect, as_onnx):
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert "not a torch.export archive" in ckpt.stderr
    assert "applies to ONNX models" in freeze.stderr and "applies to ONNX" in freeze_inspect.stderr
    assert "torch.export archive, not an ONNX model" in as_onnx.stderr
    assert not (tmp_path / "v.pt2").exists() and not (tmp_path / "v.onnx").exists()


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
def test_a_dynamic_dim_without_a_maximum_folds_too() -> None:
    """``Dim("batch")`` with no max: the program's upper bound is torch's integer infinity,
    which calls itself finite; the folded program is exported again with no max either."""
    model = randomize_bn_stats(zoo.get("resnet_small"), seed=3).eval()
    program = torch.export.export(model, (zoo.example_input("resnet_small"),),
                                  dynamic_shapes=({0: Dim("batch")},))
    folded, report = bnfold.fold(program)
    assert len(report.folded) == 9 and bn_ops(folded) == 0
    assert [str(r) for r in folded.range_constraints.values()] == [
        str(r) for r in program.range_constraints.values()]
    for batch in (5, 70):
        assert float64_error(folded, model, batch) < 1e-6


def test_folding_a_decomposed_program_warns_nothing() -> None:
    """Lowering the result again (``run_decompositions``) makes torch warn about its own
    pytree specs; bnfold holds that back (a CLI run printed it)."""
    import warnings
    _, program = resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = program.run_decompositions()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = bnfold.fold(lowered)
    assert len(report.folded) == 9 and bn_ops(folded) == 0
    assert [str(w.message) for w in caught] == []


def test_a_training_program_lowered_to_aten_keeps_its_bns_known() -> None:
    """``run_decompositions()`` of a training-mode program spells each BN
    ``_native_batch_norm_legit_functional``: ``insert_bn`` sees it after its conv (adds no
    second BN) and ``fold`` lists it, kept (training mode)."""
    import warnings
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.BatchNorm2d(4)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = torch.export.export(model, (torch.randn(2, 3, 8, 8),)).run_decompositions()
        inserted, report = bnfold.insert_bn(lowered, skip_last=False)
        _, folded = bnfold.fold(lowered)
    assert [(e.action, (e.reason or "").split(" '")[0]) for e in report.entries] == [
        ("skipped", "already followed by _native_batch_norm_legit_functional.default")] * 2
    assert bn_ops(inserted) == bn_ops(lowered) == 0  # (bn_ops counts the eval forms only)
    assert sum("batch_norm" in str(n.target) for n in inserted.graph.nodes) == sum(
        "batch_norm" in str(n.target) for n in lowered.graph.nodes)
    assert [e.action for e in folded.entries] == ["kept", "kept"]
    assert all("training mode" in (e.reason or "") for e in folded.entries)


def input_ranges(program: ExportedProgram) -> list[tuple[int, float]]:
    """(min, max) of every dynamic dim of the user inputs, in order (max inf when unbounded)."""
    from bnfold.passes.fx.trace import upper_bound
    user = set(program.graph_signature.user_inputs)
    ranges = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            for size in node.meta["val"].shape:
                if isinstance(size, torch.SymInt):
                    bounds = program.range_constraints[size.node.expr]
                    upper = upper_bound(bounds)
                    ranges.append((int(bounds.lower), float("inf") if upper is None else upper))
    return ranges


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
@pytest.mark.parametrize(("padding", "batch"), [(0, Dim.AUTO), (1, Dim.AUTO),
                                                (0, Dim("batch", min=1, max=64))])
def test_a_program_with_auto_dynamic_height_and_width_folds(padding, batch) -> None:
    """``Dim.AUTO`` spatial dims: the program guards sizes inside its ranges (``H - 2 != 1``
    after an unpadded 3x3 conv), which torch refuses as named ``Dim`` ranges; the folded
    program keeps the dims (ranges no narrower) and runs every size the input program runs
    like a float64 evaluation of the unfolded model."""
    model = randomize_bn_stats(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=padding), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2)), seed=5).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: batch, 2: Dim.AUTO, 3: Dim.AUTO},))
    folded, report = bnfold.fold(program)
    assert [e.action for e in report.entries] == ["folded"] and bn_ops(folded) == 0
    old, new = input_ranges(program), input_ranges(folded)
    assert len(old) == len(new) == 3
    assert all(lo <= o_lo and hi >= o_hi for (o_lo, o_hi), (lo, hi) in zip(old, new, strict=True))
    ran = 0
    for n, h, w in ((1, 6, 6), (2, 7, 9), (3, 12, 7), (5, 21, 16)):
        x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        try:
            program.module()(x)
        except Exception:  # a size the input program does not take either
            continue
        with torch.no_grad():
            want = copy.deepcopy(model).double()(x.double())
            got = folded.module()(x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6
        ran += 1
    assert ran >= 3


class _TransposedLinear(torch.nn.Module):
    """A Linear written ``addmm(b, x, w.t())`` or ``mm(x, w.transpose(0, 1))`` (then a BN):
    the spellings a program keeps as ``aten.t`` / ``aten.transpose``."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(7, 5))
        self.b = torch.nn.Parameter(torch.randn(7)) if bias else None
        self.bn = torch.nn.BatchNorm1d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b is not None:
            return self.bn(torch.addmm(self.b, x, self.w.t()))
        return self.bn(torch.mm(x, self.w.transpose(0, 1)))


class _LinearOverSequence(torch.nn.Module):
    """``Linear`` on ``[N, L, C]``, then ``transpose(1, 2)`` and a BatchNorm1d of its channels
    (lowered: ``view -> addmm -> view -> permute``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 7)
        self.bn = torch.nn.BatchNorm1d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2))


def _linear_bn(bias: bool) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 7, bias=bias), torch.nn.BatchNorm1d(7))


def _bn_linear(bias: bool) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3, bias=bias))


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
@pytest.mark.parametrize(("model", "shape", "lower", "weight"), [
    (_linear_bn(True), (5,), True, "0.weight"),
    (_linear_bn(False), (5,), True, "0.weight"),
    (_bn_linear(True), (5,), True, "1.weight"),
    (_bn_linear(False), (5,), True, "1.weight"),
    (_LinearOverSequence(), (4, 5), True, "fc.weight"),
    (_TransposedLinear(bias=True), (5,), False, "w"),
    (_TransposedLinear(bias=False), (5,), False, "w"),
], ids=["linear_bn", "linear_nobias_bn", "bn_linear", "bn_linear_nobias", "sequence",
        "addmm_t", "mm_transpose"])
def test_lowered_linears_fold_both_ways(model, shape, lower, weight) -> None:
    """A Linear as core ATen writes it, ``addmm(b, x, permute(W, [1, 0]))`` or ``mm`` (also
    through ``aten.t`` / ``aten.transpose``), takes a BN before or after it like
    ``aten.linear``: the fold rewrites the parameter ``W`` itself (same name and layout), and
    a lowered program comes back lowered, running like a float64 evaluation of the model
    (dynamic batch; the sequence's static: its lowered views have symbolic sizes)."""
    model = randomize_bn_stats(model, seed=7).eval()
    sequence = len(shape) > 1
    program = torch.export.export(model, (torch.randn(4, *shape),), dynamic_shapes=None
                                  if sequence else ({0: Dim("batch", max=64)},))
    if lower:
        program = program.run_decompositions()
    folded, report = bnfold.fold(program)
    assert [e.action for e in report.entries] == ["folded"], report.table()
    assert bn_ops(folded) == 0 and folded.dialect == program.dialect
    assert folded.state_dict[weight].shape == program.state_dict[weight].shape
    assert not torch.equal(folded.state_dict[weight], program.state_dict[weight])
    for batch in (4,) if sequence else (3, 10):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = copy.deepcopy(model).double()(x.double())
            got = folded.module()(x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6


def test_insert_into_a_lowered_mlp_program() -> None:
    """``run_decompositions()`` writes an MLP's Linears as ``addmm(b, x, permute(W))``:
    insert reads them as the Linears they are (as fold does), puts a BN before each hidden
    activation, and inserting again adds none."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(16, 4)
    program = torch.export.export(model, (x,)).run_decompositions()
    inserted, report = bnfold.insert_bn(program)
    assert [(e.bn, e.action) for e in report.entries] == [
        ("0_bn", "inserted"), ("2_bn", "inserted"), ("4", "skipped")]
    assert isinstance(inserted, ExportedProgram)
    again, report = bnfold.insert_bn(inserted)
    assert not report.inserted
    out = again.module()(x)
    assert out.shape == (16, 2) and torch.isfinite(out).all()
