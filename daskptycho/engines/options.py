"""The options of each engine: a common base and one dataclass per engine.

Every field is declared once, with its default (from ``dask.config``,
``daskptycho.reconstruct.*``, where it has one) and the rule a value must follow; one
validation path (:meth:`EngineOptions.__post_init__`) applies the rules, then each
engine's :meth:`~EngineOptions.check` the rules between fields. Unknown keys are refused
by :func:`engine_options`, naming the engines that do take them. Errors name the Python
parameter; the command line turns it into its flag.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .. import config
from ..errors import OptionsError

# --------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Number:
    """An integer or a finite real number, bounded below; None allowed where said."""

    integer: bool
    low: float
    closed: bool = True   # value >= low (else value > low)
    none: bool = False
    high: float = math.inf  # value <= high

    def __call__(self, name, v):
        if v is None and self.none:
            return v
        ok = not isinstance(v, (bool, np.bool_)) and isinstance(v, numbers.Integral if self.integer else numbers.Real)
        ok = ok and math.isfinite(float(v)) and (v >= self.low if self.closed else v > self.low) and v <= self.high
        if not ok:
            what = "an integer" if self.integer else "a finite number"
            upper = f" and <= {self.high:g}" if math.isfinite(self.high) else ""
            raise OptionsError(name, f"got {v!r}; expected {what} {'>=' if self.closed else '>'} {self.low:g}{upper}"
                               f"{' or None' if self.none else ''}")
        return int(v) if self.integer else v


@dataclass(frozen=True)
class Choice:
    """One of a few values."""

    values: tuple

    def __call__(self, name, v):
        if v not in self.values:
            raise OptionsError(name, f"got {v!r}; expected {' or '.join(repr(x) for x in self.values)}")
        return v


def boolean(name, v):
    if not isinstance(v, (bool, np.bool_)):
        raise OptionsError(name, f"got {v!r}; expected True or False")
    return bool(v)


def path(name, v):
    return None if v is None else str(v)


def tile_grid(name, v):
    try:
        t = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 2 or min(t) < 1 or any(isinstance(x, bool) for x in v):
        raise OptionsError(name, f"got {v!r}; expected (rows, cols) with both >= 1, e.g. (3, 3)")
    return t


def modes(name, v):
    if v is None:
        return v
    if v == "auto":
        raise OptionsError(name, "'auto' is only for engine='dm'; give an integer")
    return Number(True, 1)(name, v)


def batch_size_rule(name, v):
    """``None`` (full batch), ``"auto"`` or a positive integer."""
    if v is None or v == "auto":
        return v
    return Number(True, 1)(name, v)


def option(rule, default=dataclasses.MISSING, config_key=None, doc=""):
    """A field with its rule (and its default, or the config key that gives it)."""
    meta = {"rule": rule, "doc": doc}
    if config_key is not None:
        return field(default_factory=lambda: config.get(f"reconstruct.{config_key}"), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- options

@dataclass(kw_only=True)
class EngineOptions:
    """Options every engine takes (see each engine's class for its own).

    Attributes
    ----------
    iterations : int
        Iterations to run (a resumed run: in total).
    step, probe_step : float
        Object and probe step (1: the diagonal Gauss-Newton step, shared by the slices).
    refine_probe : bool
        Also refine the probe, from iteration ``probe_refine_start`` (0-based) on.
    regularization : float
        Preconditioner floor, a fraction of the mean illumination.
    cost : {"amplitude", "poisson"}
    seed : int
        Seeds the initial probe modes and the minibatch orders.
    pad_px : int
        Margin of the object grid around the scanned field, in pixels.
    slices : int
        Object slices (multislice when > 1); ``slice_thickness_m`` (metres) then needed
        if the store gives none.
    probe_modes : int or None
        Incoherent probe modes (None: as many as the store's probe guess has).
    object_amplitude_max : float, "auto" or None
        ml, gd, hve: after each object step, amplitudes above this are scaled down to it
        (a passive object transmits at most the wave it receives: 1 on the store's
        scale). ``"auto"`` (default): 1 for multislice (``slices > 1``), where it
        measurably helps thick samples, else None (docs/convergence.md).
    working_set_mib, working_set_fraction : float
        Most transient memory of one vectorised gradient call, and at most this
        fraction of the state of the task's tile.
    device : {"cpu", "gpu"}
        Where the arrays of the tasks live.
    workers : int or None
        Workers of an embedded cluster (default: the cores; ml: 1).
    checkpoint : str or None
        The result store checkpoints go into; ``checkpoint_every`` K iterations (0:
        never); ``resume`` continues the run whose checkpoint is there.
    """

    engine: str = ""
    iterations: int = option(Number(True, 1), config_key="iterations")
    step: float = option(Number(False, 0, closed=False), config_key="step")
    probe_step: float = option(Number(False, 0, closed=False), config_key="probe_step")
    refine_probe: bool = option(boolean, config_key="refine_probe")
    probe_refine_start: int = option(Number(True, 0), config_key="probe_refine_start")
    regularization: float = option(Number(False, 0), config_key="regularization")
    cost: str = option(Choice(("amplitude", "poisson")), config_key="cost")
    seed: int = option(Number(True, 0), config_key="seed")
    pad_px: int = option(Number(True, 0), config_key="pad_px")
    slices: int = option(Number(True, 1), 1)
    slice_thickness_m: float | None = option(Number(False, 0, closed=False, none=True), None)
    probe_modes: int | None = option(modes, None)
    working_set_mib: float = option(Number(False, 0, closed=False), config_key="working_set_mib")
    working_set_fraction: float = option(Number(False, 0, closed=False), config_key="working_set_fraction")
    object_amplitude_max: float | str | None = option(
        lambda n, v: v if v in ("auto", None) else Number(False, 0, closed=False)(n, v), config_key="object_amplitude_max")
    device: str = option(Choice(("cpu", "gpu")), "cpu")
    workers: int | None = option(Number(True, 1, none=True), None)
    checkpoint: str | None = option(path, None)
    checkpoint_every: int = option(Number(True, 0), config_key="checkpoint_every")
    resume: bool = option(boolean, False)

    #: the engine these options are for (set by each subclass)
    ENGINE = ""

    def __post_init__(self):
        if self.engine != self.ENGINE:
            raise OptionsError("engine", f"got {self.engine!r} for {type(self).__name__}; expected {self.ENGINE!r}")
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is not None:
                setattr(self, f.name, rule(f.name, getattr(self, f.name)))
        self.check()

    def amplitude_max(self):
        """``object_amplitude_max`` resolved: a number, or None (no clipping)."""
        if self.object_amplitude_max == "auto":
            return 1.0 if self.slices > 1 else None
        return self.object_amplitude_max

    def check(self):
        """The rules between fields (each engine adds its own)."""
        if (self.checkpoint_every or self.resume) and not self.checkpoint:
            raise OptionsError("checkpoint", "checkpoint_every and resume need the result store to keep checkpoints in: "
                               "pass checkpoint=PATH (the result store)")


@dataclass(kw_only=True)
class PositionOptions(EngineOptions):
    """Options of the engines that refine the scan positions (``ml``, ``gd``).

    Attributes
    ----------
    position_correction : bool
        Refine the scan positions (:mod:`daskptycho.physics.positions`): every
        ``position_correction_every`` iterations from ``position_correction_start``
        (0-based), each position's cost at its window and +-1 pixel along y and x gives
        a sub-pixel estimate of where its pattern fits best; windows are cut at the
        rounded estimates. The object grid gets a margin of
        ``ceil(position_max_shift_px) + 1`` pixels beyond ``pad_px`` (gd: so does each
        tile's halo). See docs/position-correction.md.
    position_correction_start, position_correction_every : int
        First iteration that refines positions, and iterations between refinements.
    position_max_shift_px : float
        Most a position may move from the store's, per axis, object pixels.
    """

    position_correction: bool = option(boolean, config_key="position_correction")
    position_correction_start: int = option(Number(True, 0), config_key="position_correction_start")
    position_correction_every: int = option(Number(True, 1), config_key="position_correction_every")
    position_max_shift_px: float = option(Number(False, 0, closed=False), config_key="position_max_shift_px")


@dataclass(kw_only=True)
class MinibatchOptions(EngineOptions):
    """Options of the engines that update in minibatches (``ml``, ``gd``).

    Attributes
    ----------
    batch_size : int, "auto" or None
        Positions per update, split into equal minibatches
        (:func:`~daskptycho.tasks.updates.minibatches`): ml draws them from a random
        order seeded by ``(seed, iteration)``; gd runs them as pass rounds over shares of
        each tile's positions (``passes_per_iteration``; with ``local_updates``, each
        tile steps after each of its own interleaved minibatches). ``"auto"`` (default):
        :data:`~daskptycho.tasks.updates.AUTO_MINIBATCHES` (4) minibatches per iteration
        (gd: per tile). None: full batch (exact gradient descent; gd then equals ml).
    minibatch_fraction : float
        The share of the iterations that run in minibatches (the first
        ``ceil(fraction * iterations)``); the rest run full batch, which averages out
        the noise each minibatch's step carries into the object (docs/convergence.md).
    """

    batch_size: int | str | None = option(batch_size_rule, config_key="batch_size")
    minibatch_fraction: float = option(Number(False, 0, high=1), config_key="minibatch_fraction")

    def minibatch_iterations(self):
        """How many of the first iterations run in minibatches (0 with ``batch_size=None``)."""
        if self.batch_size is None:
            return 0
        return int(math.ceil(self.minibatch_fraction * self.iterations - 1e-9))

    def batch_at(self, it):
        """The batch size of iteration ``it`` (0-based): ``batch_size`` during the
        minibatch iterations, None (full batch) after them."""
        return self.batch_size if it < self.minibatch_iterations() else None


@dataclass(kw_only=True)
class TiledOptions(EngineOptions):
    """Options of the engines that split the object into tiles pinned to workers.

    Attributes
    ----------
    tiles : (rows, cols)
        The tile grid (config ``daskptycho.reconstruct.tiles``).
    halo : {"probe", "window"}
        How wide each tile's halo is: ``"probe"`` (default) holds the probe's support,
        the half-widths holding ``halo_fraction`` of its intensity widened by the
        wave's spread through the slab (multislice); window pixels beyond a tile's
        extended region are then treated as fixed (as the paper's tiles do).
        ``"window"`` holds every probe window whole (exact: gd in batch mode is then
        full-batch gradient descent, equal to ``ml``).
    halo_fraction : float
        The share of the probe's intensity a ``"probe"`` halo holds (0 < f <= 1).
    halo_m : float or None
        Halo of each tile, in metres; overrides ``halo`` (None: as ``halo`` says).
    batch_size : int, "auto" or None
        Positions per update inside a tile (engine gd: :class:`MinibatchOptions`; hve:
        an integer runs its independent tile minibatches, ``"auto"`` and None full batch).
    """

    tiles: tuple = option(tile_grid, config_key="tiles")
    halo: str = option(Choice(("probe", "window")), config_key="halo")
    halo_fraction: float = option(Number(False, 0, closed=False, high=1), config_key="halo_fraction")
    halo_m: float | None = option(Number(False, 0, closed=False, none=True), None)
    batch_size: int | str | None = option(batch_size_rule, config_key="batch_size")
