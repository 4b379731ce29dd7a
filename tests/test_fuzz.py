"""Bad input, fuzzed: corrupted stores and bad options.

A small valid store is written once; each hypothesis example copies it, applies one
randomly drawn corruption, and checks that

(a) :func:`daskptycho.open_dataset` raises one :class:`DatasetError` whose ``field``
    names what was corrupted,
(b) ``daskptycho info`` and ``daskptycho reconstruct`` exit with status 2 and write
    exactly one line to stderr, no traceback, and no output store,
(c) the input store is byte-for-byte unchanged (every file hashed before and after).

Bad options go through :func:`daskptycho.reconstruct` (drawn by hypothesis, and every
listed value once) and the command line, and must raise :class:`OptionsError` naming
the option, before any cluster starts.

``DASKPTYCHO_FUZZ_EXAMPLES=N`` runs N examples per test (default 150 stores, 60 option
sets; with the variable set the examples are drawn at random rather than from the
fixed derandomised sequence); ``DASKPTYCHO_FUZZ_COUNTS=path.json`` writes how many
examples of each kind ran and passed (docs/reliability.md).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import daskptycho as dp
from daskptycho import cli
from daskptycho.engines import ENGINES
from daskptycho.errors import DatasetError, OptionsError
from daskptycho.io.store import REQUIRED_ATTRS, SCHEMA

_ENV_EXAMPLES = os.environ.get("DASKPTYCHO_FUZZ_EXAMPLES")
STORE_EXAMPLES = int(_ENV_EXAMPLES or 150)
OPTION_EXAMPLES = int(_ENV_EXAMPLES or 60)
FUZZ = dict(deadline=None, database=None, derandomize=_ENV_EXAMPLES is None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

COUNTS = collections.defaultdict(lambda: {"tried": 0, "passed": 0})
J, N, CHUNK = 20, 16, 6   # 4x5 scan, 16 px patterns, 6 patterns per chunk (4 chunks, the last short)


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    path = os.environ.get("DASKPTYCHO_FUZZ_COUNTS")
    if path and COUNTS:
        out = {"store_examples": STORE_EXAMPLES, "option_examples": OPTION_EXAMPLES, "kinds": dict(sorted(COUNTS.items()))}
        out["total_tried"] = sum(v["tried"] for v in COUNTS.values())
        out["total_passed"] = sum(v["passed"] for v in COUNTS.values())
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid store with every optional variable: mask, probe, truth."""
    ds = dp.simulate(kind="pbtio3", scan=(4, 5), detector=N, slices=2)
    mask = np.ones((N, N), bool)
    mask[0, :2] = False
    ds["mask"] = (("ky", "kx"), mask, {"long_name": "valid detector pixels"})
    ds["probe"] = (("mode", "py", "px"), ds["truth_probe"].values * np.complex64(0.9), {"units": "sqrt(counts)"})
    path = tmp_path_factory.mktemp("fuzz") / "pristine.zarr"
    dp.write_dataset(ds, path, scan_chunk=CHUNK)
    dp.open_dataset(path)  # valid as written
    return str(path)


@pytest.fixture(scope="module")
def valid(pristine):
    return dp.open_dataset(pristine)


