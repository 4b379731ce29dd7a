"""What every engine needs before its first iteration: options, grid, probe, kernel.

Everything here is computed once, on the client, from the dataset's metadata and
positions (small); the diffraction patterns stay in the store until a task reads
the ones it owns.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .. import config, physics
from ..errors import DatasetError, DeviceError, OptionsError
from ..geometry import ObjectGrid, object_grid

ENGINES = ("ml", "gd", "hve", "dm")
#: the engines that split the object into tiles
TILED = ("gd", "hve")


def _cfg(key):
    return field(default_factory=lambda: config.get(f"reconstruct.{key}"))


@dataclass
class ReconstructOptions:
    """Options of :func:`daskptycho.reconstruct` (unknown keys are rejected).

    Defaults come from ``dask.config`` (``daskptycho.reconstruct.*``).
    """

    engine: str = _cfg("engine")
    iterations: int = _cfg("iterations")
    batch_size: int | None = _cfg("batch_size")  # positions per update; None = full batch
    step: float = _cfg("step")                   # object step (1 = preconditioned Newton-like step)
    probe_step: float = _cfg("probe_step")
    refine_probe: bool = _cfg("refine_probe")
    probe_refine_start: int = _cfg("probe_refine_start")
    regularization: float = _cfg("regularization")
    cost: str = _cfg("cost")
    seed: int = _cfg("seed")
    pad_px: int = _cfg("pad_px")
    slices: int = 1
    slice_thickness_m: float | None = None
    probe_modes: int | None = None                # None: as many as the store's probe guess has
    working_set_mib: float = _cfg("working_set_mib")  # most transient memory of one vectorised gradient call
    working_set_fraction: float = _cfg("working_set_fraction")  # ... and at most this fraction of a tile's state
    device: str = "cpu"
    # gradient decomposition and friends (used by the distributed engines)
    tiles: tuple | None = None                    # gd, hve: (rows, cols); None = config daskptycho.reconstruct.tiles
    local_updates: bool = False
    passes_per_iteration: int = 1
    halo_m: float | None = None
    workers: int | None = None
    # multi-mode difference map
    beta: float = 0.8
    object_modes: int = 1
    partitions: int | None = None                 # parts of the scan (default: one per worker)
    partition: str = "blocks"                     # "blocks" (spatially contiguous) or "index" (even split by index)
    # checkpoints (see daskptycho.io.checkpoint): the result store they go into, every how many iterations
    checkpoint: str | None = None
    checkpoint_every: int = _cfg("checkpoint_every")  # 0 = never
    resume: bool = False                          # continue from the checkpoint in ``checkpoint``

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise OptionsError("engine", f"got {self.engine!r}; expected one of {', '.join(ENGINES)}")
        _check_types(self)
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) or self.iterations < 1:
            raise OptionsError("iterations", f"got {self.iterations!r}; expected an integer >= 1")
        if self.batch_size is not None and (not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1):
            raise OptionsError("batch_size", f"got {self.batch_size!r}; expected a positive integer or None (full batch)")
        for name in ("step", "probe_step"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise OptionsError(name, f"got {getattr(self, name)!r}; expected a positive number")
        if not self.regularization >= 0:
            raise OptionsError("regularization", f"got {self.regularization!r}; expected >= 0")
        if self.cost not in ("amplitude", "poisson"):
            raise OptionsError("cost", f"got {self.cost!r}; expected 'amplitude' or 'poisson'")
        if not isinstance(self.slices, (int, np.integer)) or self.slices < 1:
            raise OptionsError("slices", f"got {self.slices!r}; expected an integer >= 1")
        if self.slice_thickness_m is not None and not self.slice_thickness_m > 0:
            raise OptionsError("slice_thickness_m", f"got {self.slice_thickness_m!r}; expected a positive thickness in metres")
        if self.probe_modes is not None and self.probe_modes != "auto" and (
                not isinstance(self.probe_modes, (int, np.integer)) or isinstance(self.probe_modes, bool) or self.probe_modes < 1):
            raise OptionsError("probe_modes", f"got {self.probe_modes!r}; expected an integer >= 1 or 'auto' (dm)")
        if self.probe_modes == "auto" and self.engine != "dm":
            raise OptionsError("probe_modes", "'auto' is only for engine='dm'; give an integer")
        if not 0 < self.beta <= 1:
            raise OptionsError("beta", f"got {self.beta!r}; expected 0 < beta <= 1 (the paper uses 0.8)")
        if not isinstance(self.object_modes, (int, np.integer)) or self.object_modes < 1:
            raise OptionsError("object_modes", f"got {self.object_modes!r}; expected an integer >= 1")
        if self.partitions is not None and (not isinstance(self.partitions, (int, np.integer)) or self.partitions < 1):
            raise OptionsError("partitions", f"got {self.partitions!r}; expected an integer >= 1")
        if self.partition not in ("blocks", "index"):
            raise OptionsError("partition", f"got {self.partition!r}; expected 'blocks' or 'index'")
        if self.pad_px < 0:
            raise OptionsError("pad_px", f"got {self.pad_px}; expected >= 0")
        if not self.working_set_mib > 0:
            raise OptionsError("working_set_mib", f"got {self.working_set_mib}; expected a positive size in MiB")
        if not self.working_set_fraction > 0:
            raise OptionsError("working_set_fraction", f"got {self.working_set_fraction}; expected a positive fraction")
        if self.device not in ("cpu", "gpu"):
            raise OptionsError("device", f"got {self.device!r}; expected 'cpu' or 'gpu'")
        if self.tiles is None and self.engine in TILED:
            self.tiles = config.get("reconstruct.tiles")
        if self.tiles is not None:
            try:
                t = tuple(int(v) for v in self.tiles)
            except (TypeError, ValueError):
                t = ()
            if len(t) != 2 or min(t) < 1:
                raise OptionsError("tiles", f"got {self.tiles!r}; expected (rows, cols) with both >= 1, e.g. (3, 3)")
            self.tiles = t
        _check_engine_options(self)
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, (int, np.integer)) or self.checkpoint_every < 0:
            raise OptionsError("checkpoint_every", f"got {self.checkpoint_every!r}; expected an integer >= 0 (0 = no checkpoints)")
        if (self.checkpoint_every or self.resume) and not self.checkpoint:
            raise OptionsError("checkpoint", "checkpoint_every and resume need the result store to keep checkpoints in: "
                               "pass checkpoint=PATH (the result store)")
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
        if (self.checkpoint_every or self.resume) and self.engine == "dm" and self.probe_modes == "auto":
            raise OptionsError("probe_modes", "'auto' runs several reconstructions and cannot be checkpointed; give the number of modes")
        if self.passes_per_iteration < 1:
            raise OptionsError("passes_per_iteration", f"got {self.passes_per_iteration}; expected >= 1")


# option -> (the engines that use it, the value that means "not asked for"): an option
# given to an engine that would ignore it is refused (it would silently do nothing)
_ENGINE_ONLY = {
    "tiles": (TILED, None),
    "halo_m": (TILED, None),
    "batch_size": (("ml", "gd", "hve"), None),
    "local_updates": (("gd",), False),
    "passes_per_iteration": (("gd",), 1),
    "partitions": (("dm",), None),
    "partition": (("dm",), "blocks"),
    "beta": (("dm",), 0.8),
    "object_modes": (("dm",), 1),
}


def _check_engine_options(opts):
    """What one engine cannot do, checked with the other options, before any cluster starts."""
    e = opts.engine
    for name, (engines, unset) in _ENGINE_ONLY.items():
        v = getattr(opts, name)
        if e not in engines and not (v is None if unset is None else v == unset):
            users = " and ".join(repr(x) for x in engines)
            raise OptionsError(name, f"got {v!r}, but engine {e!r} does not use it (only {users}); drop it or choose engine={engines[0]!r}")
    if e == "dm" and opts.slices != 1:
        raise OptionsError("slices", "the difference map is a 2-D method: use slices=1 (engine='gd' or engine='ml' for multislice)")
    if e == "hve" and opts.refine_probe:
        raise OptionsError("refine_probe", "the hve baseline duplicates positions across tiles and does not refine the probe; use engine='gd'")
    if e == "hve" and opts.local_updates:
        raise OptionsError("local_updates", "the hve baseline has no accumulated-gradient buffer; give batch_size for sequential "
                           "minibatch updates inside each tile")


# option -> (integer?, lower bound, bound allowed?, None allowed?): checked before the
# range checks of ReconstructOptions, so a string never reaches a comparison (a bare
# TypeError) and a bool, NaN or inf never passes as a number
_NUMERIC = {
    "iterations": (True, 1, True, False), "batch_size": (True, 1, True, True), "step": (False, 0, False, False),
    "probe_step": (False, 0, False, False), "probe_refine_start": (True, 0, True, False), "regularization": (False, 0, True, False),
    "seed": (True, 0, True, False), "pad_px": (True, 0, True, False), "slices": (True, 1, True, False),
    "slice_thickness_m": (False, 0, False, True), "working_set_mib": (False, 0, False, False), "working_set_fraction": (False, 0, False, False),
    "passes_per_iteration": (True, 1, True, False), "halo_m": (False, 0, False, True), "workers": (True, 1, True, True),
    "beta": (False, 0, False, False), "object_modes": (True, 1, True, False), "partitions": (True, 1, True, True),
}


def _check_types(opts):
    """Types of the numeric and boolean options (see ``_NUMERIC``)."""
    for name, (integer, lo, closed, none_ok) in _NUMERIC.items():
        v = getattr(opts, name, None)
        if v is None and none_ok:
            continue
        ok = not isinstance(v, (bool, np.bool_)) and isinstance(v, numbers.Integral if integer else numbers.Real)
        ok = ok and math.isfinite(float(v)) and (v >= lo if closed else v > lo)
        if not ok:
            what = "an integer" if integer else "a finite number"
            bound = f"{'>=' if closed else '>'} {lo}"
            raise OptionsError(name, f"got {v!r}; expected {what} {bound}{' or None' if none_ok else ''}")
    for name in ("refine_probe", "local_updates"):
        if not isinstance(getattr(opts, name), (bool, np.bool_)):
            raise OptionsError(name, f"got {getattr(opts, name)!r}; expected True or False")


def array_module(device):
    """NumPy for ``"cpu"``; CuPy for ``"gpu"``, with a clear error when no GPU is usable."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError:
        raise DeviceError("device='gpu' needs CuPy: pip install 'daskptycho[gpu]', or use device='cpu'") from None
    if not cupy.is_available():
        raise DeviceError("device='gpu' but CuPy finds no usable GPU on this machine: use device='cpu'")
    return cupy


