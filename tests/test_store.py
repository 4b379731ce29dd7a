"""The dataset store: round trip, atomic writes, and every validation error naming its field."""

from __future__ import annotations

import hashlib
import json
import os

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import daskptycho
from daskptycho.errors import DatasetError, OutputExistsError
from daskptycho.io import validate_dataset

REQUIRED = ("radiation", "energy_eV", "wavelength_m", "pixel_size_m", "format_version")
# keys xarray itself adds to a variable's attrs when it opens a store with mask_and_scale=False
_ENCODING_ATTRS = {"_FillValue"}


@pytest.fixture(scope="module")
def sim():
    return daskptycho.simulate(kind="pbtio3", scan=(4, 5), detector=16, slices=2)


@pytest.fixture()
def store(sim, tmp_path):
    path = tmp_path / "a.zarr"
    daskptycho.write_dataset(sim, path)
    return path


def _tree_hash(path):
    """{relative path: sha256} of every file under ``path``."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _values(var):
    v = np.asarray(var.values)
    if v.dtype.kind in "OUT":  # string coordinate: object on write, StringDType on read
        return [str(s) for s in v.tolist()]
    return v


def _assert_same_dataset(got, expect, source=None):
    assert set(got.variables) == set(expect.variables)
    assert dict(got.sizes) == dict(expect.sizes)
    for name in expect.variables:
        g, e = got[name], expect[name]
        assert g.dims == e.dims, name
        if e.dtype.kind not in "OUT":
            assert g.dtype == e.dtype, name
            np.testing.assert_array_equal(g.values, e.values, err_msg=name)
        else:
            assert _values(g) == _values(e), name
        g_attrs = {k: v for k, v in g.attrs.items() if k not in _ENCODING_ATTRS}
        e_attrs = {k: v for k, v in e.attrs.items() if k not in _ENCODING_ATTRS}
        assert g_attrs == e_attrs, name
    attrs = dict(got.attrs)
    if source is not None:
        assert attrs.pop("source") == os.path.abspath(source)
    expect_attrs = {k: v for k, v in expect.attrs.items() if k != "source"}
    assert attrs == expect_attrs
    for k, v in expect_attrs.items():  # same types, not only equal values (1 == 1.0 == True)
        assert type(attrs[k]) is type(v), k


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_exact_and_lazy(sim, tmp_path):
    path = tmp_path / "a.zarr"
    ret = daskptycho.write_dataset(sim, path)
    assert os.path.samefile(ret, path)
    assert os.listdir(tmp_path) == ["a.zarr"]  # no temporary sibling left behind
    before = _tree_hash(path)

    ds = daskptycho.open_dataset(path)
    _assert_same_dataset(ds, sim, source=path)
    # lazy: every data variable is a dask array, the intensities chunked along scan only
    for name in ("intensity", "position", "truth_object", "truth_probe"):
        assert isinstance(ds[name].data, da.Array), name
    chunks = ds["intensity"].data.chunks
    assert chunks[1] == (16,) and chunks[2] == (16,)
    assert sum(chunks[0]) == 20
    # opening (and reading everything) did not change the store
    ds.load()
    assert _tree_hash(path) == before
    assert os.listdir(tmp_path) == ["a.zarr"]


def test_round_trip_with_optional_variables_and_scan_chunks(sim, tmp_path):
    full = sim.copy()
    mask = np.ones((16, 16), bool)
    mask[0, :3] = False
    full["mask"] = (("ky", "kx"), mask, {"long_name": "valid detector pixels"})
    full["probe"] = (("mode", "py", "px"), sim["truth_probe"].values * np.complex64(0.5), {"units": "sqrt(counts)"})
    path = tmp_path / "b.zarr"
    daskptycho.write_dataset(full, path, scan_chunk=7)
    ds = daskptycho.open_dataset(path)
    _assert_same_dataset(ds, full, source=path)
    assert ds["intensity"].data.chunks == ((7, 7, 6), (16,), (16,))
    assert ds["position"].data.chunks[0] == (7, 7, 6)
    # the Zarr chunks on disk match the dask chunks
    meta = json.loads((path / "intensity" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [7, 16, 16]
    # the input dataset was not modified by writing it
    assert "format" in full.attrs and full["intensity"].encoding.get("chunks") is None


def test_reopened_dataset_can_be_written_again(store, tmp_path):
    ds = daskptycho.open_dataset(store)
    copy = tmp_path / "copy.zarr"
    daskptycho.write_dataset(ds, copy)
    again = daskptycho.open_dataset(copy)
    _assert_same_dataset(again, ds, source=copy)


def test_relative_path_source_is_absolute(sim, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    daskptycho.write_dataset(sim, "rel.zarr")
    ds = daskptycho.open_dataset("rel.zarr")
    assert ds.attrs["source"] == os.path.join(os.fspath(tmp_path), "rel.zarr")
    assert os.path.isabs(ds.attrs["source"])


def test_write_refuses_existing_path_unless_overwrite(sim, store, tmp_path):
    before = _tree_hash(store)
    with pytest.raises(OutputExistsError):
        daskptycho.write_dataset(sim, store)
    assert _tree_hash(store) == before
    assert isinstance(OutputExistsError("x"), daskptycho.DaskptychoError)
    # any existing path counts, even a plain file
    (tmp_path / "file.zarr").write_text("keep me")
    with pytest.raises(OutputExistsError):
        daskptycho.write_dataset(sim, tmp_path / "file.zarr")
    assert (tmp_path / "file.zarr").read_text() == "keep me"

    other = daskptycho.simulate(kind="pbtio3", scan=(4, 5), detector=16, slices=2, seed=1, counts_per_pattern=1e4)
    daskptycho.write_dataset(other, store, overwrite=True)
    ds = daskptycho.open_dataset(store)
    _assert_same_dataset(ds, other, source=store)
    assert not np.array_equal(ds["intensity"].values, sim["intensity"].values)
    assert sorted(os.listdir(tmp_path)) == ["a.zarr", "file.zarr"]


def test_invalid_dataset_is_not_written(sim, tmp_path):
    bad = sim.copy()
    bad.attrs = {k: v for k, v in sim.attrs.items() if k != "energy_eV"}
    with pytest.raises(DatasetError) as e:
        daskptycho.write_dataset(bad, tmp_path / "bad.zarr")
    assert e.value.field == "attrs.energy_eV"
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- validation in memory


def _drop_attr(name):
    def f(ds):
        ds.attrs = {k: v for k, v in ds.attrs.items() if k != name}
        return ds
    return f


def _set_attr(name, value):
    def f(ds):
        ds.attrs = {**ds.attrs, name: value}
        return ds
    return f


def _edit_values(name, fn):
    def f(ds):
        v = ds[name].values.copy()
        fn(v)
        ds[name] = (ds[name].dims, v, dict(ds[name].attrs))
        return ds
    return f


def _astype(name, dtype):
    def f(ds):
        ds[name] = (ds[name].dims, ds[name].values.astype(dtype), dict(ds[name].attrs))
        return ds
    return f


def _drop_units(name):
    def f(ds):
        ds[name].attrs = {k: v for k, v in ds[name].attrs.items() if k != "units"}
        return ds
    return f


def _rename_intensity_dims(ds):
    v = ds["intensity"]
    return ds.drop_vars("intensity").assign(intensity=(("scan", "qy", "qx"), v.values, dict(v.attrs)))


def _transpose_intensity(ds):
    ds["intensity"] = ds["intensity"].transpose("ky", "scan", "kx")
    return ds


def _probe_wrong_window(ds):
    ds = ds.drop_vars("truth_probe")
    ds["probe"] = (("mode", "py", "px"), np.ones((1, 8, 8), np.complex64), {"units": "sqrt(counts)"})
    return ds


def _probe_wrong_dtype(ds):
    ds["probe"] = (("mode", "py", "px"), ds["truth_probe"].values.astype(np.complex128), {"units": "sqrt(counts)"})
    return ds


def _mask_wrong_dtype(ds):
    ds["mask"] = (("ky", "kx"), np.ones((16, 16), np.float32))
    return ds


def _bad_yx(ds):
    return ds.assign_coords(yx=np.array(["x", "y"], dtype=object))


def _empty_scan(ds):
    return ds.isel(scan=slice(0, 0))


def _set(idx, value):
    def f(v):
        v[idx] = value
    return f


IN_MEMORY_CASES = [
    ("missing intensity", lambda ds: ds.drop_vars("intensity"), "intensity"),
    ("missing position", lambda ds: ds.drop_vars("position"), "position"),
    *[(f"missing attr {a}", _drop_attr(a), f"attrs.{a}") for a in REQUIRED],
    ("radiation neutron", _set_attr("radiation", "neutron"), "attrs.radiation"),
    ("radiation upper case", _set_attr("radiation", "Electron"), "attrs.radiation"),
    ("energy zero", _set_attr("energy_eV", 0.0), "attrs.energy_eV"),
    ("energy negative", _set_attr("energy_eV", -200e3), "attrs.energy_eV"),
    ("energy nan", _set_attr("energy_eV", float("nan")), "attrs.energy_eV"),
    ("energy inf", _set_attr("energy_eV", float("inf")), "attrs.energy_eV"),
    ("energy string", _set_attr("energy_eV", "200e3"), "attrs.energy_eV"),
    ("wavelength zero", _set_attr("wavelength_m", 0.0), "attrs.wavelength_m"),
    ("pixel size nan", _set_attr("pixel_size_m", float("nan")), "attrs.pixel_size_m"),
    ("format version 2", _set_attr("format_version", 2), "attrs.format_version"),
    ("format version string", _set_attr("format_version", "1"), "attrs.format_version"),
    ("intensity dims renamed", _rename_intensity_dims, "intensity"),
    ("intensity dims transposed", _transpose_intensity, "intensity"),
    ("intensity float64", _astype("intensity", np.float64), "intensity"),
    ("position float32", _astype("position", np.float32), "position"),
    ("intensity nan", _edit_values("intensity", _set((3, 4, 5), np.nan)), "intensity"),
    ("intensity inf", _edit_values("intensity", _set((19, 15, 15), np.inf)), "intensity"),
    ("intensity negative", _edit_values("intensity", _set((0, 0, 0), -1.0)), "intensity"),
    ("position nan", _edit_values("position", _set((2, 1), np.nan)), "position"),
    ("position inf", _edit_values("position", _set((0, 0), -np.inf)), "position"),
    ("zero-size scan", _empty_scan, "intensity"),
    *[(f"no units on {v}", _drop_units(v), f"{v}.attrs.units") for v in ("intensity", "position", "truth_object", "truth_probe")],
    ("probe wrong window", _probe_wrong_window, "probe"),
    ("probe complex128", _probe_wrong_dtype, "probe"),
    ("mask float", _mask_wrong_dtype, "mask"),
    ("yx coordinate wrong", _bad_yx, "yx"),
]


@pytest.mark.parametrize("mutate, field", [c[1:] for c in IN_MEMORY_CASES], ids=[c[0] for c in IN_MEMORY_CASES])
def test_validate_dataset_names_the_field(sim, mutate, field):
    validate_dataset(sim)  # the unmodified simulation is valid
    bad = mutate(sim.copy(deep=True))
    with pytest.raises(DatasetError) as e:
        validate_dataset(bad)
    assert e.value.field == field
    assert isinstance(e.value, daskptycho.DaskptychoError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"{field}: ") and e.value.problem
    # the fixture itself is untouched
    validate_dataset(sim)


def test_check_values_false_skips_only_the_value_scan(sim):
    bad = _edit_values("intensity", _set((3, 4, 5), np.nan))(sim.copy(deep=True))
    validate_dataset(bad, check_values=False)
    # cheap checks still run
    with pytest.raises(DatasetError) as e:
        validate_dataset(_drop_attr("energy_eV")(bad), check_values=False)
    assert e.value.field == "attrs.energy_eV"


def test_validate_dask_backed_intensity(sim):
    """The value scan works on dask arrays (how open_dataset hands it over)."""
    lazy = sim.chunk({"scan": 3})
    validate_dataset(lazy)
    v = sim["intensity"].values.copy()
    v[17, 2, 2] = -0.5
    bad = sim.copy()
    bad["intensity"] = (("scan", "ky", "kx"), da.from_array(v, chunks=(3, 16, 16)), dict(sim["intensity"].attrs))
    with pytest.raises(DatasetError) as e:
        validate_dataset(bad)
    assert e.value.field == "intensity" and "negative" in e.value.problem


# --------------------------------------------------------------------------- validation of stores


def _edit_root_attrs(path, **changes):
    meta_path = os.path.join(path, "zarr.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["attributes"].update(changes)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def _garbage_root(path):
    with open(os.path.join(path, "zarr.json"), "wb") as f:
        f.write(b"\x00\xff not json {{{")


def _garbage_intensity_meta(path):
    with open(os.path.join(path, "intensity", "zarr.json"), "wb") as f:
        f.write(b"\x89PNG junk")


def _position_too_short(path):
    """Rewrite ``position`` with 19 rows while ``intensity`` keeps 20 (xarray cannot
    build such a Dataset, so write the Zarr array directly)."""
    g = zarr.open_group(path, mode="r+")
    old = g["position"]
    data, attrs = old[:], dict(old.attrs)
    del g["position"]
    new = g.create_array("position", shape=(19, 2), dtype="float64", dimension_names=("scan", "yx"))
    new[:] = data[:19]
    new.attrs.update(attrs)


def _nan_in_chunk(path):
    a = zarr.open_array(os.path.join(path, "intensity"), mode="r+")
    a[5, 3, 3] = np.nan


def _negative_in_chunk(path):
    a = zarr.open_array(os.path.join(path, "intensity"), mode="r+")
    a[19, 0, 0] = -3.0


def _delete_a_chunk(path):
    chunk_dir = os.path.join(path, "intensity", "c")
    files = [os.path.join(r, f) for r, _, fs in os.walk(chunk_dir) for f in fs]
    assert files
    os.remove(files[0])


def _corrupt_a_chunk(path):
    chunk_dir = os.path.join(path, "intensity", "c")
    files = [os.path.join(r, f) for r, _, fs in os.walk(chunk_dir) for f in fs]
    with open(files[0], "wb") as f:
        f.write(b"not zstd data")


def _drop_units_in_store(path):
    meta_path = os.path.join(path, "position", "zarr.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["attributes"]["units"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)


STORE_CASES = [
    ("garbage root zarr.json", _garbage_root, "metadata"),
    ("garbage intensity zarr.json", _garbage_intensity_meta, "metadata"),
    ("position scan length differs", _position_too_short, "position"),
    ("nan in a stored chunk", _nan_in_chunk, "intensity"),
    ("negative in a stored chunk", _negative_in_chunk, "intensity"),
    ("missing chunk", _delete_a_chunk, "intensity"),
    ("corrupt chunk", _corrupt_a_chunk, "intensity"),
    ("radiation edited", lambda p: _edit_root_attrs(p, radiation="neutron"), "attrs.radiation"),
    ("energy edited to null", lambda p: _edit_root_attrs(p, energy_eV=None), "attrs.energy_eV"),
    ("format version edited", lambda p: _edit_root_attrs(p, format_version=99), "attrs.format_version"),
    ("units removed in store", _drop_units_in_store, "position.attrs.units"),
]


@pytest.mark.parametrize("damage, field", [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_open_dataset_names_the_field(store, damage, field):
    damage(os.fspath(store))
    before = _tree_hash(store)
    with pytest.raises(DatasetError) as e:
        daskptycho.open_dataset(store)
    assert e.value.field in ((field,) if field != "position" else ("position", "scan")), str(e.value)
    assert _tree_hash(store) == before  # opening never writes to the input


@pytest.mark.parametrize("kind", ["missing", "empty dir", "dir with files", "plain file"])
def test_open_dataset_rejects_non_stores(tmp_path, kind):
    path = tmp_path / "x.zarr"
    if kind == "empty dir":
        path.mkdir()
    elif kind == "dir with files":
        path.mkdir()
        (path / "data.bin").write_bytes(b"\x00" * 16)
        (path / "sub").mkdir()
    elif kind == "plain file":
        path.write_bytes(b"PK\x03\x04")
    before = _tree_hash(tmp_path)
    with pytest.raises(DatasetError) as e:
        daskptycho.open_dataset(path)
    assert e.value.field == "store"
    assert str(path) in str(e.value)
    assert _tree_hash(tmp_path) == before
    assert os.path.exists(path) == (kind != "missing")


def test_open_result_rejects_a_dataset(store):
    with pytest.raises(DatasetError) as e:
        daskptycho.open_result(store)
    assert e.value.field == "format"


def test_xarray_cannot_hold_disagreeing_scan_lengths(sim):
    """Why the mismatch case above has to be built with zarr directly."""
    with pytest.raises(ValueError):
        xr.Dataset({"intensity": sim["intensity"], "position": (("scan", "yx"), np.zeros((19, 2)))})