def tree_hash(path):
    """{relative path: sha256 of the bytes} for every file under ``path`` (or of ``path``
    itself when it is a file)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- corruptions
# Each takes (store path, hypothesis draw) and returns the field the error must name.


def _meta_path(path, name=""):
    return os.path.join(path, name, "zarr.json") if name else os.path.join(path, "zarr.json")


def _load_meta(path, name=""):
    with open(_meta_path(path, name)) as f:
        return json.load(f)


def _save_meta(path, meta, name=""):
    with open(_meta_path(path, name), "w") as f:
        json.dump(meta, f)


def _chunk_files(path, name):
    base = os.path.join(path, name, "c")
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs)


def _rewrite(path, name, data, dims=None):
    """Replace array ``name`` by ``data`` (any dtype or shape), keeping its attributes."""
    g = zarr.open_group(path, mode="r+")
    old = g[name]
    attrs, dims = dict(old.attrs), tuple(dims or old.metadata.dimension_names)
    del g[name]
    data = np.asarray(data)
    new = g.create_array(name, shape=data.shape, dtype=data.dtype if data.dtype.kind != "U" else str,
                         dimension_names=dims, chunks=tuple(max(1, n) for n in data.shape))
    if data.size:
        new[...] = data
    new.attrs.update(attrs)


VARIABLES = ["intensity", "position", "mask", "probe", "truth_object", "truth_probe"]
JSON_BAD_NUMBERS = [0, 0.0, -1.5, -1e300, float("nan"), float("inf"), float("-inf"), "200e3", "", None, True, False, [1, 2], {"v": 1}]


def missing_variable(path, draw):
    name = draw(st.sampled_from(["intensity", "position"]))
    shutil.rmtree(os.path.join(path, name))
    return name


def missing_attribute(path, draw):
    name = draw(st.sampled_from(sorted(REQUIRED_ATTRS)))
    meta = _load_meta(path)
    del meta["attributes"][name]
    _save_meta(path, meta)
    return f"attrs.{name}"


def bad_attribute(path, draw):
    name = draw(st.sampled_from(sorted(REQUIRED_ATTRS)))
    if name == "radiation":
        value = draw(st.sampled_from(["neutron", "Electron", "x-ray", "", 3, None, ["xray"]]))
    elif name == "format_version":
        value = draw(st.sampled_from([0, 2, 99, -1, "1", 1.5, True, None]))
    else:
        value = draw(st.sampled_from(JSON_BAD_NUMBERS))
    meta = _load_meta(path)
    meta["attributes"][name] = value
    _save_meta(path, meta)
    return f"attrs.{name}"


def missing_units(path, draw):
    name = draw(st.sampled_from(["intensity", "position", "probe", "truth_object", "truth_probe"]))
    meta = _load_meta(path, name)
    del meta["attributes"]["units"]
    _save_meta(path, meta, name)
    return f"{name}.attrs.units"


def wrong_dims(path, draw):
    name = draw(st.sampled_from(VARIABLES))
    meta = _load_meta(path, name)
    dims = list(meta["dimension_names"])
    how = draw(st.sampled_from(["rename", "permute", "reuse"]))
    if how == "rename":
        i = draw(st.integers(0, len(dims) - 1))
        dims[i] = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(lambda s: s not in dims))
    elif how == "permute":
        perm = draw(st.permutations(dims).filter(lambda p: list(p) != dims))
        dims = list(perm)
    else:  # another variable's dimension name
        i = draw(st.integers(0, len(dims) - 1))
        others = sorted({d for v in SCHEMA.values() for d in v[0]} - set(dims))
        dims[i] = draw(st.sampled_from(others))
    meta["dimension_names"] = dims
    _save_meta(path, meta, name)
    return name


def duplicate_dims(path, draw):
    name = draw(st.sampled_from(["intensity", "probe", "truth_object"]))
    meta = _load_meta(path, name)
    meta["dimension_names"] = [meta["dimension_names"][0]] * len(meta["dimension_names"])
    _save_meta(path, meta, name)
    return name


def wrong_dtype(path, draw):
    name = draw(st.sampled_from(VARIABLES))
    want = np.dtype(SCHEMA[name][1])
    dtype = draw(st.sampled_from(["int8", "int32", "int64", "uint16", "float32", "float64", "complex64", "complex128", "bool", "str"])
                 .filter(lambda d: d == "str" or np.dtype(d) != want))
    data = zarr.open_array(os.path.join(path, name), mode="r")[...]
    if dtype == "str":
        data = np.abs(data).astype(str) if data.dtype.kind == "c" else data.astype(str)
    elif np.dtype(dtype).kind not in "c" and data.dtype.kind == "c":
        data = np.abs(data).astype(dtype)
    else:
        data = data.astype(dtype)
    _rewrite(path, name, data)
    return name


def bad_values(path, draw):
    name = draw(st.sampled_from(["intensity", "intensity", "position", "probe", "truth_object", "truth_probe", "mask"]))
    arr = zarr.open_array(os.path.join(path, name), mode="r+")
    if name == "mask":
        arr[...] = False
        return name
    idx = tuple(draw(st.integers(0, n - 1)) for n in arr.shape)
    if name == "intensity":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.5, -1e30, -np.float32(1e-30)]))
    else:
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if arr.dtype.kind == "c":
            value = complex(value, 0) if draw(st.booleans()) else complex(0, value)
    arr[idx] = value
    return name


def empty_array(path, draw):
    how = draw(st.sampled_from(["intensity", "scan", "probe"]))
    if how == "intensity":  # only the intensity loses its patterns
        _rewrite(path, "intensity", np.zeros((0, N, N), np.float32))
        return "intensity"
    if how == "probe":  # the probe window has no pixels
        _rewrite(path, "probe", np.zeros((1, 0, N), np.complex64))
        return "probe"
    for name, shape, dtype in (("intensity", (0, N, N), np.float32), ("position", (0, 2), np.float64), ("scan", (0,), np.int64)):
        _rewrite(path, name, np.zeros(shape, dtype))
    return "intensity"


def positions_outside(path, draw):
    arr = zarr.open_array(os.path.join(path, "position"), mode="r+")
    i, axis = draw(st.integers(0, J - 1)), draw(st.integers(0, 1))
    how = draw(st.sampled_from(["far", "off the truth", "units"]))
    pos = arr[...]
    if how == "far":  # an outlier metres away
        pos[i, axis] = draw(st.sampled_from([1.0, -1.0, 1e-3, 42.0]))
    elif how == "off the truth":  # a few windows beyond the simulated object
        pos[i, axis] += draw(st.sampled_from([-1, 1])) * 3 * N * 1.7e-11 * 4
    else:  # positions in picometres read as metres
        pos = pos * 1e12
    arr[...] = pos
    return "position"


def position_count(path, draw):
    k = draw(st.integers(1, J - 1))
    pos = zarr.open_array(os.path.join(path, "position"), mode="r")[...]
    new = pos[:J - k] if draw(st.booleans()) else np.concatenate([pos, pos[:k]])
    _rewrite(path, "position", new)
    return "position"


def truncated_chunk(path, draw):
    name = draw(st.sampled_from(VARIABLES))
    files = _chunk_files(path, name)
    f = draw(st.sampled_from(files))
    size = os.path.getsize(f)
    keep = draw(st.integers(0, size - 1))
    with open(f, "r+b") as fh:
        fh.truncate(keep)
    return name


def garbled_chunk(path, draw):
    name = draw(st.sampled_from(VARIABLES))
    f = draw(st.sampled_from(_chunk_files(path, name)))
    junk = draw(st.binary(min_size=1, max_size=64))
    with open(f, "wb") as fh:
        fh.write(junk)
    return name


def deleted_chunk(path, draw):
    name = draw(st.sampled_from(VARIABLES))
    os.remove(draw(st.sampled_from(_chunk_files(path, name))))
    return name


def garbage_metadata(path, draw):
    name = draw(st.sampled_from(["", *VARIABLES, "yx", "scan", "ky"]))
    how = draw(st.sampled_from(["binary", "truncated json", "json of another type", "wrong node type", "bad shape"]))
    meta_file = _meta_path(path, name)
    with open(meta_file, "rb") as f:
        raw = f.read()
    if how == "binary":
        data = draw(st.binary(min_size=0, max_size=64))
    elif how == "truncated json":
        data = raw[:draw(st.integers(0, len(raw) - 2))]
    elif how == "json of another type":
        data = json.dumps(draw(st.sampled_from([[], [1, 2], "zarr", 3, None, True]))).encode()
    elif how == "wrong node type":
        meta = json.loads(raw)
        meta["node_type"] = draw(st.sampled_from(["group", "array", "", 7])) if name else "array"
        if meta["node_type"] == "array" and name:
            meta["node_type"] = "group"
        data = json.dumps(meta).encode()
    else:
        meta = json.loads(raw)
        if not name:
            meta["zarr_format"] = draw(st.sampled_from([2, 4, "3", None]))
        else:
            meta["shape"] = draw(st.sampled_from([None, "20", [-1] * len(meta["shape"]), [1.5] * len(meta["shape"]), meta["shape"] + [1]]))
        data = json.dumps(meta).encode()
    with open(meta_file, "wb") as f:
        f.write(data)
    try:  # garbage that happens to parse as the same metadata is no corruption
        if json.loads(data) == json.loads(raw):
            return None
    except ValueError:
        pass
    return "metadata"


def file_for_directory(path, draw):
    how = draw(st.sampled_from(["array", "chunk directory", "store"]))
    junk = draw(st.binary(min_size=0, max_size=32))
    if how == "store":
        shutil.rmtree(path)
        with open(path, "wb") as f:
            f.write(junk)
        return "store"
    name = draw(st.sampled_from(VARIABLES))
    target = os.path.join(path, name) if how == "array" else os.path.join(path, name, "c")
    shutil.rmtree(target)
    with open(target, "wb") as f:
        f.write(junk)
    return name


def duplicate_scan_index(path, draw):
    arr = zarr.open_array(os.path.join(path, "scan"), mode="r+")
    i = draw(st.integers(1, J - 1))
    arr[i] = arr[i - 1]
    return "scan"


CORRUPTIONS = {f.__name__.replace("_", " "): f for f in (
    missing_variable, missing_attribute, bad_attribute, missing_units, wrong_dims, duplicate_dims, wrong_dtype, bad_values,
    empty_array, positions_outside, position_count, truncated_chunk, garbled_chunk, deleted_chunk, garbage_metadata,
    file_for_directory, duplicate_scan_index)}


# --------------------------------------------------------------------------- running


def run_cli(argv):
    """``daskptycho ARGV`` in this process: (exit status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, err.getvalue().splitlines()


def assert_one_line(code, lines, needle):
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("daskptycho: error: ") and "Traceback" not in lines[0], lines
    assert needle in lines[0], (needle, lines)


@contextlib.contextmanager
def corrupted_copy(pristine):
    work = tempfile.mkdtemp(prefix="fuzz-")
    try:
        path = os.path.join(work, "store.zarr")
        shutil.copytree(pristine, path)
        yield work, path
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(max_examples=STORE_EXAMPLES, **FUZZ)
@given(data=st.data())
def test_corrupted_store_is_refused_by_name(pristine, data):
    kind = data.draw(st.sampled_from(sorted(CORRUPTIONS)), label="kind")
    with corrupted_copy(pristine) as (work, path):
        field = CORRUPTIONS[kind](path, data.draw)
        if field is None:
            return
        COUNTS[kind]["tried"] += 1
        before = tree_hash(path)
        with pytest.raises(DatasetError) as e:
            dp.open_dataset(path)
        assert e.value.field == field, (kind, str(e.value))
        assert e.value.problem and "\n" not in str(e.value)

        code, lines = run_cli(["info", path])
        assert_one_line(code, lines, field)
        out = os.path.join(work, "out.zarr")
        code, lines = run_cli(["reconstruct", path, "--out", out, "--iterations", "1", "--quiet"])
        assert_one_line(code, lines, field)
        assert not os.path.exists(out)
        assert sorted(os.listdir(work)) == ["store.zarr"]  # no temporary left next to the input either
        assert tree_hash(path) == before
        COUNTS[kind]["passed"] += 1


# --------------------------------------------------------------------------- options

BAD_OPTION_VALUES = {
    "engine": ["nope", "GD", "", "ml ", 3],
    "iterations": [0, -1, -(2**40), 1.5, "3", True, None, float("nan")],
    "batch_size": [0, -2, 2.5, True, "x", float("inf")],
    "slices": [0, -1, 1.5, "2", False],
    "tiles": [(0, 2), (2, -1), (50, 50), (2, 40), (1,), "abc", (2, 2, 2)],  # None: the configured default
    "step": [0, -1.0, float("nan"), float("inf"), "1", True],
    "probe_step": [0, -0.5, float("nan")],
    "regularization": [-1e-3, float("nan"), "x"],
    "beta": [0, 1.5, -0.2, float("nan"), "0.8"],
    "cost": ["foo", "Poisson", "", 1],
    "device": ["tpu", "GPU", "", None],
    "partitions": [0, -3, 1.5, 10_000],
    "pad_px": [-1, 1.5, "4", float("nan")],
    "probe_modes": [0, -1, 1.5, "auto", "two"],
    "working_set_mib": [0, -32, float("nan"), "32"],
    "working_set_fraction": [0, -0.1, float("inf")],
    "object_modes": [0, -1, 2.5],
    "seed": [-1, 1.5, "a", None],
    "halo_m": [0, -1e-9, float("nan"), "1e-9"],
    "halo": ["exact", "Probe", 1, None],
    "halo_fraction": [0, -0.5, 1.5, float("nan"), "0.99"],
    "passes_per_iteration": [0, -1, 1.5],
    "workers": [0, -1, 2.5, "2"],
    "refine_probe": ["yes", 1, None],
    "probe_refine_start": [-1, 1.5, "5"],
    "slice_thickness_m": [0, -1e-10, float("nan"), "1e-10"],
}
BAD_OPTIONS = {k: st.sampled_from(v) for k, v in BAD_OPTION_VALUES.items()}
# the engine an option needs to be checked against (tiles: gd; partitions, 'auto' modes: dm vs gd)
ENGINE_FOR = {"partitions": "dm", "probe_modes": "gd", "object_modes": "dm", "beta": "dm"}


def _check_bad_option(valid, kind, value):
    if kind == "unknown key":
        kwargs, name = {value: 1}, value
    else:
        kwargs, name = {kind: value}, kind
    kwargs.setdefault("engine", ENGINE_FOR.get(kind, "gd"))
    if kind == "probe_modes" and value == "auto":
        kwargs["engine"] = "gd"
    label = f"option {kind}"
    COUNTS[label]["tried"] += 1
    with pytest.raises(OptionsError) as e:
        dp.reconstruct(valid, **kwargs)
    assert e.value.option == name, str(e.value)
    assert "\n" not in str(e.value)
    COUNTS[label]["passed"] += 1


@settings(max_examples=OPTION_EXAMPLES, **FUZZ)
@given(data=st.data())
def test_bad_option_is_refused_by_name(valid, data):
    kind = data.draw(st.sampled_from(["unknown key", *sorted(BAD_OPTIONS)]), label="option")
    if kind == "unknown key":
        value = data.draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
            lambda k: all(k not in e.options.__dataclass_fields__ for e in ENGINES.values())), label="key")
    else:
        value = data.draw(BAD_OPTIONS[kind], label="value")
    _check_bad_option(valid, kind, value)


