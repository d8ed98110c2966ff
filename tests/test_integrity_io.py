"""What bnfold writes, and where: external data never overwrites a file, a graph and its data
change together, -o/--report never name a data file or replace a special file, exit 2 means
nothing was written, and in-memory models read external data only inside ``base_dir``.

The CLI runs in real subprocesses. Every output is checked numerically: ONNX Runtime on the
written file against a float64 reference of the unfolded model, on fresh random inputs, with
non-trivial BN statistics (``onnx_cases.Builder.bn``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_cases import Builder, count, feeds, reference, rel_err, run_ort

import bnfold
from bnfold.errors import BadInputError
from bnfold.io.external_data import data_files_of, files_named_by
from bnfold.io.fileio import save_onnx

TOL = 1e-5


def conv_bn(seed: int) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv, plus a MatMul weight no fold touches (it stays external):
    every weight is over 1 KiB, so an output keeps external data."""
    b = Builder(seed)
    b.node("Conv", ["x", b.rand("w1", [16, 8, 3, 3])], ["c1"], pads=[1, 1, 1, 1])
    b.bn("c1", "n1", 16)
    b.node("Relu", ["n1"], ["r"])
    b.node("Conv", ["r", b.rand("w2", [8, 16, 3, 3])], ["c2"], pads=[1, 1, 1, 1])
    b.node("MatMul", ["x", b.rand("untouched", [6, 64])], ["y2"])
    return b.model({"x": [1, 8, 6, 6]}, {"c2": None, "y2": None})


