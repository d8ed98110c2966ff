"""bnfold.reparameterize / reparameterize_onnx: every re-parameterizable block of the rep zoo
merges into one conv, exactly (vs the unfolded model in float64, on fresh inputs), every block
that must not merge is kept with its reason; the same in ONNX exports from both exporters, and
property tests over random branch blocks in both IRs."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

import bnfold
from bnfold.branches import AffineBranch, ConvBranch, merge_refusal
from bnfold.models import rep
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.onnx.reparam import inspect_branches

NAMES = list(rep.CASES)


def _flat(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return torch.cat([o.reshape(-1) for o in out])


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _flat(copy.deepcopy(model).double()(x.double()))


def _rel(out: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
    out = torch.as_tensor(np.asarray(out)).reshape(-1).double()
    return float((out - ref).abs().max() / ref.abs().max())


def _bn_nodes(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_module" and isinstance(
        gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm) for n in gm.graph.nodes)


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=NAMES)
def fx_case(request: pytest.FixtureRequest):
    name = request.param
    model = rep.get(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, report = bnfold.reparameterize(model, rep.example_input(name))
    return name, model, gm, report, before


def test_fx_exact_vs_float64(fx_case) -> None:
    name, model, gm, _, _ = fx_case
    x = rep.example_input(name, seed=77)  # fresh input
    ref = _reference(model, x)
    with torch.no_grad():
        unfolded = _rel(_flat(model(x)), ref)
        assert _rel(_flat(gm(x)), ref) < max(1e-5, 4 * unfolded)
        assert _rel(_flat(copy.deepcopy(gm).double()(x.double())), ref) < 1e-6


def test_fx_merges_what_it_should_and_reports_every_bn(fx_case) -> None:
    name, model, gm, report, _ = fx_case
    case = rep.CASES[name]
    assert len(report.merged) == case.merged
    blocks = [e for e in report.kept if e.reason and e.reason.startswith("not merged")]
    bns = [e for e in report.entries if e not in report.merged and e not in blocks]
    assert len(bns) == _bn_count(model)  # one entry per BN, folded or kept
    assert len(report.kept) - len(blocks) == _bn_nodes(gm)
    if case.merged:
        assert _bn_nodes(gm) == 0
        assert all(e.details["branches"] >= 2 and e.into for e in report.merged)
    else:
        assert len(blocks) == 1 and case.refusal in (blocks[0].reason or ""), blocks
    merged_bns = [e for e in report.folded if e.details.get("direction") == "branch merge"]
    assert {e.into for e in merged_bns} <= {e.into for e in report.merged}


#: The nets with a hand-written deploy form (the refusal nets have none).
TWINS = [n for n in NAMES if any(isinstance(m, rep.RepBlock) for m in rep.get(n).modules())]


@pytest.mark.parametrize("name", TWINS)
def test_fx_matches_hand_written_deploy_twin(name: str) -> None:
    model = rep.get(name)
    gm, _ = bnfold.reparameterize(model, rep.example_input(name))
    deploy = rep.deploy(model)
    assert sum(isinstance(m, nn.modules.conv._ConvNd) for m in deploy.modules()) == sum(
        isinstance(m, nn.modules.conv._ConvNd) for m in gm.modules())
    x = rep.example_input(name, seed=5)
    with torch.no_grad():
        ref = _reference(model, x)
        assert _rel(_flat(gm(x)), ref) <= 2 * _rel(_flat(deploy(x)), ref) + 1e-6


def test_fx_input_untouched(fx_case) -> None:
    _, model, gm, _, before = fx_case
    after = model.state_dict()
    assert after.keys() == before.keys() and gm is not model
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_fx_merge_names_the_block_and_its_conv() -> None:
    _, report = bnfold.reparameterize(rep.get("repvgg_stage"), rep.example_input("repvgg_stage"))
    entry = report.merged[1]
    assert entry.bn.startswith("stages.1.0 (") and entry.into == "stages.1.0.conv"
    assert entry.details["branches"] == 3
    assert "stages.1.0 (add_2)  merged  stages.1.0.conv" in report.table()


def test_fx_again_changes_nothing_and_inplace_graph_module() -> None:
    gm, _ = bnfold.reparameterize(rep.get("mobileone_block"))
    ops = [(n.op, n.target) for n in gm.graph.nodes]
    traced = fx.symbolic_trace(gm)
    again, report = bnfold.reparameterize(traced, inplace=True)
    assert again is traced and not report.merged and not report.folded
    assert [(n.op, n.target) for n in again.graph.nodes] == ops


def test_fx_1d_identity_bn_without_shapes_is_refused_with_a_hint() -> None:
    model = rep.get("repvgg_stage_1d")
    gm, report = bnfold.reparameterize(model)
    assert len(report.merged) == 1  # the stem has no identity branch: rank does not matter
    assert all("pass example_inputs" in (e.reason or "") for e in report.kept[:2])
    x = rep.example_input("repvgg_stage_1d", seed=3)
    with torch.no_grad():
        assert _rel(_flat(gm(x)), _reference(model, x)) < 1e-5


class _Functional(nn.Module):
    """Functional convs and BN on constant attributes, a scalar scale and a plain identity."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)
        self.w1 = nn.Parameter(torch.randn(4, 4, 1, 1) * 0.3)
        self.b1 = nn.Parameter(torch.randn(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, self.w3, None, 1, 1)
        y = y + torch.nn.functional.conv2d(x, self.w1, self.b1) + self.bn(x)
        return torch.relu(y + x * 0.5 + x)


def test_fx_functional_convs_scalar_scale_and_identity() -> None:
    torch.manual_seed(0)
    model = randomize_bn_stats(_Functional()).eval()
    x = torch.randn(2, 4, 6, 6)
    gm, report = bnfold.reparameterize(model, x)
    assert len(report.merged) == 1 and report.merged[0].details["branches"] == 5
    assert _bn_nodes(gm) == 0
    with torch.no_grad():
        assert _rel(_flat(gm(x)), _reference(model, x)) < 1e-5


class _TimmStyle(nn.Module):
    """timm's way of writing a block: ``0 + identity``, ``out += branch(x)``, ``nn.Identity``
    drop-path/attn/act modules between the branches and the sum, a shape assert on a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False),
                                                 nn.BatchNorm2d(8), nn.Identity())
                                   for _ in range(2))
        self.identity = nn.BatchNorm2d(8)
        self.drop_path, self.attn = nn.Identity(), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0 + self.identity(x)
        for conv in self.convs:
            y = conv(x)
            torch._assert(y.ndim == 4, "expected 4D")
            out += self.drop_path(y)
        return torch.relu(self.attn(out))


def test_fx_timm_style_block() -> None:
    torch.manual_seed(0)
    model = randomize_bn_stats(_TimmStyle()).eval()
    x = torch.randn(2, 8, 6, 6)
    gm, report = bnfold.reparameterize(model, x)
    assert len(report.merged) == 1 and len(report.folded) == 3 and not report.kept
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 1
    assert any("no-op" in n for n in report.notes)
    with torch.no_grad():
        assert _rel(_flat(gm(x)), _reference(model, x)) < 1e-5


class _Untraceable(nn.Module):
    """Shape-dependent Python control flow: symbolic_trace fails, torch.export traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = rep.RepBlock(2, 8, 8, scale=True, identity=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 8:
            return torch.relu(self.block(x))
        return x


def test_fx_torch_export_fallback_aten_graph() -> None:
    torch.manual_seed(0)
    model = randomize_bn_stats(_Untraceable()).eval()
    x = torch.randn(2, 8, 10, 10)
    gm, report = bnfold.reparameterize(model, x)
    assert any("torch.export" in n for n in report.notes)
    assert [e.into for e in report.merged] == ["block.conv_merged"]
    assert len(report.folded) == 3 and not report.kept
    with torch.no_grad():
        assert _rel(_flat(gm(x)), _reference(model, x)) < 1e-5


def test_fx_bad_input_is_a_bnfold_error() -> None:
    with pytest.raises(bnfold.BnfoldError):
        bnfold.reparameterize("model.pt")  # type: ignore[arg-type]
    with pytest.raises(bnfold.BnfoldError):
        bnfold.reparameterize(rep.get("repvgg_stage"), inplace=True)


class _Random(nn.Module):
    """Random conv(+BN) branches and identity-like branches on one input."""

    def __init__(self, n: int, c: int, specs: list[dict], extras: list[str]) -> None:
        super().__init__()
        conv, bn = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n], {
            1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[n]
        self.convs = nn.ModuleList(conv(c, c, s["k"], s["stride"], s["pad"], s["dil"],
                                        s["groups"], s["bias"], s["mode"]) for s in specs)
        self.bns = nn.ModuleList(bn(c) for s in specs)
        self.with_bn = [s["bn"] for s in specs]
        self.extras = extras
        self.bn_id = bn(c)
        self.scale = nn.Parameter(torch.randn(c, *(1,) * n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [bn(conv(x)) if use else conv(x)
                for conv, bn, use in zip(self.convs, self.bns, self.with_bn, strict=True)]
        out = outs[0]
        for y in outs[1:]:
            out = out + y
        for kind in self.extras:
            out = out + (x if kind == "x" else self.bn_id(x) if kind == "bn" else x * self.scale)
        return out


@st.composite
def _random_blocks(draw: st.DrawFn) -> tuple[int, int, list[dict], list[str]]:
    n = draw(st.integers(1, 3))
    c = draw(st.sampled_from([2, 4]))
    groups = draw(st.sampled_from([1, 2, c]))
    stride, dil = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    specs = []
    for _ in range(draw(st.integers(2, 3))):
        k = draw(st.sampled_from([1, 2, 3]))
        specs.append({
            "k": k, "dil": dil, "groups": draw(st.sampled_from([groups, groups, 1])),
            "stride": draw(st.sampled_from([stride, stride, 1])),
            "pad": draw(st.sampled_from([(k - 1) * dil // 2, 0, 1])),
            "mode": draw(st.sampled_from(["zeros", "zeros", "reflect"])),
            "bias": draw(st.booleans()), "bn": draw(st.booleans())})
    extras = draw(st.lists(st.sampled_from(["x", "bn", "scale"]), max_size=2))
    return n, c, specs, extras


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_random_blocks())
def test_fx_property_merged_exactly_or_refused(block) -> None:
    n, c, specs, extras = block
    torch.manual_seed(0)
    model = randomize_bn_stats(_Random(n, c, specs, extras)).eval()
    x = torch.randn(2, c, *(7 if n < 3 else 5,) * n)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        assume(False)  # branch outputs of different sizes: not a valid model
    gm, report = bnfold.reparameterize(model, x)
    branches = [ConvBranch(f"c{i}", np.zeros((c, c // s["groups"], *(s["k"],) * n)), None,
                           (s["stride"],) * n, (((s["pad"],) * 2),) * n, (s["dil"],) * n,
                           s["groups"], s["mode"]) for i, s in enumerate(specs)]
    branches += [AffineBranch(e) for e in extras]
    expected = merge_refusal(branches) is None
    assert len(report.merged) == int(expected), report.table()
    if not expected:
        assert report.kept[0].reason and report.kept[0].reason.startswith("not merged")
    with torch.no_grad():
        assert _rel(_flat(gm(x)), _reference(model, x)) < 1e-5


# ---------------------------------------------------------------------------------------------
# ONNX exports
# ---------------------------------------------------------------------------------------------

def _export(model: nn.Module, x: torch.Tensor, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                     verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False, do_constant_folding=False)
        return onnx.load_from_string(f.getvalue())


def _run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module", params=[(n, d) for n in NAMES for d in (True, False)],
                ids=lambda p: f"{p[0]}-{'dynamo' if p[1] else 'torchscript'}")
def onnx_case(request: pytest.FixtureRequest):
    name, dynamo = request.param
    model = rep.get(name)
    proto = _export(model, rep.example_input(name), dynamo)
    before = proto.SerializeToString()
    out, report = bnfold.reparameterize_onnx(proto)
    return name, model, proto, before, out, report


def test_onnx_exact_vs_float64(onnx_case) -> None:
    name, model, _, _, out, _ = onnx_case
    onnx.checker.check_model(out)
    x = rep.example_input(name, seed=0)  # the exported shape, fresh values
    ref = _reference(model, x)
    ref = ref[: ref.numel() // (2 if name == "refuse_reader" else 1)]  # first output only
    with torch.no_grad():
        unfolded = _rel(_flat(model(x))[: ref.numel()], ref)
    assert _rel(_run(out, x), ref) < max(1e-5, 4 * unfolded)


def test_onnx_merges_what_it_should(onnx_case) -> None:
    name, model, proto, before, out, report = onnx_case
    case = rep.CASES[name]
    assert proto.SerializeToString() == before  # input untouched
    assert len(report.merged) == case.merged_onnx
    if name in rep.PATTERNS or name.startswith("repvgg"):
        assert not [n for n in out.graph.node if n.op_type == "BatchNormalization"]
        assert sum(n.op_type == "Conv" for n in out.graph.node) == sum(
            isinstance(m, nn.modules.conv._ConvNd) for m in rep.deploy(model).modules())
    if case.refusal and report.kept and report.kept[0].reason.startswith("not merged"):
        assert case.refusal_onnx in report.kept[0].reason
    absorbed = [e for e in report.folded if e.details.get("direction") == "branch merge"]
    assert len(report.folded) + len(report.kept) - sum(
        (e.reason or "").startswith("not merged") for e in report.kept) == _bn_count(model)
    assert {e.into for e in absorbed} <= {e.into for e in report.merged}


def test_onnx_path_and_ir_inputs(tmp_path) -> None:
    proto = _export(rep.get("repvgg_stage"), rep.example_input("repvgg_stage"), False)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model, report = bnfold.reparameterize_onnx(str(path))
    assert len(report.merged) == 3 and not isinstance(model, onnx.ModelProto)
    with pytest.raises(bnfold.BnfoldError):
        bnfold.reparameterize_onnx(str(tmp_path / "missing.onnx"))


def _onnx_block(n: int, c: int, specs: list[dict], extras: list[str], seed: int
                ) -> onnx.ModelProto:
    """A hand-built ONNX block: per-side pads (asymmetric too), no exporter involved."""
    rng = np.random.default_rng(seed)
    nodes, inits, summands = [], [], []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def bn(name: str, src: str) -> str:
        names = [init(f"{name}_{p}", v) for p, v in (
            ("g", rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)), ("b", rng.normal(0, .5, c)),
            ("m", rng.normal(0, 0.5, c)), ("v", rng.uniform(0.3, 3, c)))]
        nodes.append(helper.make_node("BatchNormalization", [src, *names], [name], name=name))
        return name

    for i, s in enumerate(specs):
        w = init(f"w{i}", rng.normal(0, 0.3, (c, c // s["groups"], *(s["k"],) * n)))
        inputs = ["x", w] + ([init(f"b{i}", rng.normal(0, 0.3, c))] if s["bias"] else [])
        nodes.append(helper.make_node(
            "Conv", inputs, [f"conv{i}"], name=f"conv{i}", group=s["groups"],
            strides=[s["stride"]] * n, dilations=[s["dil"]] * n,
            pads=[s["begin"]] * n + [s["end"]] * n))
        summands.append(bn(f"bn{i}", f"conv{i}") if s["bn"] else f"conv{i}")
    for j, kind in enumerate(extras):
        if kind == "x":
            summands.append("x")
        elif kind == "bn":
            summands.append(bn(f"bn_id{j}", "x"))
        else:
            scale = init(f"scale{j}", rng.normal(0, 1, (c, *(1,) * n)))
            nodes.append(helper.make_node("Mul", ["x", scale], [f"mul{j}"], name=f"mul{j}"))
            summands.append(f"mul{j}")
    acc = summands[0]
    for k, s in enumerate(summands[1:]):
        out = "y" if k == len(summands) - 2 else f"sum{k}"
        nodes.append(helper.make_node("Add", [acc, s], [out], name=f"add{k}"))
        acc = out
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@st.composite
def _onnx_blocks(draw: st.DrawFn) -> tuple[int, int, list[dict], list[str]]:
    n, c, specs, extras = draw(_random_blocks())
    for s in specs:
        s["begin"], s["end"] = draw(st.sampled_from(
            [(s["pad"], s["pad"]), (0, 0), (s["pad"], 0), (1, s["pad"])]))
    return n, c, specs, extras


@settings(max_examples=80, deadline=None, derandomize=True)
@given(_onnx_blocks(), st.integers(0, 1000))
def test_onnx_property_merged_exactly_or_refused(block, seed: int) -> None:
    n, c, specs, extras = block
    proto = _onnx_block(n, c, specs, extras, seed)
    x = torch.randn(2, c, *(7 if n < 3 else 5,) * n)
    try:
        ref = _run(proto, x.double().float())
    except Exception:
        assume(False)  # branch outputs of different sizes
    out, report = bnfold.reparameterize_onnx(proto)
    branches = [ConvBranch(f"c{i}", np.zeros((c, c // s["groups"], *(s["k"],) * n)), None,
                           (s["stride"],) * n, (((s["begin"], s["end"]),) * n),
                           (s["dil"],) * n, s["groups"]) for i, s in enumerate(specs)]
    branches += [AffineBranch(e) for e in extras]
    assert len(report.merged) == int(merge_refusal(branches) is None), report.table()
    assert [o.name for o in out.graph.output] == ["y"]  # the sum's name survives the merge
    got = _run(out, x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_cli_fold_merge_branches_and_inspect(run_cli, tmp_path) -> None:
    import json

    src, out = tmp_path / "rep.onnx", tmp_path / "rep.merged.onnx"
    onnx.save(_export(rep.get("repvgg_stage"), rep.example_input("repvgg_stage"), True), src)
    refused = tmp_path / "refused.onnx"
    onnx.save(_export(rep.get("refuse_stride"), rep.example_input("refuse_stride"), True),
              refused)
    merged, plain, inspect, kept, bad = run_cli.many([
        ["fold", src, "-o", out, "--merge-branches", "--validate", "--providers", "cpu",
         "--json"],
        ["fold", src, "-o", tmp_path / "plain.onnx", "--json"],
        ["inspect", src, "--json"], ["inspect", refused],
        ["fold", tmp_path / "missing.onnx", "-o", out, "--merge-branches"]])
    doc = json.loads(merged.stdout)
    assert merged.returncode == 0 and doc["passed"] and doc["fold"]["counts"]["merged"] == 3
    assert sum(n.op_type == "Conv" for n in onnx.load(out).graph.node) == 3
    assert "merged" not in json.loads(plain.stdout)["fold"]["counts"]  # not by default
    blocks = json.loads(inspect.stdout)["branches"]
    assert [e["action"] for e in blocks["entries"]] == ["merged"] * 3 and blocks["dry_run"]
    assert "would keep" in kept.stdout and "different strides" in kept.stdout
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_onnx_deep_dynamo_export_zero_bias_cones_merge() -> None:
    """torch's dynamo export writes a bias-free conv's zero bias as ``Expand(CastLike(0, x),
    Shape(W))``; ``x`` deep in a branchy net (read for its dtype only) must not stop a merge."""
    torch.manual_seed(0)
    layers = [m for _ in range(10) for m in (rep.RepBlock(2, 4, 4), nn.Tanh())]
    model = randomize_bn_stats(nn.Sequential(*layers)).eval()
    x = torch.randn(1, 4, 8, 8)
    out, report = bnfold.reparameterize_onnx(_export(model, x, True))
    assert len(report.merged) == 10 and not report.kept
    assert _rel(_run(out, x), _reference(model, x)) < 1e-5


class _EvenSame(nn.Module):
    """A 4x4 conv with ``padding="same"`` (one more pad after than before) and a padding mode
    other than zeros, beside a 1x1 branch: the merged conv pads first, in that mode."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 4, padding="same", padding_mode=mode, bias=False)
        self.bn, self.conv1, self.bn1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1(self.conv1(x))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_fx_uneven_same_padding_keeps_its_mode(mode: str) -> None:
    model = randomize_bn_stats(_EvenSame(mode), seed=1).eval()
    gm, report = bnfold.reparameterize(model)
    assert report.entries[0].action == "merged" and _bn_nodes(gm) == 0
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert _rel(gm(x), _reference(model, x)) < 1e-5


class _ConvTwice(nn.Module):
    """One conv module called twice on the same input, each call with its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


def test_fx_one_conv_called_on_two_branches_merges() -> None:
    model = randomize_bn_stats(_ConvTwice(), seed=2).eval()
    gm, report = bnfold.reparameterize(model)
    assert report.entries[0].action == "merged"
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert _rel(gm(x), _reference(model, x)) < 1e-5


class _SamePadded(nn.Module):
    """A RepVGG block whose 3x3 has ``padding="same"``: TorchScript exports ``auto_pad``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4)
        self.conv1x1, self.bn1x1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.bn_id = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1x1(self.conv1x1(x)) + self.bn_id(x)


@pytest.mark.parametrize(("build", "why"), [(rep.ReflectWithOneByOne, "through /conv/Pad")])
def test_onnx_a_block_it_cannot_merge_says_why(build, why: str) -> None:
    """Branches of one tensor that the ONNX pass cannot read as convs (a Pad node before one)
    are a block kept with the reason (it had no entry)."""
    torch.manual_seed(0)
    model = randomize_bn_stats(build(), 1).eval()
    x = torch.randn(2, 4, 8, 8)
    proto = _export(model, x, dynamo=False)
    for pass_ in (bnfold.reparameterize_onnx, inspect_branches):
        result = pass_(proto)
        report = result if isinstance(result, bnfold.Report) else result.report
        blocks = [e for e in report.kept if e.reason.startswith("not merged")]
        assert len(blocks) == 1 and why in blocks[0].reason, report.table()
    out, _ = bnfold.reparameterize_onnx(proto)
    assert _rel(_run(out, x), _reference(model, x)) < 1e-5


def test_fx_a_block_of_training_bns_says_why() -> None:
    model = rep.get("repvgg_stage").train()
    _, report = bnfold.reparameterize(model, rep.example_input("repvgg_stage"))
    blocks = [e for e in report.kept if e.reason.startswith("not merged")]
    assert len(blocks) == 3 and all("training mode" in e.reason for e in blocks)


class _SharedPad(nn.Module):
    """Two 3x3 branches of one reflect-padded tensor: the pad output is the shared input."""

    def __init__(self) -> None:
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.functional.pad(x, [1, 1, 1, 1], mode="reflect")
        return self.b3(self.c3(p)) + self.b1(self.c1(p))


def test_onnx_branches_of_one_pad_output_still_merge() -> None:
    """A conv read through a Pad names the Pad's input as a (refused) option too; the pad
    output, read by every branch as a conv, is still the block's input."""
    torch.manual_seed(2)
    model = randomize_bn_stats(_SharedPad(), 2).eval()
    x = torch.randn(2, 4, 8, 8)
    out, report = bnfold.reparameterize_onnx(_export(model, x, dynamo=False))
    assert len(report.merged) == 1 and not report.kept
    assert _rel(_run(out, x), _reference(model, x)) < 1e-5


def _same_block(auto_pad: str, stride: int) -> onnx.ModelProto:
    """x -> Conv 3x3 (dilation 2, ``auto_pad``) + Conv 1x1 + x, each branch through a BN."""
    rng = np.random.default_rng(3)
    nodes, inits = [], []
    for name, k, attrs in (("a", 3, {"auto_pad": auto_pad, "dilations": [2, 2]}),
                           ("b", 1, {})):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, k, k)).astype(
            np.float32), f"w{name}"))
        nodes.append(helper.make_node("Conv", ["x", f"w{name}"], [f"c{name}"], name=name,
                                      strides=[stride, stride], **attrs))
        for p, v in (("s", rng.uniform(0.5, 1.5, 4)), ("t", rng.normal(0, 1, 4)),
                     ("m", rng.normal(0, 1, 4)), ("v", rng.uniform(0.3, 3, 4))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{name}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{name}", *(
            f"{p}{name}" for p in "stmv")], [f"n{name}"], name=f"bn_{name}"))
    nodes.append(helper.make_node("Add", ["na", "nb"], ["y"], name="sum"))
    graph = helper.make_graph(nodes, "same", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 4, 9, 9])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_onnx_auto_pad_same_merges_at_stride_1_and_is_kept_above(auto_pad: str) -> None:
    """At stride 1 ``SAME_*`` pads ``(k - 1) * d`` whatever the input size: the block merges
    (exact against float64); at stride 2 the pads depend on the input size: kept, saying so."""
    from onnx_cases import feeds, reference, rel_err, run_ort

    model = _same_block(auto_pad, 1)
    out, report = bnfold.reparameterize_onnx(model)
    assert len(report.merged) == 1, report.table()
    x = feeds(model, seed=4)
    assert rel_err(run_ort(out, x), reference(model, x)) < 1e-5
    _, report = bnfold.reparameterize_onnx(_same_block(auto_pad, 2))
    blocks = [e for e in report.kept if e.reason.startswith("not merged")]
    assert len(blocks) == 1 and "at stride [2, 2]" in blocks[0].reason


class _Residual(nn.Module):
    """A ResNet basic block: conv-BN-relu-conv-BN plus the identity. No branch block."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_a_residual_sum_is_no_branch_block(ir: str) -> None:
    """Its summands read different tensors and no two read one: no block entry, only the two
    BN folds (a block entry "branches read different tensors" appeared once a refused branch
    counted as a reader)."""
    torch.manual_seed(3)
    model = randomize_bn_stats(_Residual(), 3).eval()
    x = torch.randn(1, 3, 8, 8)
    if ir == "fx":
        _, report = bnfold.reparameterize(model, x)
    else:
        _, report = bnfold.reparameterize_onnx(_export(model, x, dynamo=True))
    assert [e.action for e in report.entries] == ["folded", "folded"], report.table()


# ---------------------------------------------------------------------------------------------
# Constant summands, Sum, no-ops, duplicate summands, IR 3 (sweep C)
# ---------------------------------------------------------------------------------------------

def _pair_block(tail: list[tuple[str, list[str], list[str], str]], *, c: int = 4, h: int = 6,
                out_shape: list[int] | None = None, consts: dict[str, np.ndarray] | None = None,
                ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    """``x [1, c, h, h]`` -> BN(Conv3x3(x)) ("b3", node "bn3") and BN(Conv1x1(x)) ("b1", node
    "bn1") with non-trivial statistics, then ``tail`` (``(op, inputs, outputs, name)``)
    summing them into ``y``; ``consts`` become initializers. IR version < 4: every
    initializer is a graph input too, as that IR requires."""
    from onnx_cases import Builder

    b = Builder(seed=11)
    b.nodes.append(helper.make_node("Conv", ["x", b.rand("W3", [c, c, 3, 3])], ["c3"],
                                    name="conv3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    b.nodes.append(helper.make_node("Conv", ["x", b.rand("W1", [c, c, 1, 1])], ["c1"],
                                    name="conv1", kernel_shape=[1, 1]))
    for src, name in (("c3", "3"), ("c1", "1")):
        b.bn(src, f"b{name}", c)
        b.nodes[-1].name = f"bn{name}"
    for name, arr in (consts or {}).items():
        b.init(name, arr)
    b.nodes.extend(helper.make_node(op, i, o, name=n) for op, i, o, n in tail)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in b.inits]
    graph = helper.make_graph(b.nodes, "pair", inputs, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, out_shape or [1, c, h, h])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _check_vs_float64(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """``out`` passes the full checker and equals the unfolded ``model`` in float64 (shape
    too) on fresh random inputs."""
    from onnx_cases import feeds, reference, rel_err, run_ort

    onnx.checker.check_model(out, full_check=True)
    x = feeds(model, seed=9)
    assert rel_err(run_ort(out, x), reference(model, x)) < 1e-5


def test_onnx_zero_summand_that_widens_the_sum_keeps_the_block() -> None:
    """``Add(Add(b3, b1), z)``, ``z`` zero of shape [3, C, H, W] on a [1, C, H, W] sum: the
    zero widens the output, so it is no "adds nothing" (the merge gave a [1, ...] output and
    a model the checker refuses); a zero of the sum's own shape still merges."""
    zeros = np.zeros((3, 4, 6, 6))
    model = _pair_block([("Add", ["b3", "b1"], ["s"], "add"), ("Add", ["s", "z"], ["y"], "addz")],
                        out_shape=[3, 4, 6, 6], consts={"z": zeros})
    out, report = bnfold.reparameterize_onnx(model)
    blocks = [e for e in report.kept if e.reason.startswith("not merged")]
    assert len(blocks) == 1 and "broadcasts dim 0" in blocks[0].reason, report.table()
    _check_vs_float64(model, out)
    same = _pair_block([("Add", ["b3", "b1"], ["s"], "add"), ("Add", ["s", "z"], ["y"], "addz")],
                       consts={"z": zeros[:1]})
    out, report = bnfold.reparameterize_onnx(same)
    assert len(report.merged) == 1 and sum(n.op_type == "Conv" for n in out.graph.node) == 1
    _check_vs_float64(same, out)


@pytest.mark.parametrize(("shape", "merges"), [
    ([4, 1, 1], True), ([1, 4, 1, 1], True), ([], True), ([1], True),
    ([1, 1, 6, 6], False), ([6], False), ([2, 4, 1, 1], False)])
def test_onnx_constant_summand_is_a_bias_or_a_kept_block(shape: list[int], merges: bool
                                                         ) -> None:
    """A bias Add after the branch sum: one value per channel (or one in all) merges into
    the conv's bias; any other constant keeps the block, with the reason (it was silent)."""
    bias = np.random.default_rng(5).normal(0, 1, shape)
    model = _pair_block([("Add", ["b3", "b1"], ["s"], "add"),
                         ("Add", ["s", "bias"], ["y"], "addbias")],
                        consts={"bias": bias}, out_shape=[len(bias) if bias.ndim == 4 else 1,
                                                          4, 6, 6])
    out, report = bnfold.reparameterize_onnx(model)
    for result in (report, inspect_branches(model)):
        assert len([e for e in result.entries if "branches" in e.details]) == 1, result.table()
    assert len(report.merged) == int(merges), report.table()
    if merges:
        assert [n.op_type for n in out.graph.node] == ["Conv"]
        assert report.merged[0].details["summands"][-1] == "bias"
    else:
        assert "constant summand bias" in report.kept[0].reason
    _check_vs_float64(model, out)


class _BiasAfterSum(nn.Module):
    """RepVGG-like pair plus a Python number after the sum."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1(self.conv1(x)) + self.c


@pytest.mark.parametrize("c", [0.75, 0])
def test_fx_number_after_the_sum_merges_into_the_bias(c: float) -> None:
    model = randomize_bn_stats(_BiasAfterSum(c), seed=4).eval()
    gm, report = bnfold.reparameterize(model)
    assert len(report.merged) == 1 and _bn_nodes(gm) == 0, report.table()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert _rel(gm(x), _reference(model, x)) < 1e-6


@pytest.mark.parametrize("tail", [
    [("Sum", ["b3", "b1", "x"], ["y"], "sum")],
    [("Sum", ["b3", "b1"], ["s"], "sum"), ("Add", ["s", "x"], ["y"], "add")],
    [("Add", ["b3", "b1"], ["s"], "add"), ("Sum", ["x", "s", "b0"], ["y"], "sum")]],
    ids=["sum3", "sum-then-add", "add-then-sum-bias"])
def test_onnx_sum_op_is_a_block_like_a_chain_of_adds(tail: list) -> None:
    """``Sum`` adds its inputs as a chain of ``Add`` does: the block merges (it was neither
    merged nor reported)."""
    model = _pair_block(tail, consts={"b0": np.random.default_rng(2).normal(0, 1, (4, 1, 1))})
    out, report = bnfold.reparameterize_onnx(model)
    assert len(report.merged) == 1 and report.merged[0].details["branches"] == 3, report.table()
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert [e.action for e in inspect_branches(model).entries] == ["merged"]
    _check_vs_float64(model, out)


@pytest.mark.parametrize(("tail", "merges"), [
    ([("Identity", ["b1"], ["i1"], "idn"), ("Add", ["b3", "i1"], ["y"], "add")], True),
    ([("Identity", ["b1"], ["i1"], "idn"), ("Dropout", ["i1"], ["d1"], "drop"),
      ("Add", ["b3", "d1"], ["y"], "add")], True),
    ([("Identity", ["x"], ["ix"], "idn"), ("Add", ["b3", "b1"], ["s"], "add"),
      ("Add", ["s", "ix"], ["y"], "add2")], True),
    ([("Identity", ["b1"], ["i1"], "idn"), ("Add", ["b3", "i1"], ["s"], "add"),
      ("Mul", ["s", "b1"], ["y"], "mul")], False)],
    ids=["identity", "identity-dropout", "identity-of-x", "no-op-input-read-elsewhere"])
def test_onnx_no_ops_between_a_branch_and_the_sum_are_looked_through(tail: list,
                                                                      merges: bool) -> None:
    """``Identity`` / inference ``Dropout`` pass a branch on unchanged: the block merges and
    they go with it (it was neither merged nor reported); a branch whose output another node
    reads too is kept, with the reason."""
    model = _pair_block(tail)
    out, report = bnfold.reparameterize_onnx(model)
    assert len(report.merged) == int(merges), report.table()
    if merges:
        assert [n.op_type for n in out.graph.node] == ["Conv"]
    else:
        assert "also feeds mul" in report.kept[0].reason, report.table()
    _check_vs_float64(model, out)


class _Twice(nn.Module):
    """One Conv+BN branch summed with itself (``b + b``) next to a 1x1 branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bn(self.conv(x))
        return b + b


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_a_branch_summed_twice_merges_and_its_bn_has_one_entry(ir: str) -> None:
    """``Add(b, b)``: the merge is twice the branch, and the BN has one report entry (it
    had two)."""
    if ir == "onnx":
        model = _pair_block([("Add", ["b3", "b3"], ["s"], "add"),
                             ("Add", ["s", "b1"], ["y"], "add2")])
        out, report = bnfold.reparameterize_onnx(model)
        _check_vs_float64(model, out)
        bns = ["bn3", "bn1"]
    else:
        torch.manual_seed(6)
        module = randomize_bn_stats(_Twice(), 6).eval()
        gm, report = bnfold.reparameterize(module)
        x = torch.randn(2, 4, 6, 6)
        with torch.no_grad():
            assert _rel(gm(x), _reference(module, x)) < 1e-6
        bns = ["bn"]
    assert len(report.merged) == 1, report.table()
    assert sorted(e.bn for e in report.folded) == sorted(bns), report.table()


def test_onnx_ir3_initializer_inputs_are_constants_to_the_merge_too() -> None:
    """IR version 3 lists every initializer among the graph inputs, where it is a constant:
    the plain fold folds those BNs, and the merge now merges their block (it kept it: "BN
    scale ... is a graph input"); the inputs stay exactly the original ones."""
    model = _pair_block([("Add", ["b3", "b1"], ["y"], "add")], ir_version=3, opset=9)
    out, report = bnfold.reparameterize_onnx(model)
    assert len(report.merged) == 1 and not report.kept, report.table()
    assert sorted(e.bn for e in report.folded) == ["bn1", "bn3"]
    assert any("IR version 3" in n for n in report.notes)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert sum(n.op_type == "Conv" for n in out.graph.node) == 1
    _check_vs_float64(model, out)