def test_every_listed_bad_option_value_is_refused(valid):
    """Every value of the table above, not only those hypothesis happened to draw."""
    for kind, values in BAD_OPTION_VALUES.items():
        for value in values:
            _check_bad_option(valid, kind, value)


CLI_OPTIONS = [  # the command line names the flag (the library error names the parameter)
    (["--engine", "nope"], "--engine"),
    (["--tiles", "50x50"], "--tiles"),
    (["--engine", "dm", "--partitions", "500"], "--partitions"),
    (["--engine", "gd", "--probe-modes", "auto"], "--probe-modes"),
    (["--engine", "dm", "--beta", "1.5"], "--beta"),
    (["--step", "nan"], "--step"),
    (["--step=-1"], "--step"),
    (["--pad-px=-3"], "--pad-px"),
    (["--slice-thickness=-1e-10", "--slices", "2"], "--slice-thickness"),
]


@pytest.mark.parametrize("args, option", CLI_OPTIONS, ids=[" ".join(a) for a, _ in CLI_OPTIONS])
def test_cli_bad_option_is_one_line(pristine, tmp_path, args, option):
    before = tree_hash(pristine)
    out = tmp_path / "out.zarr"
    code, lines = run_cli(["reconstruct", pristine, "--out", out, "--iterations", "1", "--quiet", *args])
    assert_one_line(code, lines, option)
    assert not out.exists() and tree_hash(pristine) == before