def save_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    """Write ``model`` with every tensor in ``location`` (appended if that file exists)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, path, save_as_external_data=True, location=location,
                    size_threshold=0)
    return path


def assert_computes(path: Path, original: onnx.ModelProto, bn_left: int = 0) -> None:
    """The model at ``path`` (with its external data) computes ``original`` in float64."""
    written = onnx.load(str(path))
    x = feeds(original, seed=7)
    assert rel_err(run_ort(written, x), reference(original, x)) < TOL
    assert count(written) == bn_left


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("bnfold: error: ") and "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture
def ext(tmp_path) -> tuple[onnx.ModelProto, Path]:
    """``m.onnx`` with its tensors in ``m.onnx.data``."""
    model = conv_bn(1)
    return model, save_external(model, tmp_path / "m.onnx", "m.onnx.data")


# ----------------------------------------------------------------------------- item 1

def test_output_data_never_overwrites_a_file(run_cli, ext, tmp_path):
    model, src = ext
    first = tmp_path / "a" / "out.onnx"
    assert run_cli("fold", src, "-o", first).returncode == 0
    (data,) = files_named_by(first)  # <out name>.<content hash>.data, beside it
    assert data.parent == first.parent.resolve() and data.name.startswith("out.onnx.")
    other = tmp_path / "b"
    other.mkdir()
    # Unrelated files where the old code put the data, and where this content's name goes.
    for name in ("out.onnx.data", data.name):
        (other / name).write_bytes(b"unrelated " + name.encode())
    res = run_cli("fold", src, "-o", other / "out.onnx")
    assert res.returncode == 0, res.stderr
    for name in ("out.onnx.data", data.name):
        assert (other / name).read_bytes() == b"unrelated " + name.encode()
    (taken,) = files_named_by(other / "out.onnx")
    assert taken.name == data.name.replace(".data", "-1.data")
    assert_computes(other / "out.onnx", model)


def test_output_named_after_the_input_data_file(run_cli, tmp_path):
    model = conv_bn(2)
    src = save_external(model, tmp_path / "m.onnx", "f.onnx.data")
    before = digest(tmp_path / "f.onnx.data")
    res = run_cli("fold", src, "-o", tmp_path / "f.onnx")
    assert res.returncode == 0, res.stderr
    assert digest(tmp_path / "f.onnx.data") == before
    assert_computes(src, model, bn_left=1)  # the input still computes what it did
    assert_computes(tmp_path / "f.onnx", model)


def test_folder_in_place_over_models_sharing_one_data_file(run_cli, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    models = {"a": conv_bn(3), "b": conv_bn(4)}
    for name, model in models.items():  # b's tensors are appended to a's data file
        save_external(model, folder / f"{name}.onnx", "a.onnx.data")
    for name, model in models.items():
        assert_computes(folder / f"{name}.onnx", model, bn_left=1)
    res = run_cli("fold", folder, "--in-place")
    assert res.returncode == 0, res.stderr
    for name, model in models.items():
        assert_computes(folder / f"{name}.onnx", model)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_in_place_refolds_remove_only_data_bnfold_wrote(run_cli, ext, tmp_path):
    model, src = ext
    before = digest(tmp_path / "m.onnx.data")
    for _ in range(3):
        res = run_cli("fold", src, "--in-place")
        assert res.returncode == 0, res.stderr
    assert digest(tmp_path / "m.onnx.data") == before  # not written by bnfold: kept
    (current,) = files_named_by(src)
    assert [p.name for p in tmp_path.glob("m.onnx.*.data")] == [current.name]
    assert_computes(src, model)



def test_a_users_data_file_named_like_bnfolds_is_kept(run_cli, ext, tmp_path):
    """The old output names ``out.onnx.<16 hex>.data``, bnfold's pattern, but bnfold did not
    write it (no record in the graph's metadata): replacing the output leaves that file."""
    model, src = ext
    other = conv_bn(5)
    out = save_external(other, tmp_path / "out.onnx", "out.onnx.0123456789abcdef.data")
    before = digest(tmp_path / "out.onnx.0123456789abcdef.data")
    res = run_cli("fold", src, "-o", out)
    assert res.returncode == 0, res.stderr
    assert digest(tmp_path / "out.onnx.0123456789abcdef.data") == before
    (written,) = files_named_by(out)
    assert data_files_of(out)[1] == written.name  # bnfold's own: recorded
    assert_computes(out, model)
    res = run_cli("fold", src, "-o", out)  # a refold replaces bnfold's own file
    assert res.returncode == 0, res.stderr
    assert not written.exists() and (tmp_path / "out.onnx.0123456789abcdef.data").exists()
    assert_computes(out, model)

# ----------------------------------------------------------------------------- item 2

def test_a_failing_graph_rename_leaves_the_old_pair(ext, tmp_path, monkeypatch):
    model, src = ext
    out = tmp_path / "o" / "out.onnx"
    save_onnx(bnfold.fold_onnx(src).model, out)
    before = sorted(p.name for p in out.parent.iterdir())
    other = save_external(conv_bn(5), tmp_path / "n.onnx", "n.onnx.data")
    real = os.replace

    def crash_on_graph(src_path, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError(5, "Input/output error")
        return real(src_path, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_graph)
    with pytest.raises(BadInputError, match="Input/output error"):
        save_onnx(bnfold.fold_onnx(other).model, out)
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing new, nothing lost
    assert_computes(out, model)


_WRITER = """
import os, sys, time
from pathlib import Path
from bnfold.io.fileio import save_onnx
from bnfold.passes.onnx.fold import fold_onnx
src, out, ready, go = sys.argv[1:5]
delays = [float(d) for d in sys.argv[5:7]]  # before the 1st and the 2nd rename
real = os.replace
def slow(*args, **kwargs):
    time.sleep(delays.pop(0) if delays else 0)
    return real(*args, **kwargs)
os.replace = slow
folded = fold_onnx(src).model
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
save_onnx(folded, out)
"""


def test_two_concurrent_writers_leave_a_consistent_pair(tmp_path):
    """Writer A renames its data first and its graph last, B in between: the old code ended
    with A's graph and B's data."""
    srcs = {k: save_external(conv_bn(s), tmp_path / f"{k}.onnx", f"{k}.onnx.data")
            for k, s in (("a", 6), ("b", 7))}
    out, go = tmp_path / "o" / "out.onnx", tmp_path / "go"
    delays = {"a": ("0", "1.5"), "b": ("0.5", "0")}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, srcs[k], out, tmp_path / f"r{k}",
                               go, *delays[k]]) for k in srcs]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"r{k}").exists() for k in srcs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    written = onnx.load(str(out))
    x = feeds(conv_bn(6), seed=7)
    got = run_ort(written, x)
    errs = [rel_err(got, reference(onnx.load(str(srcs[k])), x)) for k in srcs]
    assert min(errs) < TOL, errs  # A's pair or B's, never a mix
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


