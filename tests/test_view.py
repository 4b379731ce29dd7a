"""The pictures of a result (``daskptycho.view``): labels with units, a colour bar on every
image, the scanned field outlined and named, and the object's colour range taken from it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import daskptycho as dp
from daskptycho import view
from daskptycho.metrics import scanned_region

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def small(small_pbtio3, client):
    """A 3-iteration ml result of the small PbTiO3 store, and the store."""
    ds = dp.open_dataset(small_pbtio3)
    return dp.reconstruct(ds, engine="ml", iterations=3, slices=2, client=client), ds


def panels(fig):
    """(axes, image) of every image panel of ``fig`` (colour bars hold no images)."""
    return [(ax, ax.images[0]) for ax in fig.axes if ax.images]


def outline(ax):
    """The scanned-field rectangle of a panel, (y0, y1, x0, x1) in the axes' units."""
    (rect,) = ax.patches
    x0, y0 = rect.get_xy()
    return y0, y0 + rect.get_height(), x0, x0 + rect.get_width()


def test_truth_comparison_has_y_labels_and_names_the_scanned_field(small):
    res, ds = small
    pos = ds.position.values
    fig = view.truth_figure(res, ds.truth_object, pos)
    got = panels(fig)
    assert len(got) == 2
    for ax, im in got:
        assert ax.get_xlabel() == "x (nm)" and ax.get_ylabel() == "y (nm)"
        assert im.colorbar is not None and im.colorbar.ax.get_ylabel() == "projected phase (rad)"
        # the dashed box is the probe centres' box, in nm
        assert outline(ax) == pytest.approx([v * 1e9 for v in scanned_region(pos)])
        # physical axes: the image spans the pixels' edges
        left, right, bottom, top = im.get_extent()
        x = ds.truth_object.x.values if "truth" in ax.get_title() else res.x.values
        assert left == pytest.approx((x[0] - (x[1] - x[0]) / 2) * 1e9)
    (legend,) = fig.legends
    text = legend.texts[0].get_text()
    assert text.startswith("scanned field (probe centres): where the correlation r with the truth is computed"), text
    r = float(text.split("r = ")[1].split(",")[0])
    assert 0 < r <= 1