@pytest.mark.parametrize("args, needle", [(["--iterations", "0"], "--iterations"), (["--tiles", "0x3"], "--tiles"),
                                          (["--batch-size", "-4"], "--batch-size"), (["--slices", "x"], "--slices"),
                                          (["--device", "tpu"], "--device"), (["--bogus"], "--bogus")])
def test_cli_argument_errors_are_one_line(pristine, tmp_path, args, needle):
    """argparse's own refusals too: one line naming the argument, no usage block."""
    code, lines = run_cli(["reconstruct", pristine, "--out", tmp_path / "o.zarr", *args])
    assert_one_line(code, lines, needle)
    assert "--help" in lines[0]


# --------------------------------------------------------------------------- real processes

def _delete_intensity_chunk(path):
    os.remove(os.path.join(path, "intensity", "c", "1", "0", "0"))
    return "intensity"


def _garbage_root(path):
    with open(os.path.join(path, "zarr.json"), "wb") as f:
        f.write(b"\x00{not json")
    return "metadata"


def _nan_intensity(path):
    zarr.open_array(os.path.join(path, "intensity"), mode="r+")[13, 4, 5] = np.nan
    return "intensity"


def _file_for_position(path):
    shutil.rmtree(os.path.join(path, "position"))
    with open(os.path.join(path, "position"), "wb") as f:
        f.write(b"12,34")
    return "position"