_BLOCKED_CLI = """
import sys, time
from pathlib import Path
from bnfold import cli
from bnfold.io import staged_save
real = staged_save.write_model
saves = []
def blocked(model, f):  # the last file's graph: written, not yet renamed
    real(model, f)
    saves.append(f.name)
    if len(saves) == int(sys.argv[2]):
        Path(sys.argv[1]).touch()
        time.sleep(120)
staged_save.write_model = blocked
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize(("sig", "folder"), [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                             (signal.SIGTERM, True)])
def test_sigterm_and_sighup_remove_temp_files(ext, tmp_path, sig, folder):
    model, src = ext
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "m.onnx").write_bytes(b"previous")
    if folder:  # the first file is staged when the second is killed: neither is written
        src = tmp_path / "in"
        src.mkdir()
        for name in ("a", "m"):
            save_external(model, src / f"{name}.onnx", f"{name}.onnx.data")
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_CLI, marker, str(1 + folder),
                             "fold", src, "-o", out_dir if folder else out_dir / "m.onnx"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
        time.sleep(0.05)
    assert len(list(out_dir.iterdir())) > 2  # data and graph temp files exist now
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"bnfold: error: terminated by {sig.name}"]
    assert [p.name for p in out_dir.iterdir()] == ["m.onnx"]
    assert (out_dir / "m.onnx").read_bytes() == b"previous"


# ----------------------------------------------------------------------------- item 3

def test_output_or_report_naming_a_data_file_is_refused(run_cli, ext, tmp_path):
    model, src = ext
    data = tmp_path / "m.onnx.data"
    out = tmp_path / "out.onnx"
    assert run_cli("fold", src, "-o", out).returncode == 0
    (out_data,) = files_named_by(out)
    before = {p: digest(p) for p in (src, data, out, out_data)}
    cases = [["fold", src, "-o", data], ["fold", src, "-o", data, "--in-place"],
             ["inspect", src, "--report", data], ["validate", src, out, "--report", out_data],
             ["fold", src, "-o", out, "--report", out_data], ["insert", src, "-o", data],
             ["fold", tmp_path, "-o", tmp_path / "folded", "--report", data]]
    for args, res in zip(cases, run_cli.many(cases), strict=True):
        assert "external data file" in one_line_error(res), args
    assert {p: digest(p) for p in before} == before
    assert not (tmp_path / "folded").exists()
    assert_computes(src, model, bn_left=1)


# ----------------------------------------------------------------------------- item 4

def test_special_files_are_written_through(run_cli, ext, conv_bn_proto, tmp_path):
    plain = tmp_path / "plain.onnx"
    onnx.save(conv_bn_proto(), plain)
    link = tmp_path / "null_link"
    link.symlink_to(os.devnull)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    res = run_cli("fold", plain, "-o", link, "--report", fifo)
    reader.join(timeout=120)
    assert res.returncode == 0, res.stderr
    assert link.is_symlink() and stat.S_ISFIFO(fifo.stat().st_mode)
    assert b'"schema": "bnfold.fold/1"' in got[0]
    # /dev/null itself, as output and as report (checked through the symlink first, above).
    res = run_cli("fold", plain, "-o", os.devnull, "--report", os.devnull)
    assert res.returncode == 0, res.stderr
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert run_cli("inspect", plain, "--report", os.devnull).returncode == 0
    # Refused, one line: the model to stdout, and an external-data model to a device.
    _, src = ext
    for args in (["-o", "-"], ["-o", "/dev/stdout"]):
        assert "standard output" in one_line_error(run_cli("fold", plain, *args))
    assert "not a regular file" in one_line_error(run_cli("fold", src, "-o", os.devnull))
    assert not (tmp_path / "-").exists()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# ----------------------------------------------------------------------------- item 5

def test_a_failing_report_write_leaves_no_model_written(run_cli, ext, tmp_path):
    model, src = ext
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    report = blocker / "report.json"  # its folder cannot be made
    out = tmp_path / "o" / "out.onnx"
    cases = [["fold", src, "-o", out, "--report", report],
             ["insert", src, "-o", out, "--report", report],
             ["fold", src, "-o", out, "--report", report, "--json"]]
    for args, res in zip(cases, run_cli.many(cases, width=2), strict=True):
        assert "--report" in one_line_error(res), args
        assert "--json" not in args or res.stdout == ""  # no JSON claims a written model
    folder = tmp_path / "in"
    folder.mkdir()
    save_external(model, folder / "m.onnx", "m.onnx.data")
    res = run_cli("fold", folder, "-o", tmp_path / "o", "--report", report)
    assert res.returncode == 2 and "--report" in res.stderr.strip().splitlines()[-1]
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- item 9

def test_in_memory_models_with_external_data_need_base_dir(ext, tmp_path):
    model, src = ext
    proto = onnx.load(str(src), load_external_data=False)
    for call in (lambda **kw: bnfold.fold_onnx(proto, **kw),
                 lambda **kw: bnfold.reparameterize_onnx(proto, **kw),
                 lambda **kw: bnfold.inspect_onnx(proto, **kw),
                 lambda **kw: bnfold.insert_bn_onnx(proto, **kw),
                 lambda **kw: bnfold.validate(proto, proto, providers=("cpu",), samples=1, **kw),
                 lambda **kw: save_onnx(proto, tmp_path / "saved.onnx", **kw)):
        with pytest.raises(BadInputError, match="base_dir"):
            call()
    assert not (tmp_path / "saved.onnx").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folded, report = bnfold.fold_onnx(proto, base_dir=tmp_path)
    assert len(report.folded) == 1
    save_onnx(folded, elsewhere / "f.onnx", base_dir=tmp_path)
    assert_computes(elsewhere / "f.onnx", model)
    assert bnfold.inspect_onnx(proto, base_dir=tmp_path).folded
    merged, report = bnfold.reparameterize_onnx(proto, base_dir=tmp_path)
    assert len(report.folded) == 1
    save_onnx(merged, elsewhere / "r.onnx", base_dir=tmp_path)
    assert_computes(elsewhere / "r.onnx", model)
    assert bnfold.insert_bn_onnx(proto, base_dir=tmp_path, skip_last=False).report.inserted
    assert bnfold.validate(proto, folded, providers=("cpu",), samples=1,
                           base_dir=tmp_path).passed


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_base_dir_contains_external_data(ext, tmp_path, where):
    _, src = ext
    folder = tmp_path / "inner"
    folder.mkdir()
    location = {"absolute": str(tmp_path / "m.onnx.data"), "dotdot": "../m.onnx.data",
                "symlink": "link.data"}[where]
    (folder / "link.data").symlink_to(tmp_path / "m.onnx.data")  # leads out of inner/
    proto = onnx.load(str(src), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    for call in (lambda: bnfold.fold_onnx(proto, base_dir=folder),
                 lambda: bnfold.reparameterize_onnx(proto, base_dir=folder),
                 lambda: bnfold.inspect_onnx(proto, base_dir=folder),
                 lambda: bnfold.validate(proto, proto, providers=("cpu",), base_dir=folder),
                 lambda: save_onnx(proto, folder / "out.onnx", base_dir=folder)):
        with pytest.raises(BadInputError, match="location"):
            call()
    onnx.save(proto, folder / "p.onnx")  # the same model as a file: the same refusal
    with pytest.raises(BadInputError, match="location"):
        bnfold.fold_onnx(folder / "p.onnx")


def test_an_external_location_naming_the_model_file_is_refused(run_cli, tmp_path):
    """The graph file's own bytes are no weights: the tensor that names it is refused."""
    model = conv_bn(6)
    model.doc_string = "A" * 8192  # bytes in the model file where the tensor points
    bias = next(t for t in model.graph.initializer if t.name == "n1_B")
    bias.ClearField("raw_data")
    bias.ClearField("float_data")
    bias.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "m.onnx"), ("offset", "4096"),
                       ("length", str(4 * bias.dims[0]))):
        bias.external_data.add(key=key, value=value)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    before = set(tmp_path.iterdir())
    for command in (("fold", src, "-o", tmp_path / "out.onnx"), ("inspect", src),
                    ("validate", src, src)):
        assert "names the model file itself" in one_line_error(run_cli(*command))
    with pytest.raises(BadInputError, match="names the model file itself"):
        bnfold.fold_onnx(src)
    assert set(tmp_path.iterdir()) == before


