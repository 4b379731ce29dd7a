"""daskptycho.build_dataset: a user's own arrays into the daskptycho format, checked."""

from __future__ import annotations

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.errors import DatasetError


@pytest.fixture(scope="module")
def arrays():
    """Plain NumPy arrays and numbers, as a user holding measured data has them."""
    sim = dp.simulate(kind="pbtio3", scan=(6, 6), detector=32, slices=1, max_angle_rad=60e-3, defocus_m=60e-10)
    return {
        "intensity": sim["intensity"].values.astype(np.float64),  # any real dtype
        "position_m": sim["position"].values,
        "wavelength_m": float(sim.attrs["wavelength_m"]),
        "energy_eV": float(sim.attrs["energy_eV"]),
        "pixel_size_m": float(sim.attrs["pixel_size_m"]),
        "probe": sim["truth_probe"].values[0],  # (N, N): one mode
    }


def test_build_write_reopen_reconstruct(arrays, tmp_path, client):
    a = arrays
    ds = dp.build_dataset(a["intensity"], a["position_m"], wavelength_m=a["wavelength_m"], pixel_size_m=a["pixel_size_m"],
                          radiation="electron", probe=a["probe"], mask=np.ones(a["intensity"].shape[1:], bool))
    # the format's attributes are stamped, the energy follows from the wavelength (relativistic)
    assert ds.attrs["format"] == "daskptycho-dataset" and ds.attrs["format_version"] == dp.io.FORMAT_VERSION
    assert ds.attrs["energy_eV"] == pytest.approx(a["energy_eV"], rel=1e-9)
    assert ds["intensity"].dtype == np.float32 and ds["probe"].shape == (1, 32, 32)
    assert ds["intensity"].attrs["units"] == "counts" and ds["position"].attrs["units"] == "m"
    path = tmp_path / "mine.zarr"
    dp.write_dataset(ds, path)
    back = dp.open_dataset(path)
    np.testing.assert_array_equal(back["intensity"].values, a["intensity"].astype(np.float32))
    np.testing.assert_array_equal(back["position"].values, a["position_m"])
    res = dp.reconstruct(back, engine="ml", iterations=2, client=client)
    assert res.sizes["iteration"] == 2 and np.isfinite(res["cost"].values).all()
    assert res["cost"].values[1] < res["cost"].values[0]


def test_wavelength_follows_from_the_energy(arrays):
    a = arrays
    ds = dp.build_dataset(a["intensity"], a["position_m"], energy_eV=a["energy_eV"], pixel_size_m=a["pixel_size_m"],
                          radiation="electron", attrs={"probe_semiangle_rad": 20e-3, "probe_defocus_m": 6e-9})
    assert ds.attrs["wavelength_m"] == pytest.approx(a["wavelength_m"], rel=1e-12)
    assert ds.attrs["probe_semiangle_rad"] == 20e-3 and "probe" not in ds
    x = dp.build_dataset(a["intensity"], a["position_m"], energy_eV=8e3, pixel_size_m=1e-8, radiation="xray")
    assert dp.build_dataset(a["intensity"], a["position_m"], wavelength_m=x.attrs["wavelength_m"], pixel_size_m=1e-8,
                            radiation="xray").attrs["energy_eV"] == pytest.approx(8e3, rel=1e-12)


def _bad(a, **change):
    kw = dict(intensity=a["intensity"], position_m=a["position_m"], wavelength_m=a["wavelength_m"], pixel_size_m=a["pixel_size_m"],
              radiation="electron", probe=a["probe"])
    kw.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del kw[key]
    return kw


@pytest.mark.parametrize("change, field", [
    ({"radiation": "neutron"}, "attrs.radiation"),
    ({"wavelength_m": None}, "attrs.energy_eV"),                      # neither energy nor wavelength
    ({"wavelength_m": -1.0}, "attrs.wavelength_m"),
    ({"pixel_size_m": 0.0}, "attrs.pixel_size_m"),
    ({"intensity": np.ones((32, 32))}, "intensity"),                  # one pattern without its scan axis
    ({"intensity": np.ones((36, 32, 32), complex)}, "intensity"),
    ({"intensity": -np.ones((36, 32, 32))}, "intensity"),             # negative counts
    ({"position_m": np.zeros((35, 2))}, "position"),                  # one position short
    ({"position_m": np.full((36, 2), 12.0)}, "position"),             # pixels, not metres
    ({"mask": np.ones((16, 16), bool)}, "mask"),
    ({"probe": np.ones((2, 16, 16), np.complex64)}, "probe"),
])
def test_a_missing_or_wrong_field_is_named(arrays, change, field):
    with pytest.raises(DatasetError) as e:
        dp.build_dataset(**_bad(arrays, **change))
    assert e.value.field == field, str(e.value)
    assert "\n" not in str(e.value)


def test_without_a_probe_or_its_parameters_reconstruct_says_what_is_missing(arrays):
    a = arrays
    ds = dp.build_dataset(a["intensity"], a["position_m"], energy_eV=a["energy_eV"], pixel_size_m=a["pixel_size_m"], radiation="electron")
    with pytest.raises(DatasetError) as e:
        dp.reconstruct(ds, engine="ml", iterations=1)
    assert e.value.field == "attrs.probe_semiangle_rad"