SUBPROCESS_CASES = {"deleted chunk": _delete_intensity_chunk, "garbage root metadata": _garbage_root,
                    "nan intensity": _nan_intensity, "file for a directory": _file_for_position}


@pytest.mark.parametrize("kind", sorted(SUBPROCESS_CASES))
def test_real_command_line_on_a_corrupted_store(pristine, tmp_path, kind):
    """The same checks through a real ``python -m daskptycho`` process, for a few kinds
    (the hypothesis test runs ``cli.main`` in-process for speed)."""
    path = str(tmp_path / "store.zarr")
    shutil.copytree(pristine, path)
    field = SUBPROCESS_CASES[kind](path)
    before = tree_hash(path)
    # one command per kind (a process spends seconds importing): info, reconstruct, info, ...
    argv = (["info", path], ["reconstruct", path, "--out", tmp_path / "r.zarr", "--iterations", "1", "--quiet"])[sorted(SUBPROCESS_CASES).index(kind) % 2]
    p = subprocess.run([sys.executable, "-m", "daskptycho", *map(str, argv)], capture_output=True, text=True, timeout=120)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr and field in lines[0], p.stderr
    assert not (tmp_path / "r.zarr").exists()
    assert tree_hash(path) == before


def test_counts_cover_every_kind():
    """Every corruption kind was drawn at least once by the fuzz test above (it runs
    first in this module) and every example passed."""
    kinds = {k for k in COUNTS if not k.startswith("option")}
    if not kinds:
        pytest.skip("the fuzz test did not run in this session (deselected)")
    if STORE_EXAMPLES >= 100:
        assert kinds == set(CORRUPTIONS), set(CORRUPTIONS) - kinds
    assert all(v["tried"] == v["passed"] for v in COUNTS.values())


