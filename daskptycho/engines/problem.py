"""What every engine needs before its first iteration: options, grid, probe, kernel.

Everything here is computed once, on the client, from the dataset's metadata and
positions (small); the diffraction patterns stay in the store until a task reads
the ones it owns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .. import physics
from ..errors import DatasetError, OptionsError
from ..geometry import ObjectGrid, object_grid
from ..physics.positions import position_margin_px
from ..tasks.updates import positions_per_chunk, working_set_budget
from ..tiling import halo_from_metres, make_tiling
from ..version import __version__
from .options import EngineOptions, TiledOptions


@dataclass
class Problem:
    """The fixed geometry and starting point of a reconstruction (host arrays)."""

    options: EngineOptions
    grid: ObjectGrid
    window: tuple
    positions_m: np.ndarray          # (J, 2)
    corners: np.ndarray              # (J, 2) int, window top-left on the grid
    probe: np.ndarray                # (K, N, N) complex64, initial
    kernel: np.ndarray               # (N, N) complex64, Fresnel kernel between slices; near field (2, N, N):
                                     # that and the detector transfer function stacked (physics.propagation.propagators)
    mask: np.ndarray | None          # (N, N) bool, FFT order
    slice_thickness_m: float
    wavelength_m: float
    mean_counts: float               # mean total counts per pattern
    start_object: np.ndarray | None = None  # (S or L, H, W) complex64 on ``grid``: the starting object (None: ones)
    geometry: str = "far-field"      # or "near-field": the store's ``geometry``
    detector_kernel: np.ndarray | None = None  # near field: (N, N) complex64, detector transfer function (FFT order)

    @property
    def n_positions(self):
        return self.positions_m.shape[0]

    @property
    def working_set_budget_mib(self):
        """The transient memory (MiB) of one gradient call of the single-task engine (see
        :func:`~daskptycho.tasks.updates.working_set_budget`): sets the positions per call
        and the wave checkpoint interval."""
        o = self.options
        state = self.n_positions * self.window[0] * self.window[1] * 4 + o.slices * self.grid.shape[0] * self.grid.shape[1] * 8
        return working_set_budget(state, o.working_set_mib, o.working_set_fraction)

    @property
    def chunk(self):
        """Positions per vectorised gradient call of the single-task engine: as many as
        fit in its working-set budget (:attr:`working_set_budget_mib`)."""
        return positions_per_chunk(self.window, self.options.slices, self.probe.shape[0], self.working_set_budget_mib)

    def initial_object(self, xp=np):
        if self.start_object is not None:
            return xp.asarray(self.start_object).copy()
        s = self.options.slices
        return xp.ones((s,) + self.grid.shape, dtype=np.complex64)

    def start_patch(self, region):
        """The starting object's ``region`` ``(y0, y1, x0, x1)`` of the grid (a host copy),
        or None when the run starts from ones (each worker then makes its own)."""
        if self.start_object is None:
            return None
        y0, y1, x0, x1 = region
        return np.ascontiguousarray(self.start_object[:, y0:y1, x0:x1])

    def eps_object(self, n_positions):
        """Preconditioner floor: ``regularization`` times the mean illumination that
        ``n_positions`` probes deposit per object pixel (a global scalar every
        tile can compute, so distributed engines match the reference exactly)."""
        power = float(np.sum(np.abs(self.probe) ** 2))
        return self.options.regularization * n_positions * power / (self.grid.shape[0] * self.grid.shape[1])


def fast_axis_step(positions_m, pixel_size_m):
    """The fast scan axis (0 = y, 1 = x) and its step in pixels, from consecutive
    positions in acquisition order (medians, so line flybacks don't count)."""
    if len(positions_m) < 2:
        return 1, 0.0
    d = np.abs(np.diff(np.asarray(positions_m), axis=0)) / pixel_size_m
    axis = int(np.argmax(np.median(d, axis=0)))
    return axis, float(np.median(d[:, axis]))


def _initial_probe(ds, opts, window, dx, lam, mean_counts, detector=None, mask=None):
    if "probe" in ds:
        probe = np.asarray(ds["probe"].values, dtype=np.complex64)
    elif detector is not None:  # near field: from the measured frames (see docs/near-field.md)
        mean = ds["intensity"].mean("scan")
        mean = np.fft.ifftshift(np.asarray(mean.compute() if hasattr(mean.data, "compute") else mean, dtype=np.float64))
        probe = physics.probe.near_field_probe(mean, detector, mask, NEAR_FIELD_PROBE)[None]
    else:
        need = ("probe_semiangle_rad", "probe_defocus_m")
        for a in need:
            if a not in ds.attrs:
                raise DatasetError(f"attrs.{a}", "missing: with no 'probe' variable in the store the probe is formed from "
                                   "probe_semiangle_rad and probe_defocus_m; add them or store a probe guess")
        probe = physics.aperture_probe(window, dx, lam, float(ds.attrs["probe_semiangle_rad"]),
                                       float(ds.attrs["probe_defocus_m"]), float(ds.attrs.get("probe_cs_m", 0.0)),
                                       central_stop=float(ds.attrs.get("probe_central_stop", 0.0)))[None]
    k = opts.probe_modes if isinstance(opts.probe_modes, (int, np.integer)) else probe.shape[0]
    if k > probe.shape[0]:
        # Every engine starts from modes that differ in blur, as the multi-mode DM paper
        # suggests for fly scans: the blur of a probe moving over one step along the
        # fast axis. For ml
        # and gd too: on the independent fly scan (docs/quality.md) the polynomial
        # modes of physics.probe_modes stayed near their initial powers (0.78/0.11/
        # 0.08/0.02 against the true 0.39/0.38/0.19/0.04) and 4 modes did worse than
        # 1; these reach 0.45/0.39/0.14/0.02 and 4 modes do better (docs/convergence.md)
        axis, step = fast_axis_step(ds["position"].values, dx)
        if step > 0:
            probe = physics.probe.motion_modes(probe[0], k, step, axis=-1 if axis == 1 else -2)
        else:
            probe = physics.probe.blurred_modes(probe[0], k)
    elif k < probe.shape[0]:
        probe = probe[:k]
    # rescale so the model's total counts match the measured mean (|O| ~ 1, unitary FFT)
    probe = probe * np.float32(np.sqrt(mean_counts / np.sum(np.abs(probe) ** 2)))
    return probe.astype(np.complex64)


# The initial probe of a near-field store without a stored probe: "backpropagated" (the
# mean measured amplitude propagated back to the sample) or "flat" (see
# physics.probe.near_field_probe); chosen on the PETRA III P25 data (docs/near-field.md).
NEAR_FIELD_PROBE = "backpropagated"


def near_field_options(ds, opts):
    """The options of a run on a near-field store (``geometry == "near-field"``): checked,
    and with what the near-field model needs switched on.

    - ``dm`` is refused (its model is far-field only); so is ``hve`` without a stored
      probe (it cannot refine the guess).
    - ``gd``/``hve``: the near-field probe fills its window, so the halos hold whole
      windows: ``halo="probe"`` becomes ``"window"``; a ``halo_m`` narrower than half a
      window is refused.
    - Without a ``probe`` in the store the initial probe is a guess from the frames
      (:func:`~daskptycho.physics.probe.near_field_probe`): ``refine_probe`` is turned on
      (from ``probe_refine_start``).

    Returns
    -------
    EngineOptions
        ``opts`` itself when nothing changes, else a changed copy.

    Raises
    ------
    OptionsError
        ``engine="dm"``; ``engine="hve"`` without a stored probe; ``halo_m`` narrower than
        half a window.
    DatasetError
        No ``effective_distance_m`` attribute.
    """
    if opts.engine == "dm":
        raise OptionsError("engine", "is 'dm', whose difference-map model is far-field only, and this store is near-field "
                           "(geometry attribute): reconstruct it with engine='ml' or engine='gd'")
    z = ds.attrs.get("effective_distance_m")
    if z is None or not np.isfinite(float(z)) or float(z) <= 0:
        raise DatasetError("attrs.effective_distance_m", f"is {z!r}: a near-field store needs the effective sample-detector "
                           "distance (metres; z2 / M for a cone beam); import the data with 'daskptycho import' (read_cxi), "
                           "which records it, or set the attribute")
    changes = {}
    if isinstance(opts, TiledOptions):
        ny, nx = ds["intensity"].shape[-2:]
        need = (max(ny // 2, ny - ny // 2 - 1), max(nx // 2, nx - nx // 2 - 1))
        if opts.halo_m is not None:
            got = halo_from_metres(opts.halo_m, float(ds.attrs["pixel_size_m"]))
            if got[0] < need[0] or got[1] < need[1]:
                raise OptionsError("halo_m", f"gives halos of {got} pixels; a near-field probe fills its {ny}x{nx} window, so "
                                   f"the halos must hold whole windows ({need} pixels): leave halo_m unset (halo='window' "
                                   "is then chosen) or pass at least {:.3g} m".format(max(need) * float(ds.attrs["pixel_size_m"])))
        elif opts.halo != "window":
            changes["halo"] = "window"
    if "probe" not in ds and not opts.refine_probe:
        if opts.engine == "hve":
            raise OptionsError("engine", "is 'hve', which does not refine the probe, and this near-field store has no 'probe' "
                               "variable: its initial probe is only a guess from the frames; use engine='gd' or 'ml' (they "
                               "refine it), or store a probe guess in the dataset")
        changes["refine_probe"] = True
    return dataclasses.replace(opts, **changes) if changes else opts


def prepare(ds, options, start=None) -> Problem:
    """Validate options against the dataset and compute the fixed geometry.

    ``start``: a result (:func:`result_dataset`) whose object and probe start the run
    (:func:`start_from`). A near-field store (``geometry == "near-field"``) gets the
    near-field detector propagation and the options of :func:`near_field_options`."""
    opts = options
    near = ds.attrs.get("geometry") == "near-field"
    if near:
        opts = near_field_options(ds, opts)
    dx = float(ds.attrs["pixel_size_m"])
    lam = float(ds.attrs["wavelength_m"])
    n_scan, ny, nx = ds["intensity"].shape
    window = (ny, nx)
    if opts.slices > 1:
        thickness = opts.slice_thickness_m or ds.attrs.get("slice_thickness_m")
        if thickness is None:
            raise OptionsError("slice_thickness_m", "needed with slices > 1 and the store gives none: pass slice_thickness_m=... (metres)")
    else:
        thickness = opts.slice_thickness_m or ds.attrs.get("slice_thickness_m") or 0.0
    positions = np.asarray(ds["position"].values, dtype=np.float64)
    # position correction moves windows up to position_max_shift_px (and evaluates one pixel beyond): room on the grid
    margin = position_margin_px(opts.position_max_shift_px) if getattr(opts, "position_correction", False) else 0
    grid = object_grid(positions, window, dx, opts.pad_px + margin)
    corners = grid.window_corners(positions, window)
    # options that depend on the scan are checked here, before any cluster starts
    if isinstance(opts, TiledOptions):
        make_tiling(grid, corners, window, opts.tiles, halo_from_metres(opts.halo_m, dx), clip_windows=True)
    if opts.engine == "dm" and opts.partitions is not None and opts.partitions > n_scan:
        raise OptionsError("partitions", f"got {opts.partitions}; expected at most the number of positions ({n_scan})")
    mask = None
    if "mask" in ds:
        mask = np.fft.ifftshift(np.asarray(ds["mask"].values, dtype=bool))
    totals = ds["intensity"].sum(("ky", "kx")) if mask is None else (ds["intensity"] * ds["mask"]).sum(("ky", "kx"))
    mean_counts = float(totals.mean().compute() if hasattr(totals.data, "compute") else totals.mean())
    if not mean_counts > 0:
        raise DatasetError("intensity", "all patterns are zero; expected measured counts")
    if mask is not None:
        mean_counts *= ny * nx / max(int(mask.sum()), 1)
    detector = None
    if near:  # Fresnel scaling: the plane-wave propagation over z2 / M on the demagnified pixel
        detector = physics.propagation.detector_kernel(window, dx, lam, float(ds.attrs["effective_distance_m"]))
    probe = _initial_probe(ds, opts, window, dx, lam, mean_counts, detector, mask)
    kernel = physics.fresnel_kernel(window, dx, lam, thickness)
    if near:
        kernel = physics.propagation.propagators(kernel, detector)
    start_object = None
    if start is not None:
        start_object, probe = start_from(start, grid, probe, opts.object_modes if opts.engine == "dm" else opts.slices)
    return Problem(opts, grid, window, positions, corners, probe, kernel, mask, float(thickness), lam, mean_counts, start_object,
                   "near-field" if near else "far-field", detector)


def start_from(result, grid, probe, layers):
    """The object and probe a run starts from, taken from an earlier ``result`` (an
    :class:`xarray.Dataset` with ``object`` (layer, y, x) on metre coordinates and
    ``probe`` (mode, py, px)): the object placed on ``grid`` by its coordinates (to the
    nearest pixel; ones where it has none), the probe as it is.

    Parameters
    ----------
    grid : ObjectGrid
        This run's grid (same pixel size as the result's).
    probe : complex64 (K, N, N)
        This run's own starting probe (its shape is what the result's must have).
    layers : int
        The object's slices (or dm's object modes) this run has.

    Returns
    -------
    object : complex64 (layers, H, W)
    probe : complex64 (K, N, N)
    """
    for name in ("object", "probe"):
        if name not in getattr(result, "data_vars", {}):
            raise OptionsError("start", f"has no {name!r} variable; pass an earlier result of daskptycho.reconstruct")
    obj = np.asarray(result["object"].values, dtype=np.complex64)
    if obj.shape[0] != layers:
        raise OptionsError("start", f"its object has {obj.shape[0]} slices (or modes); this run has {layers}: start from a "
                           "result of the same slices and object modes")
    y, x = np.asarray(result["y"].values), np.asarray(result["x"].values)
    dx = grid.pixel_size_m
    step = float(y[1] - y[0]) if y.size > 1 else float(x[1] - x[0]) if x.size > 1 else dx
    if not np.isclose(step, dx, rtol=1e-6):
        raise OptionsError("start", f"its pixel size is {step:g} m, this run's {dx:g} m: start from a result of the same data")
    start_probe = np.asarray(result["probe"].values, dtype=np.complex64)
    if start_probe.shape != probe.shape:
        raise OptionsError("start", f"its probe is {start_probe.shape}, this run's {probe.shape}: start from a result with "
                           "the same window and probe modes")
    out = np.ones((layers,) + tuple(grid.shape), dtype=np.complex64)
    oy = int(round((y[0] - grid.origin_m[0]) / dx))
    ox = int(round((x[0] - grid.origin_m[1]) / dx))
    # the overlap of the result's pixels [oy, oy + h) x [ox, ox + w) with the grid's
    y0, y1 = max(oy, 0), min(oy + obj.shape[1], grid.shape[0])
    x0, x1 = max(ox, 0), min(ox + obj.shape[2], grid.shape[1])
    if y0 < y1 and x0 < x1:
        out[:, y0:y1, x0:x1] = obj[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return out, start_probe


def result_dataset(problem: Problem, obj, probe, costs, ds, extra_attrs=None, extra_vars=None):
    """Assemble the result :class:`xarray.Dataset` (see ``docs/format.md``)."""
    obj = np.asarray(obj, dtype=np.complex64)
    probe = np.asarray(probe, dtype=np.complex64)
    _, fractions = physics.orthogonalize_modes(probe)
    g = problem.grid
    opts = dataclasses.asdict(problem.options)
    out = xr.Dataset(
        {
            "object": (("slice", "y", "x"), obj, {"units": "1", "long_name": "complex transmission function per slice"}),
            "probe": (("mode", "py", "px"), probe, {"units": "sqrt(counts)", "long_name": "probe modes, centre at pixel N//2"}),
            "probe_power_fraction": (("mode",), np.asarray(fractions), {"units": "1"}),
            "cost": (("iteration",), np.asarray(costs, dtype=np.float64), {"units": "counts", "long_name": f"{problem.options.cost} cost per iteration (before its update)"}),
        },
        coords={
            "y": ("y", g.y, {"units": "m", "long_name": "pixel centre"}),
            "x": ("x", g.x, {"units": "m", "long_name": "pixel centre"}),
            "slice": np.arange(obj.shape[0]),
            "z": ("slice", np.arange(obj.shape[0]) * problem.slice_thickness_m, {"units": "m", "long_name": "depth of the slice's entrance"}),
            "iteration": np.arange(len(costs)),
        },
    )
    out.attrs.update({
        "engine": problem.options.engine,
        "options": json.dumps(opts, default=str),
        "daskptycho_version": __version__,
        "input_store": str(ds.attrs.get("source", "")),
        "radiation": ds.attrs["radiation"],
        "energy_eV": float(ds.attrs["energy_eV"]),
        "wavelength_m": problem.wavelength_m,
        "pixel_size_m": g.pixel_size_m,
        "slice_thickness_m": problem.slice_thickness_m,
        "mean_counts_per_pattern": problem.mean_counts,
    })
    if problem.geometry == "near-field":
        out.attrs["geometry"] = problem.geometry
    for name, var in (extra_vars or {}).items():
        out[name] = var
    out.attrs.update(extra_attrs or {})
    return out