def test_a_data_file_a_kept_copy_reads_is_not_removed(run_cli, ext, tmp_path):
    """A copy of the old output, kept beside it, still reads bnfold's data file: replacing
    the output leaves that file (a later replacement, with no copy, removes its own)."""
    model, src = ext
    out = tmp_path / "out.onnx"
    assert run_cli("fold", src, "-o", out).returncode == 0
    (first,) = files_named_by(out)
    copy = tmp_path / "out_v1.onnx"
    copy.write_bytes(out.read_bytes())
    other = save_external(conv_bn(7), tmp_path / "m2.onnx", "m2.onnx.data")
    assert run_cli("fold", other, "-o", out).returncode == 0
    assert first.exists() and files_named_by(copy) == {first}
    assert_computes(copy, model)
    (second,) = files_named_by(out)
    assert run_cli("fold", src, "-o", out).returncode == 0
    assert not second.exists() and first.exists()
    assert_computes(out, model)


def test_base_dir_leaves_the_callers_onnx_ir_model_unchanged(ext, tmp_path):
    """Binding an in-memory model's external tensors to ``base_dir`` puts new tensors into the
    pass's copy; the caller's tensors keep their (empty) folder."""
    import onnx_ir as ir

    model, src = ext
    for call in (lambda m: bnfold.fold_onnx(m, base_dir=tmp_path),
                 lambda m: bnfold.inspect_onnx(m, base_dir=tmp_path),
                 lambda m: bnfold.insert_bn_onnx(m, base_dir=tmp_path, skip_last=False),
                 lambda m: bnfold.validate(m, m, providers=("cpu",), samples=1,
                                           base_dir=tmp_path),
                 lambda m: save_onnx(m, tmp_path / "saved.onnx", base_dir=tmp_path)):
        given = ir.serde.deserialize_model(onnx.load(str(src), load_external_data=False))
        tensors = {name: v.const_value for name, v in given.graph.initializers.items()}
        call(given)
        assert {n: v.const_value for n, v in given.graph.initializers.items()} == tensors
        assert all(isinstance(t, ir.ExternalTensor) and t.base_dir == ""
                   for t in tensors.values())
    assert_computes(tmp_path / "saved.onnx", model, bn_left=1)