# --------------------------------------------------------------------------- nothing executes data


def test_a_store_of_pickled_objects_is_refused_unread(tmp_path):
    """A Zarr v2 store may hold pickled object arrays; opening one must not unpickle
    (which would run the code the file names)."""
    import numcodecs

    marker = tmp_path / "executed"
    store = tmp_path / "evil.zarr"
    (store / "evil").mkdir(parents=True)
    (store / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (store / ".zattrs").write_text(json.dumps({"format": "daskptycho-dataset"}))
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(str(marker))
    (store / "evil" / "0").write_bytes(numcodecs.Pickle().encode(trap))
    (store / "evil" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": None,
        "filters": [{"id": "pickle", "protocol": 5}], "order": "C"}))
    (store / "evil" / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["evil"]}))
    with pytest.raises(DatasetError) as e:
        dp.open_dataset(store)
    assert e.value.field == "evil" and "never unpickles" in e.value.problem
    code, lines = run_cli(["info", store])
    assert_one_line(code, lines, "evil")
    assert not marker.exists()
    # the chunk is a live trap (numcodecs and Zarr 3 refuse it too; the store check
    # comes first and does not depend on them): unpickled, it runs
    import pickle

    pickle.loads((store / "evil" / "0").read_bytes())
    assert marker.exists()


class _Trap:
    """Unpickling this creates a directory: proof that code from the data ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_the_package_never_loads_code_from_data():
    """No pickle/marshal/shelve loads, no eval/exec, no unsafe YAML, and every
    ``np.load`` passes ``allow_pickle=False`` (an AST scan of the package source)."""
    import ast

    root = os.path.dirname(dp.__file__)
    bad = []
    for dirpath, _, files in os.walk(root):
        for fname in files:
            if not fname.endswith(".py"):
                continue
            full = os.path.join(dirpath, fname)
            with open(full) as f:
                tree = ast.parse(f.read(), full)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
                where = f"{os.path.relpath(full, root)}:{node.lineno}"
                if isinstance(fn, ast.Name) and name in ("eval", "exec", "__import__"):
                    bad.append(f"{where} {name}()")
                if owner in ("pickle", "cPickle", "cloudpickle", "dill", "marshal", "joblib") and name.startswith("load"):
                    bad.append(f"{where} {owner}.{name}()")
                if owner == "shelve" or (owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load")):
                    bad.append(f"{where} {owner}.{name}()")
                if owner in ("np", "numpy") and name == "load":
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                        bad.append(f"{where} np.load without allow_pickle=False")
    assert bad == []