@dataclass
class Problem:
    """The fixed geometry and starting point of a reconstruction (host arrays)."""

    options: ReconstructOptions
    grid: ObjectGrid
    window: tuple
    positions_m: np.ndarray          # (J, 2)
    corners: np.ndarray              # (J, 2) int, window top-left on the grid
    probe: np.ndarray                # (K, N, N) complex64, initial
    kernel: np.ndarray               # (N, N) complex64, Fresnel kernel between slices
    mask: np.ndarray | None          # (N, N) bool, FFT order
    slice_thickness_m: float
    wavelength_m: float
    mean_counts: float               # mean total counts per pattern

    @property
    def n_positions(self):
        return self.positions_m.shape[0]

    @property
    def chunk(self):
        """Positions per vectorised gradient call of the single-task engine: as many as
        fit in its working-set budget (see :func:`~daskptycho.engines.updates.working_set_budget`)."""
        from .updates import positions_per_chunk, working_set_budget

        o = self.options
        state = self.n_positions * self.window[0] * self.window[1] * 4 + o.slices * self.grid.shape[0] * self.grid.shape[1] * 8
        return positions_per_chunk(self.window, o.slices, self.probe.shape[0],
                                   working_set_budget(state, o.working_set_mib, o.working_set_fraction))

    def initial_object(self, xp=np):
        s = self.options.slices
        return xp.ones((s,) + self.grid.shape, dtype=np.complex64)

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