def test_a_constant_nodes_external_tensor_is_bound_to_base_dir(tmp_path):
    """A ``Constant`` node's value stored as external data (a tensor attribute) is read from
    ``base_dir`` too, the caller's model unchanged."""
    import onnx_ir as ir

    model = conv_bn(8)
    weight = next(t for t in model.graph.initializer if t.name == "w1")
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w1"], value=weight))
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "c.onnx",
                    save_as_external_data=True, location="c.onnx.data", size_threshold=0,
                    convert_attribute=True)  # (onnx.save_model moves the copy's data out)
    proto = onnx.load(str(tmp_path / "c.onnx"), load_external_data=False)
    assert proto.graph.node[0].attribute[0].t.data_location == onnx.TensorProto.EXTERNAL
    given = ir.serde.deserialize_model(proto)
    attr = given.graph.node(0).attributes["value"]
    folded, report = bnfold.fold_onnx(given, base_dir=tmp_path)
    assert [e.action for e in report.entries] == ["folded"]
    assert given.graph.node(0).attributes["value"] is attr and attr.value.base_dir == ""
    save_onnx(folded, tmp_path / "f.onnx")
    assert_computes(tmp_path / "f.onnx", model)


@pytest.mark.parametrize("size", [4, 512])  # one inlined on save, one over INLINE_LIMIT
def test_external_constant_tensors_in_a_subgraph_are_written_with_the_output(
        run_cli, tmp_path, size):
    """``If`` branches whose ``Constant`` values are stored in the input's data file: the
    output, in another folder, holds them (inline, or in its own data file), not a location
    that names the input's file."""
    b = Builder(9)
    b.node("Conv", ["x", b.rand("w", [size, 8, 1, 1])], ["c"])
    b.bn("c", "n", size)
    model = b.model({"x": [1, 8, 4, 4]}, {"n": None})
    rng = np.random.default_rng(3)
    branches = []
    for name in ("then", "else"):
        k = onnx.numpy_helper.from_array(rng.normal(size=(1, size, 1, 1)).astype(np.float32),
                                         f"k_{name}")
        branches.append(onnx.helper.make_graph(
            [onnx.helper.make_node("Constant", [], [f"kc_{name}"], value=k),
             onnx.helper.make_node("Add", ["n", f"kc_{name}"], [f"o_{name}"])], name, [],
            [onnx.helper.make_tensor_value_info(f"o_{name}", onnx.TensorProto.FLOAT,
                                                [1, size, 4, 4])]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(onnx.helper.make_node(
        "If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1]))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                  [1, size, 4, 4]))
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "m.onnx",
                    save_as_external_data=True, location="m.data", size_threshold=0,
                    convert_attribute=True)
    out = tmp_path / "out" / "o.onnx"
    res = run_cli("fold", tmp_path / "m.onnx", "-o", out)
    assert res.returncode == 0, res.stderr
    written = onnx.load(str(out))  # (refuses a location whose file is not there)
    onnx.checker.check_model(written, full_check=True)
    x = feeds(model, seed=7)
    assert rel_err(run_ort(written, x), reference(model, x)) < TOL
    assert count(written) == 0