def test_probe_modes_have_a_colour_bar_and_physical_axes_per_panel(small):
    res, _ = small
    # two modes, so that "every panel" means more than one column
    probe = xr.concat([res.probe, 0.5 * res.probe], "mode").assign_attrs(res.probe.attrs)
    two = res.drop_vars(["probe", "probe_power_fraction"]).assign(probe=probe, probe_power_fraction=("mode", [0.8, 0.2]))
    fig = view.probe_figure(two)
    got = panels(fig)
    assert len(got) == 4
    labels = sorted(im.colorbar.ax.get_ylabel() for _, im in got)
    assert labels == ["amplitude (√counts)"] * 2 + ["phase (rad)"] * 2
    n = res.sizes["px"]
    dx = res.attrs["pixel_size_m"]
    for ax, im in got:
        assert ax.get_xlabel() == "x (nm)" and ax.get_ylabel() == "y (nm)"
        left, right, _, _ = im.get_extent()
        assert right - left == pytest.approx(n * dx * 1e9)  # the window, N pixels of pixel_size_m
        assert left == pytest.approx(-(n // 2 + 0.5) * dx * 1e9)  # centred on pixel N//2
    titles = [ax.get_title() for ax, _ in got]
    assert "mode 0: 80.0% of the power" in titles and "mode 1: 20.0% of the power" in titles


@pytest.mark.parametrize("attrs, label, note", [
    ({"long_name": "amplitude cost per iteration (before its update)", "units": "counts"},
     "amplitude cost (counts)", "each iteration's cost, before its update"),
    ({"long_name": "poisson cost per iteration (before its update)", "units": "counts"},
     "poisson cost (counts)", "each iteration's cost, before its update"),
    ({"long_name": "Fourier error sum (sqrt(I_model) - sqrt(I))^2 of the model entering each iteration", "units": "counts"},
     "Fourier error sum (counts)", "Fourier error sum (√I_model - √I)² of the model entering each iteration"),
    ({"long_name": "cost", "units": "1"}, "cost", ""),
    ({}, "cost", ""),
])
def test_cost_label(attrs, label, note):
    assert view.cost_label(attrs) == (label, note)


def test_cost_axis_label_has_no_doubled_parentheses(small):
    res, _ = small
    fig = view.cost_figure(res)
    (ax,) = fig.axes
    label = ax.get_ylabel()
    assert "((" not in label and "))" not in label and label.count("(") == 1 == label.count(")"), label
    assert label.endswith(f"({res.cost.attrs['units']})")
    assert "before its update" in ax.get_title()
    assert list(ax.lines[0].get_ydata()) == list(res.cost.values)


@pytest.mark.parametrize("kind", ["phase", "amplitude"])
def test_object_colour_range_comes_from_the_scanned_field(small, kind):
    res, ds = small
    pos = ds.position.values
    region = scanned_region(pos)
    inside = view.field_mask(res.y.values, res.x.values, region)
    assert 0 < inside.sum() < inside.size
    bad = res.copy(deep=True)
    bad["object"].values[:, ~inside] = 50 * np.exp(3j)  # extreme values everywhere outside the field
    fn = np.angle if kind == "phase" else np.abs
    for position in (pos, None):  # the field from the positions, or from the object grid
        fig = view.object_figure(bad, kind, position)
        got = panels(fig)
        assert len(got) == res.sizes["slice"]
        for s, (ax, im) in enumerate(got):
            lo, hi = im.get_clim()
            expect = np.percentile(fn(res.object.values[s][inside]), view.PERCENTILES)
            assert (lo, hi) == pytest.approx(expect, rel=1e-5)
            assert hi < (3.0 if kind == "phase" else 50.0)
            assert ax.get_ylabel() == "y (nm)" and im.colorbar.ax.get_ylabel().endswith("(rad)" if kind == "phase" else "(transmission)")
            assert outline(ax) == pytest.approx([v * 1e9 for v in region], abs=0.5 * res.attrs["pixel_size_m"] * 1e9)
        (legend,) = fig.legends
        assert legend.texts[0].get_text().startswith("scanned field (probe centres); colour range: the 1st to 99th percentile")


def test_scanned_field_from_the_grid_with_padding(small, client):
    _, ds = small
    res = dp.reconstruct(ds, engine="ml", iterations=1, slices=1, pad_px=5, client=client)
    region, label = view.scanned_field(res)
    assert label == "scanned field (probe centres)"
    half_px = res.attrs["pixel_size_m"] / 2
    assert region == pytest.approx(scanned_region(ds.position.values), abs=half_px)


def test_scanned_field_without_options_or_change(small):
    res, ds = small
    foreign = res.copy(deep=True)
    del foreign.attrs["options"]  # e.g. a result written by another program
    region, label = view.scanned_field(foreign)
    assert label == "reconstructed field (where the object changed)"
    y0, y1, x0, x1 = region
    assert res.y.values[0] <= y0 <= y1 <= res.y.values[-1] and res.x.values[0] <= x0 <= x1 <= res.x.values[-1]
    # the changed pixels hold the probe centres
    p0, p1, q0, q1 = scanned_region(ds.position.values)
    assert y0 <= p0 and p1 <= y1 and x0 <= q0 and q1 <= x1
    foreign["object"].values[:] = 1  # never changed: no field, no outline, no legend
    assert view.scanned_field(foreign) == (None, "")
    fig = view.object_figure(foreign, "amplitude")
    assert not fig.legends and all(not ax.patches for ax, _ in panels(fig))


def test_write_pngs(small, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    res, ds = small
    backend, open_figures = matplotlib.get_backend(), plt.get_fignums()
    paths = view.write_pngs(res, tmp_path / "png", truth=ds.truth_object, position=ds.position.values)
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(
        ["object_phase.png", "object_amplitude.png", "probe_modes.png", "cost.png", "truth_comparison.png"])
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "png").glob("*.tmp.png"))
    # the figures are not pyplot's: a notebook's backend and open figures are left alone
    assert matplotlib.get_backend() == backend and plt.get_fignums() == open_figures


def test_units_switch_to_micrometres_for_wide_fields():
    assert view.length_unit(1.9e-6) == (1e9, "nm")
    assert view.length_unit(4.6e-6) == (1e6, "µm")