def _initial_probe(ds, opts, window, dx, lam, mean_counts):
    if "probe" in ds:
        probe = np.asarray(ds["probe"].values, dtype=np.complex64)
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
        if opts.engine == "dm":
            # modes that differ in blur, as the multi-mode DM paper suggests for fly
            # scans: the blur of a probe moving over one step along the fast axis
            axis, step = fast_axis_step(ds["position"].values, dx)
            if step > 0:
                probe = physics.probe.motion_modes(probe[0], k, step, axis=-1 if axis == 1 else -2)
            else:
                probe = physics.probe.blurred_modes(probe[0], k)
        else:
            probe = physics.probe_modes(probe[0], k, seed=opts.seed)
    elif k < probe.shape[0]:
        probe = probe[:k]
    # rescale so the model's total counts match the measured mean (|O| ~ 1, unitary FFT)
    probe = probe * np.float32(np.sqrt(mean_counts / np.sum(np.abs(probe) ** 2)))
    return probe.astype(np.complex64)


def prepare(ds, options) -> Problem:
    """Validate options against the dataset and compute the fixed geometry."""
    opts = options
    if ds.attrs.get("geometry") == "near-field":
        raise DatasetError("geometry", "is 'near-field' (Fresnel number {:.3g}): the engines here model far-field diffraction "
                           "(exit wave to detector by a Fourier transform) and would need a Fresnel propagator to the detector; "
                           "reconstruct far-field data only".format(float(ds.attrs.get("fresnel_number", float("nan")))))
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
    grid = object_grid(positions, window, dx, opts.pad_px)
    corners = grid.window_corners(positions, window)
    # options that depend on the scan are checked here, before any cluster starts
    if opts.engine in ("gd", "hve"):
        from ..tiling import halo_from_metres, make_tiling

        make_tiling(grid, corners, window, opts.tiles, halo_from_metres(opts.halo_m, dx))
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
    probe = _initial_probe(ds, opts, window, dx, lam, mean_counts)
    kernel = physics.fresnel_kernel(window, dx, lam, thickness)
    return Problem(opts, grid, window, positions, corners, probe, kernel, mask, float(thickness), lam, mean_counts)


def result_dataset(problem: Problem, obj, probe, costs, ds, extra_attrs=None, extra_vars=None):
    """Assemble the result :class:`xarray.Dataset` (see ``docs/format.md``)."""
    import json

    import xarray as xr

    from .. import __version__

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
    for name, var in (extra_vars or {}).items():
        out[name] = var
    out.attrs.update(extra_attrs or {})
    return out
