"""The ``daskptycho`` command line: simulate | import | info | reconstruct | view | export | graph.

User errors print one line (``daskptycho: error: ...``) and exit with status 2; an
interrupt (Ctrl-C) prints ``daskptycho: interrupted`` and exits with status 130.

The library's errors name Python parameters (``overwrite=True``, ``cluster='local'``);
this module renders them with the flags of the command that ran (``--overwrite``,
``--cluster local``), by the map from each option's ``dest`` (the library's
parameter name) to its option string that the parser itself holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

#: the figures ``view`` writes (see :func:`daskptycho.view.figures`); the last only with --truth
VIEW_PNGS = ("object_phase.png", "object_amplitude.png", "probe_modes.png", "cost.png")
VIEW_TRUTH_PNG = "truth_comparison.png"


def _pair(text):
    """'16x16' or '16' -> (16, 16)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxM (e.g. 3x3), got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected NxM with positive integers (e.g. 3x3), got {text!r}")
    return tuple(parts)


def _modes(text):
    return "auto" if text == "auto" else _positive_int(text)


def _batch_size(text):
    """``--batch-size``: N, ``auto`` or ``full`` (full batch: the option's None)."""
    if text in ("auto", "full"):
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'full', got {text!r}") from None


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# --------------------------------------------------------------------------- the parser

def _option_default(name):
    """The default of an engine option as it is now: the options dataclass's value, or the
    ``dask.config`` value it reads (the first engine that takes the option, the default
    engine first)."""
    from . import config
    from .engines import ENGINES

    if name == "engine":
        return config.get("reconstruct.engine")
    first = config.get("reconstruct.engine")
    for engine in sorted(ENGINES.values(), key=lambda e: e.name != first):
        f = {x.name: x for x in dataclasses.fields(engine.options)}.get(name)
        if f is not None:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(name)


def _per_kind(key, fmt=str):
    """A simulation default that depends on --kind, e.g. '200000 for pbtio3, 8000 for image and flyscan'."""
    from .simulate import DEFAULTS

    by_value = {}
    for kind, values in DEFAULTS.items():
        by_value.setdefault(fmt(values[key]), []).append(kind)
    return ", ".join(f"{v} for {' and '.join(kinds)}" for v, kinds in by_value.items())


def _parser():
    from . import config
    from .cluster import default_workers
    from .simulate import SimulationOptions
    from .version import __version__

    d = _option_default
    sim = {f.name: f.default for f in dataclasses.fields(SimulationOptions)}
    p = argparse.ArgumentParser(prog="daskptycho", description="Ptychographic reconstruction on Dask clusters.")
    p.add_argument("--version", action="version", version=f"daskptycho {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # every dest is the library's parameter name: errors naming a parameter are shown with its flag
    s = sub.add_parser("simulate", help="write a simulated dataset with known truth", description="Write a simulated dataset (with its ground truth) to a Zarr store.")
    s.add_argument("out", help="output store (directory)")
    s.add_argument("--kind", default=sim["kind"], choices=["pbtio3", "image", "flyscan"],
                   help="pbtio3: electron multislice perovskite; image: X-ray 2D test image; flyscan: X-ray fly scan "
                        f"(motion blur, Poisson noise) (default: {sim['kind']})")
    s.add_argument("--scan", type=_pair, default=sim["scan"], metavar="NYxNX", help="scan grid of positions, rows x columns; "
                   f"a single N means NxN (default: {sim['scan'][0]}x{sim['scan'][1]})")
    s.add_argument("--step", dest="step_m", type=float, metavar="M", help=f"scan step in metres (default: {_per_kind('step_m', '{:g}'.format)})")
    s.add_argument("--detector", type=int, default=sim["detector"], metavar="N", help=f"detector pixels per side (default: {sim['detector']})")
    s.add_argument("--slices", type=_positive_int, help=f"object slices (default: {_per_kind('slices')})")
    s.add_argument("--slice-thickness", dest="slice_thickness_m", type=float, metavar="M",
                   help=f"slice thickness in metres (default: {_per_kind('slice_thickness_m', '{:g}'.format)})")
    s.add_argument("--energy", dest="energy_eV", type=float, metavar="EV", help=f"beam energy in eV (default: {_per_kind('energy_eV', '{:g}'.format)})")
    s.add_argument("--semiangle", dest="semiangle_rad", type=float, metavar="RAD",
                   help=f"probe semi-angle in rad (default: {_per_kind('semiangle_rad', '{:g}'.format)})")
    s.add_argument("--defocus", dest="defocus_m", type=float, metavar="M",
                   help=f"probe defocus in metres, positive = underfocus (default: {_per_kind('defocus_m', '{:g}'.format)})")
    s.add_argument("--probe-modes", type=_positive_int, default=sim["probe_modes"], metavar="K",
                   help=f"incoherent probe modes (default: {sim['probe_modes']})")
    s.add_argument("--dose", type=float, help="dose in particles per square angstrom (Poisson noise) (default: noise-free "
                   "for pbtio3 and image, 0.5 photons/A^2 for flyscan)")
    s.add_argument("--noise-free", action="store_true", help="no Poisson noise, whatever the kind")
    s.add_argument("--flyscan-subpositions", type=_positive_int, metavar="N",
                   help="flyscan: sub-positions summed per exposure (default: 5)")
    s.add_argument("--geometry", default=sim["geometry"], choices=["far-field", "near-field"],
                   help="near-field (--kind image only): Fresnel propagation to the detector, a broad structured beam "
                        f"(docs/near-field.md) (default: {sim['geometry']})")
    s.add_argument("--distance", dest="distance_m", type=float, metavar="M",
                   help="near field: sample-detector distance in metres (default: a pixel Fresnel number of 0.1)")
    s.add_argument("--seed", type=int, default=sim["seed"], help=f"random seed of the noise, jitter and modes (default: {sim['seed']})")
    s.add_argument("--stream", dest="rate_hz", type=float, metavar="RATE",
                   help="write the store progressively, RATE frames per second, as a growing store that readers can follow "
                        "(daskptycho.io.stream); the command returns when the scan is finished (default: write it at once)")
    s.add_argument("--chunk-frames", dest="chunk_frames", type=_positive_int, metavar="K",
                   help="patterns per chunk along scan, the unit a growing store commits (default: about 4 MiB of patterns, "
                        "and with --stream at most one second of frames)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing store")

    i = sub.add_parser("info", help="describe a dataset or result store", description="Print the geometry and contents of a store "
                       "(a dataset, a result, or the checkpoint an unfinished run left).")
    i.add_argument("store", help="dataset, result or checkpoint store")

    r = sub.add_parser("reconstruct", help="reconstruct a dataset",
                       description="Reconstruct a dataset store and write a result store. Defaults come from dask.config "
                                   "(daskptycho.reconstruct.*, see daskptycho/daskptycho.yaml; e.g. "
                                   "DASK_DASKPTYCHO__RECONSTRUCT__ITERATIONS=100) and are shown as they are now.")
    r.add_argument("store", help="input dataset store")
    r.add_argument("--out", required=True, help="output result store (also where --checkpoint-every keeps its checkpoints)")
    r.add_argument("--engine", help=f"ml | gd | hve | dm (default: {d('engine')})")
    r.add_argument("--iterations", type=_positive_int, metavar="N",
                   help=f"iterations in total (with --resume: including those already done) (default: {d('iterations')})")
    r.add_argument("--batch-size", type=_batch_size, metavar="N|auto|full",
                   help="positions per update, ml/gd/hve: N, auto (4 equal minibatches per iteration; gd: per tile, as pass rounds) "
                        f"or full (full batch, exact gradient descent) (default: {d('batch_size') or 'full'})")
    r.add_argument("--minibatch-fraction", type=_fraction, metavar="F",
                   help="ml/gd: share of the iterations run in minibatches, the rest full batch "
                        f"(default: {d('minibatch_fraction')})")
    r.add_argument("--slices", type=_positive_int, metavar="N", help=f"object slices (multislice when > 1; dm: 1 only) (default: {d('slices')})")
    r.add_argument("--slice-thickness", dest="slice_thickness_m", type=float, metavar="M",
                   help="slice thickness in metres (default: the store's slice_thickness_m; needed with --slices > 1 otherwise)")
    r.add_argument("--step", type=float, help=f"object step, 1 = preconditioned Newton-like step (default: {d('step'):g})")
    r.add_argument("--refine-probe", action=argparse.BooleanOptionalAction, default=None,
                   help=f"ml/gd: also refine the probe, from iteration {d('probe_refine_start')} (default: {'on' if d('refine_probe') else 'off'})")
    r.add_argument("--position-correction", action="store_true", default=None,
                   help=f"ml and gd: refine the scan positions (each position's cost at its window and one pixel either side; gd: each tile its own; "
                        f"docs/position-correction.md) (default: {'on' if d('position_correction') else 'off'})")
    r.add_argument("--position-correction-start", type=int, metavar="N",
                   help=f"ml/gd: first iteration (0-based) that refines the positions (default: {d('position_correction_start')})")
    r.add_argument("--position-correction-every", type=int, metavar="N",
                   help=f"ml/gd: iterations between position refinements (default: {d('position_correction_every')})")
    r.add_argument("--position-max-shift", dest="position_max_shift_px", type=float, metavar="PX",
                   help="ml/gd: most a position may move from the store's, per axis, in object pixels; about 3x the expected "
                        f"rms error (default: {d('position_max_shift_px'):g})")
    r.add_argument("--probe-modes", type=_modes, metavar="K", help="incoherent probe modes; dm also takes 'auto' (grow the modes until "
                   "the weakest carries under 1%%) (default: as many as the store's probe guess has, 1 without one)")
    r.add_argument("--object-modes", type=_positive_int, metavar="K", help=f"object modes, dm only (default: {d('object_modes')})")
    r.add_argument("--partitions", type=_positive_int, metavar="K", help="parts of the scan, dm only (default: one per worker)")
    r.add_argument("--partition", choices=["blocks", "index"],
                   help=f"dm only: spatially contiguous blocks or an even split by index (default: {d('partition')})")
    r.add_argument("--beta", type=float, help=f"dm only: the relaxation of the view update, 0 < beta <= 1 (default: {d('beta'):g})")
    r.add_argument("--view-update", choices=["raar", "dm"],
                   help=f"dm only: relaxed averaged alternating reflections (no drift on noisy data) or the paper's eq. 3 (default: {d('view_update')})")
    r.add_argument("--cost", choices=["amplitude", "poisson"], help=f"the cost minimised (default: {d('cost')})")
    r.add_argument("--seed", type=int, help=f"random seed of the initial guesses and minibatch orders (default: {d('seed')})")
    rows, cols = d("tiles")
    r.add_argument("--tiles", type=_pair, metavar="RxC", help="tile grid of gd/hve, rows x columns: 3x3 is 3 rows of 3 tiles, and a single "
                   f"N means NxN (3 = 3x3) (default: {rows}x{cols})")
    r.add_argument("--halo", choices=["probe", "window"], help="gd/hve tile halos: probe (the probe's support; window pixels "
                   "beyond it are held fixed) or window (every window whole: exact) (default: " f"{d('halo')})")
    r.add_argument("--halo-fraction", dest="halo_fraction", type=float, metavar="F", help="share of the probe's intensity a "
                   f"probe halo holds, 0 < F <= 1 (default: {d('halo_fraction'):g})")
    r.add_argument("--pad-px", dest="pad_px", type=int, metavar="PX", help="object grid margin in pixels "
                   f"(default: the store's recommended_pad_px if it has one, else {d('pad_px')})")
    r.add_argument("--workers", type=_positive_int, metavar="N", help="workers of an embedded cluster "
                   f"(default: the cores this process may use, {default_workers()} here; ml uses 1)")
    r.add_argument("--device", choices=["cpu", "gpu"], help="where arrays live (default: cpu; gpu with --cluster cuda)")
    r.add_argument("--cluster", metavar="SPEC", help="local | cuda | ucx | slurm | lsf | pbs | a profile of cluster/jobqueue.yaml | "
                   f"a scheduler address tcp://HOST:PORT, ucx://..., tls://... (default: {config.get('cluster.spec', 'local')})")
    r.add_argument("--jobs", type=_positive_int, metavar="N", help="batch jobs to submit with --cluster slurm/lsf/pbs "
                   f"(default: {config.get('cluster.jobs', 1)})")
    r.add_argument("--scheduler-file", metavar="FILE", help="attach to the scheduler that wrote this file (dask scheduler --scheduler-file)")
    r.add_argument("--tls", action="store_true", default=None, help="TLS between client, scheduler and workers "
                   "(certificates from config daskptycho.cluster.tls-*, else temporary ones for an embedded cluster) "
                   f"(default: {'on' if config.get('cluster.tls', False) else 'off'})")
    r.add_argument("--report", metavar="HTML", help="write a Dask performance report (HTML, with the task stream) of the run")
    r.add_argument("--timing", metavar="JSON", help="write the timing of the run (JSON): iteration_s, the steady-state seconds per "
                   "iteration, and the raw intervals between the iterations' costs")
    r.add_argument("--overwrite", action="store_true", help="replace an existing result (and --report, --timing files)")
    r.add_argument("--checkpoint-every", type=int, metavar="K", help="write the full state into the --out store every K "
                   f"iterations, 0 = never (default: {d('checkpoint_every')})")
    r.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out, up to --iterations in total")
    r.add_argument("--quiet", action="store_true", help="no progress: neither the cluster's start, the progress bar nor the timing line")
    r.add_argument("--follow", action="store_true", help="the store is still being written (daskptycho simulate --stream, "
                   "daskptycho.open_writer): reconstruct in rounds over the frames committed so far, each round from the last, "
                   "until the writer finishes the scan, then --iterations-after more")
    r.add_argument("--iterations-after", type=_positive_int, metavar="N", help="with --follow: iterations over every frame once "
                   "the scan is finished (default: --iterations)")
    r.add_argument("--round-iterations", type=_positive_int, metavar="N", help="with --follow: iterations of each round while "
                   f"frames arrive (default: {config.get('follow.round_iterations', 5)})")
    r.add_argument("--follow-timeout", dest="follow_timeout", type=_positive_float, metavar="S", help="with --follow: seconds "
                   "without a commit or heartbeat after which the writer counts as stopped and the result so far is written "
                   f"(default: {config.get('follow.timeout_s', 60)})")

    g = sub.add_parser("graph", help="draw one iteration's task graph (and a real run's timeline)",
                       description="Render one gradient-decomposition iteration's task graph (SVG) and, with --timeline, "
                                   "the task stream of a real run on an embedded LocalCluster.")
    g.add_argument("--tiles", type=_pair, default=(3, 3), metavar="RxC", help="tile grid, rows x columns; a single N means NxN (default: 3x3)")
    g.add_argument("--out", default="graphs", help="output directory (default: graphs)")
    g.add_argument("--store", help="take the scan geometry from this dataset (default: a 16x16 scan, 64 px patterns)")
    g.add_argument("--timeline", action="store_true", help="also run a small real reconstruction and draw its task stream")
    g.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="workers for --timeline (default: 2)")
    g.add_argument("--iterations", type=_positive_int, default=3, metavar="N", help="iterations for --timeline (default: 3)")

    m = sub.add_parser("import", help="convert measured data into a daskptycho store",
                       description="Convert measured data into a daskptycho dataset store. Formats: the Tike Siemens-star "
                                   "test file (.npz.bz2: data, scan, probe), generic .npz/.npy files and CXI 1.6 (.cxi/.h5; see docs/format.md).")
    m.add_argument("input", help="input file")
    m.add_argument("out", help="output store (directory)")
    m.add_argument("--format", choices=["auto", "siemens-star", "npz", "cxi"], default="auto",
                   help="the input's format (default: auto, from the file name)")
    m.add_argument("--geometry", choices=["auto", "far-field", "near-field"], default="auto",
                   help="cxi: the diffraction regime (default: auto, decided from the file)")
    m.add_argument("--source-distance", dest="source_distance_m", type=float, metavar="M",
                   help="cxi: focus(source)-to-sample distance in metres of a cone beam, for Fresnel scaling (default: a plane wave)")
    m.add_argument("--pixel-size", dest="pixel_size_m", type=float, metavar="M",
                   help="real-space pixel size in metres (default: the file's; a nominal one for the Siemens star)")
    m.add_argument("--energy", dest="energy_eV", type=float, metavar="EV",
                   help="photon energy in eV (default: the file's; a nominal one for the Siemens star)")
    m.add_argument("--radiation", choices=["xray", "electron"], help="npz, cxi: the radiation, if the file does not say "
                   "(default: the file's; the Siemens star is X-ray)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing store")

    x = sub.add_parser("export", help="export a result or dataset as CXI or a TIFF stack",
                       description="Export a result store as CXI 1.6 (OUT ending in .cxi: object, probe, cost, positions, geometry) "
                                   "or as an ImageJ TIFF stack of phase images (OUT ending in .tif/.tiff); a dataset store as CXI.")
    x.add_argument("store", help="result (or dataset) store")
    x.add_argument("out", help="output file: .cxi, .tif or .tiff")
    x.add_argument("--amplitude", action="store_true", help="tiff: also write the amplitude stack (OUT_amplitude.tif)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")

    v = sub.add_parser("view", help="write PNGs of a result", description="Write PNGs: phase and amplitude per slice, probe modes, "
                       f"cost curve ({', '.join(VIEW_PNGS)}; with --truth also {VIEW_TRUTH_PNG}).")
    v.add_argument("result", help="result store")
    v.add_argument("--out", required=True, help="output directory for PNGs (created if missing)")
    v.add_argument("--truth", help="dataset store with truth_object: also print the phase correlation and draw a comparison")
    v.add_argument("--overwrite", action="store_true", help="replace PNGs of an earlier view in --out")
    p.commands = {"simulate": s, "info": i, "reconstruct": r, "graph": g, "import": m, "export": x, "view": v}
    return p


# --------------------------------------------------------------------------- parameter names -> flags

#: library parameters a command sets from a flag of another name (the checkpoints live in --out)
_ALIASES = {"reconstruct": {"checkpoint": "--out"}}


def flag_map(parser, command):
    """``{parameter: flag}`` for the messages of ``command``: each option's ``dest`` (the
    library's parameter name) and its long option string.

    The command's own options come first; ``reconstruct``'s fill in the rest, because a
    message about a store (a checkpoint of an unfinished run, say) tells what to run
    next, and that is a reconstruction.

    Returns
    -------
    dict
        Also, under the key ``"_store_true"``, the set of parameters whose flag takes no value.
    """
    flags, switches = {}, set()
    for name in ("reconstruct", command):
        for action in getattr(parser.commands.get(name), "_actions", ()):
            if not action.option_strings or action.dest == "help":
                continue
            flags[action.dest] = max((f for f in action.option_strings if not f.startswith("--no-")), key=len)
            (switches.add if action.nargs == 0 else switches.discard)(action.dest)
        for param, flag in _ALIASES.get(name, {}).items():
            flags.setdefault(param, flag)
    flags["_store_true"] = switches
    return flags


# name=value as the library writes it: True/False/None, a quoted string, a number, a tuple of
# integers, ``...`` or an upper-case placeholder (PATH, K)
_ASSIGNMENT = re.compile(r"(?<![\w.\-'\"])([A-Za-z_][A-Za-z0-9_]*)=(True|False|None|'[^']*'|\"[^\"]*\"|\.\.\.|"
                         r"\(\s*\d+\s*,\s*\d+\s*\)|[A-Z][A-Z_]*\b|-?\d[\w.+\-]*)")


def to_flags(text, flags):
    """Rewrite the ``parameter=value`` phrases of a library message for the command line:
    ``overwrite=True`` -> ``--overwrite``, ``cluster='local'`` -> ``--cluster local``,
    ``tiles=(3, 3)`` -> ``--tiles 3x3``, ``slice_thickness_m=...`` -> ``--slice-thickness``.
    Parameters the command has no flag for are left as they are."""
    switches = flags.get("_store_true", set())

    def one(m):
        name, value = m.group(1), m.group(2)
        flag = flags.get(name)
        if flag is None or name == "_store_true":
            return m.group(0)
        if name in switches:
            return flag if value == "True" else f"no {flag}" if value in ("False", "None") else m.group(0)
        if value == "...":
            return flag
        if value[0] in "'\"":
            value = value[1:-1]
        elif value.startswith("("):
            value = "x".join(v.strip() for v in value.strip("()").split(","))
        return f"{flag} {value}"

    return _ASSIGNMENT.sub(one, text)


def render_error(e, flags):
    """One line for a :class:`~daskptycho.errors.DaskptychoError` (or an OSError), in the
    command line's words: the parameter it concerns as its flag."""
    from .errors import OptionsError

    if isinstance(e, OptionsError) and flags.get(e.option) and e.option != "_store_true":
        text = f"{flags[e.option]}: {e.problem}"
    else:
        text = str(e)
    return " ".join(to_flags(text, flags).split())


# --------------------------------------------------------------------------- progress

class _Progress:
    """A one-line progress bar on stderr with the cost of each iteration."""

    def __init__(self, total, quiet=False):
        self.total = total
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.times, self.its = [], []
        self.line_open = False  # a tty line without its newline yet

    def __call__(self, it, cost):
        now = time.perf_counter()
        self.times.append(now)
        self.its.append(it)
        if self.quiet:
            return
        done = it + 1
        width = 30
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        line = f"iteration {done:>4}/{self.total} [{bar}] cost {cost:.6g}  {now - self.t0:6.1f} s"
        if self.tty:
            self.line_open = done != self.total
            sys.stderr.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end_line(self):
        """Finish a tty progress line cut short (an interrupt), so the next message starts a line."""
        if self.line_open:
            sys.stderr.write("\n")
            self.line_open = False

    def intervals(self):
        """Seconds between consecutive costs' arrivals (the first from the start of the run)."""
        edges = [self.t0] + self.times
        return [b - a for a, b in zip(edges[:-1], edges[1:])]


# --------------------------------------------------------------------------- commands

def _refuse_existing(out, overwrite):
    """Refuse an existing output before any work is done (the writer checks again at the end)."""
    from .errors import OutputExistsError

    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"{out} exists: pass overwrite=True to replace it")


def _check_output_file(path, parameter, overwrite):
    """A file the run writes at its end (--report, --timing): its directory must exist, and
    an existing file is only replaced with --overwrite; checked before the run starts."""
    from .errors import OptionsError

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OptionsError(parameter, f"{path}: the directory {parent} does not exist; create it or give another path")
    if os.path.isdir(path):
        raise OptionsError(parameter, f"{path} is a directory; give a file name")
    _refuse_existing(path, overwrite)


def _cmd_simulate(a):
    import math

    from .io.store import default_scan_chunk, write_dataset
    from .io.stream import check_rate, replay
    from .simulate import simulate

    if a.rate_hz is not None:
        check_rate(a.rate_hz)
    _refuse_existing(a.out, a.overwrite)
    kw = {"kind": a.kind, "scan": a.scan, "detector": a.detector, "probe_modes": a.probe_modes, "seed": a.seed,
          "geometry": a.geometry}
    if a.noise_free:
        kw["dose"] = None
    elif a.dose is not None:
        kw["dose"] = a.dose
    for key in ("step_m", "slices", "slice_thickness_m", "energy_eV", "semiangle_rad", "defocus_m", "flyscan_subpositions",
                "distance_m"):
        if getattr(a, key) is not None:
            kw[key] = getattr(a, key)
    ds = simulate(**kw)
    if a.rate_hz is not None:
        n = ds.sizes["scan"]
        # a commit at least every second unless asked otherwise: a reader following the scan waits no longer
        k = a.chunk_frames or min(default_scan_chunk(n, ds.sizes["ky"] * ds.sizes["kx"] * 4), max(1, math.floor(a.rate_hz)))
        print(f"streaming {n} patterns to {a.out} at {a.rate_hz:g} frames/s in chunks of {k}", flush=True)
        replay(ds, a.out, a.rate_hz, chunk_frames=k, overwrite=a.overwrite)
    else:
        write_dataset(ds, a.out, overwrite=a.overwrite, scan_chunk=a.chunk_frames)
    print(f"wrote {a.out}: {ds.sizes['scan']} patterns of {ds.sizes['ky']}x{ds.sizes['kx']}, "
          f"object {ds.sizes['slice']}x{ds.sizes['y']}x{ds.sizes['x']}, pixel {ds.attrs['pixel_size_m']:.4g} m")


def _describe_checkpoint(path, ck):
    lines = [f"{path}: the checkpoint of an unfinished daskptycho run (not a result yet)"]
    if ck["completed"] is None:
        lines.append(f"  engine: {ck['engine'] or 'unknown'}; interrupted before its first checkpoint: nothing to resume")
        lines.append(f"  start afresh: daskptycho reconstruct DATASET --out {path} --overwrite")
        return "\n".join(lines)
    total = ck["iterations"]
    lines.append(f"  engine: {ck['engine']}, {ck['completed']} of {total if total is not None else '?'} iterations completed"
                 + (f", a checkpoint every {ck['checkpoint_every']}" if ck.get("checkpoint_every") else ""))
    lines.append(f"  continue: daskptycho reconstruct DATASET --out {path} --resume"
                 + (f" --iterations {total}" if total is not None else "") + "  (DATASET: the store the run read)")
    lines.append(f"  start afresh: daskptycho reconstruct DATASET --out {path} --overwrite")
    return "\n".join(lines)


def _describe_growing(path, st):
    from .io.stream import open_frames

    expected = f" of {st.n_frames_expected} expected" if st.n_frames_expected else ""
    age = st.heartbeat_age_s()
    lines = [f"{path}: a growing daskptycho dataset (the scan is not finished)",
             f"  frames committed: {st.frames_complete}{expected}, in chunks of {st.chunk_frames}",
             f"  last commit: {st.last_commit_utc.isoformat() if st.last_commit_utc else 'none yet'}",
             f"  writer heartbeat: {st.heartbeat_utc.isoformat() if st.heartbeat_utc else 'none'}"
             + (f" ({age:.1f} s ago by this machine's clock)" if age is not None else "")]
    if st.frames_complete:
        ds = open_frames(path, check_values=False)
        at = ds.attrs
        lines.append(f"  radiation: {at['radiation']}, energy {at['energy_eV']:.6g} eV, pixel {at['pixel_size_m']:.6g} m, "
                     f"patterns of {ds.sizes['ky']} x {ds.sizes['kx']} px")
    lines.append("  read the committed frames: daskptycho.io.stream.open_frames(path); "
                 "a writer that is gone: daskptycho.open_writer(path, resume=True) continues or finishes it")
    return "\n".join(lines)


def _describe(path):
    from .errors import DatasetError
    from .io.store import RESULT_FORMAT_NAME, checkpoint_info, open_dataset, open_zarr
    from .io.stream import stream_state

    ck = checkpoint_info(path)
    if ck is not None:
        return _describe_checkpoint(path, ck)
    try:
        st = stream_state(path)
    except DatasetError:
        st = None  # not a dataset store, or a damaged one: open_zarr below says which
    if st is not None and st.streamed and not st.scan_finished:
        return _describe_growing(path, st)
    raw = open_zarr(path)
    lines = []
    if raw.attrs.get("format") == RESULT_FORMAT_NAME:
        ds = raw
        lines.append(f"{path}: daskptycho result (engine {ds.attrs.get('engine')}, version {ds.attrs.get('daskptycho_version')})")
        o = ds["object"]
        lines.append(f"  object: {o.sizes['slice']} slices of {o.sizes['y']} x {o.sizes['x']} px, pixel {ds.attrs['pixel_size_m']:.4g} m")
        lines.append(f"  probe: {ds.sizes['mode']} mode(s) of {ds.sizes['py']} x {ds.sizes['px']} px")
        c = ds["cost"].values
        lines.append(f"  cost: {c[0]:.6g} -> {c[-1]:.6g} over {c.size} iterations")
        lines.append(f"  input: {ds.attrs.get('input_store')}")
        return "\n".join(lines)
    ds = open_dataset(path)
    at = ds.attrs
    n, ny, nx = ds["intensity"].shape
    pos = ds["position"].values
    lines.append(f"{path}: daskptycho dataset, format version {at['format_version']}")
    kev = f" ({at['energy_eV'] / 1e3:.4g} keV)" if at["radiation"] == "xray" else ""
    lines.append(f"  radiation: {at['radiation']}, energy {at['energy_eV']:.6g} eV{kev}, wavelength {at['wavelength_m']:.6g} m")
    geometry = at.get("geometry", "far-field")
    fresnel = f" (Fresnel number {at['fresnel_number']:.3g})" if "fresnel_number" in at else ""
    lines.append(f"  geometry: {geometry}{fresnel}")
    if "geometry_reason" in at:
        lines.append(f"  geometry decided: {at['geometry_reason']}")
    if geometry == "near-field":
        lines.append("  note: near-field data: engines ml, gd and hve reconstruct it with a Fresnel propagation to the detector "
                     "(dm refuses it); see docs/near-field.md")
    for key, label in (("detector_distance_m", "detector distance"), ("detector_pixel_size_m", "detector pixel"),
                       ("source_distance_m", "source-sample distance"), ("effective_distance_m", "effective distance")):
        if key in at:
            um = f" ({at[key] * 1e6:.4g} um)" if key == "detector_pixel_size_m" else ""
            lines.append(f"  {label}: {at[key]:.6g} m{um}")
    if "magnification" in at:
        lines.append(f"  magnification: {at['magnification']:.6g}")
    if "geometry_note" in at:
        lines.append(f"  geometry note: {at['geometry_note']}")
    lines.append(f"  patterns: {n} of {ny} x {nx} px, chunks along scan {ds['intensity'].data.chunksize[0]}")
    lines.append(f"  real-space pixel: {at['pixel_size_m']:.6g} m")
    ext = pos.max(0) - pos.min(0)
    lines.append(f"  scan extent: {ext[0]:.4g} m (y) x {ext[1]:.4g} m (x)")
    for key in ("probe_semiangle_rad", "probe_defocus_m", "probe_cs_m"):
        if key in at:
            lines.append(f"  {key}: {at[key]:.6g}")
    extras = [v for v in ("mask", "probe", "truth_object", "truth_probe") if v in ds]
    lines.append(f"  also: {', '.join(extras) if extras else 'nothing else'}")
    mean = float(ds["intensity"].sum(("ky", "kx")).mean().compute())
    lines.append(f"  mean counts per pattern: {mean:.6g}")
    return "\n".join(lines)


def _cmd_info(a):
    print(_describe(a.store))


#: reconstruct's flags that are options of :func:`daskptycho.reconstruct` (same names)
_RECONSTRUCT_OPTIONS = ("engine", "iterations", "batch_size", "minibatch_fraction", "slices", "slice_thickness_m", "step", "refine_probe", "probe_modes",
                        "object_modes", "partitions", "partition", "beta", "view_update", "cost", "seed", "tiles", "halo", "halo_fraction", "pad_px",
                        "workers", "device", "position_correction", "position_correction_start", "position_correction_every",
                        "position_max_shift_px")


def _cmd_reconstruct(a):
    import contextlib

    from . import config
    from .cluster import check_connect, log_to_stderr
    from .engines import engine_options, reconstruct
    from .io.store import open_dataset, write_result

    if os.path.lexists(a.out) and not (a.overwrite or a.resume):
        from .errors import OutputExistsError

        raise OutputExistsError(f"{a.out} exists: pass overwrite=True to replace it (or resume=True to continue its checkpoint)")
    for path, parameter in ((a.report, "report"), (a.timing, "timing")):
        if path:
            _check_output_file(path, parameter, a.overwrite)
    kw = {k: getattr(a, k) for k in _RECONSTRUCT_OPTIONS if getattr(a, k) is not None}
    if kw.get("batch_size") == "full":
        kw["batch_size"] = None
    if a.checkpoint_every is not None or a.resume:  # the checkpoints live in the result store
        kw.update(checkpoint=a.out, resume=a.resume)
        if a.checkpoint_every is not None:
            kw["checkpoint_every"] = a.checkpoint_every
    # every option, and where the run is to go, is checked before the dataset is read or a cluster starts
    workers = engine_options(**kw).workers
    cluster_options = {k: getattr(a, k) for k in ("jobs", "scheduler_file", "tls") if getattr(a, k) is not None}
    check_connect(a.cluster, workers=workers, device=a.device, **cluster_options)
    given = [d for d in ("iterations_after", "round_iterations", "follow_timeout") if getattr(a, d) is not None]
    if given and not a.follow:
        from .errors import OptionsError

        raise OptionsError(given[0], "applies only with --follow")
    follow_kw = {k: v for k, v in (("iterations_after", a.iterations_after), ("round_iterations", a.round_iterations),
                                   ("timeout_s", a.follow_timeout)) if v is not None}
    if a.follow:
        _follow_store(a, kw, follow_kw, cluster_options)
        return
    ds = open_dataset(a.store)
    if a.pad_px is None and "recommended_pad_px" in ds.attrs:
        kw["pad_px"] = int(ds.attrs["recommended_pad_px"])
    bar = _Progress(kw.get("iterations", config.get("reconstruct.iterations")), a.quiet)
    # not quiet: the cluster's start, a batch cluster's jobs and the live page's address on stderr
    with contextlib.nullcontext() if a.quiet else log_to_stderr():
        try:
            res = reconstruct(ds, progress=bar, report=a.report, cluster=a.cluster, cluster_options=cluster_options, **kw)
        except KeyboardInterrupt:
            bar.end_line()
            raise
    if "checkpoint" in kw:
        from .io.store import write_result_keeping_checkpoint

        write_result_keeping_checkpoint(res, a.out)
    else:
        write_result(res, a.out, overwrite=a.overwrite)
    _report_timing(a, bar, res)
    print(f"wrote {a.out}: cost {res.cost.values[0]:.6g} -> {res.cost.values[-1]:.6g} in {res.sizes['iteration']} iterations")


def _follow_store(a, kw, follow_kw, cluster_options):
    """``reconstruct --follow``: rounds over a growing store (:func:`daskptycho.follow`)."""
    import contextlib

    from .cluster import log_to_stderr
    from .errors import OptionsError
    from .follow import follow
    from .io.store import write_result

    if "checkpoint" in kw:
        raise OptionsError("checkpoint_every", "is not available with --follow (each round starts from the last)")
    follow_kw.setdefault("iterations_after", kw.get("iterations"))
    if a.pad_px is None:  # as without --follow: the store's recommended margin, once the writer has made the store
        from . import config
        from .io.stream import open_frames, wait_for_frames

        wait_for_frames(a.store, 1, timeout_s=follow_kw.get("timeout_s", config.get("follow.timeout_s", 60)))
        attrs = open_frames(a.store, 0, 0, check_values=False).attrs
        if "recommended_pad_px" in attrs:
            kw["pad_px"] = int(attrs["recommended_pad_px"])

    def said(r):
        if not a.quiet:
            state = "scan finished" if r["scan_finished"] else "scan going on"
            print(f"round at iteration {r['first_iteration']}: {r['frames_used']} frames ({state}), "
                  f"{r['iterations']} iterations in {r['seconds']:.3g} s", file=sys.stderr)

    with contextlib.nullcontext() if a.quiet else log_to_stderr():
        res = follow(a.store, cluster=a.cluster, cluster_options=cluster_options, on_round=said, **follow_kw, **kw)
    write_result(res, a.out, overwrite=a.overwrite)
    rounds = json.loads(res.attrs["follow_rounds"])
    how = "the scan finished" if res.attrs["scan_finished"] else "the writer stopped before finishing the scan: the result so far"
    print(f"wrote {a.out}: {len(rounds)} rounds, {int(res.frames_used.values[-1])} frames, cost {res.cost.values[-1]:.6g} "
          f"after {res.sizes['iteration']} iterations ({how})")


def _report_timing(a, bar, res):
    """The steady-state seconds per iteration (a line on stderr unless --quiet, and --timing's JSON)."""
    from .io.atomic import atomic_file
    from .metrics import steady_iteration_s, steady_span

    intervals = bar.intervals()
    if not intervals:  # a resumed run that had nothing left to do
        return
    ends = None
    if "peer_block_ends" in res.attrs:  # where each group of costs that arrived together ends
        last = set(json.loads(res.attrs["peer_block_ends"]))
        ends = [k for k, it in enumerate(bar.its) if it in last]
    steady = steady_iteration_s(intervals, burst_ends=ends)
    span = steady_span(intervals, burst_ends=ends)
    if not a.quiet:
        if span is not None:
            print(f"daskptycho: {steady:.4g} s per iteration in the steady state ({_steady_words(span, len(intervals))}; "
                  f"the first took {intervals[0]:.3g} s with the start)", file=sys.stderr)
        else:  # the first carries the start, the rest arrived right behind it: no steady state to speak of
            print(f"daskptycho: {len(intervals)} iteration{'s' if len(intervals) > 1 else ''} in {sum(intervals):.3g} s with the "
                  "start (no steady state: a steady-state time per iteration needs 3 or more iterations, the last "
                  "ones not all arriving together)", file=sys.stderr)
    if a.timing:
        rec = {
            "iteration_s": steady,
            "iteration_s_definition": f"steady-state wall seconds per iteration (daskptycho.metrics.steady_iteration_s): "
                                      f"the wall time between the costs' arrivals over {_steady_words(span, len(intervals))}"
                                      if span is not None else "no steady state: the whole run's wall time over its iterations, start included",
            "iterations": len(intervals),
            "first_iteration_s": intervals[0],
            "cost_arrival_intervals_s": intervals,
            "engine": res.attrs["engine"],
            "store": os.path.abspath(a.store),
        }
        with atomic_file(a.timing, overwrite=True) as tmp, open(tmp, "w") as f:  # refused before the run if it existed
            json.dump(rec, f, indent=1)


def _steady_words(span, n):
    """Which iterations (1-based) :func:`~daskptycho.metrics.steady_span`'s ``span`` averages over, in words."""
    a, b = span
    return f"iterations {a + 2}-{b + 1} of {n}" if b > a + 1 else f"iteration {b + 1} of {n}"


def _cmd_view(a):
    from .errors import DatasetError, OutputExistsError
    from .io.store import open_dataset, open_result

    # refused before anything is read or drawn: view would replace these files
    names = VIEW_PNGS + ((VIEW_TRUTH_PNG,) if a.truth else ())
    taken = [n for n in names if os.path.lexists(os.path.join(a.out, n))]
    if taken and not a.overwrite:
        more = f" (and {len(taken) - 1} more PNG{'s' if len(taken) > 2 else ''} of an earlier view)" if len(taken) > 1 else ""
        raise OutputExistsError(f"{os.path.join(a.out, taken[0])} exists{more}: pass overwrite=True to replace it")
    res = open_result(a.result)
    truth = pos = None
    if a.truth:
        ds = open_dataset(a.truth, check_values=False)
        if "truth_object" not in ds:
            raise DatasetError("truth_object", f"{a.truth} holds no truth_object; --truth needs a simulated store")
        truth, pos = ds["truth_object"], ds["position"].values
    from .view import write_pngs

    paths = write_pngs(res, a.out, truth=truth, position=pos)
    for p in paths:
        print(f"wrote {p}")
    if truth is not None:
        from .metrics import phase_correlation

        r, rms = phase_correlation(res["object"], truth, pos)
        print(f"phase correlation with the truth over the scanned field: Pearson r = {r:.4f} (RMS error {rms:.4f} rad after removing the offset)")


def _cmd_import(a):
    from .errors import DatasetError, OptionsError
    from .io import importers
    from .io.store import write_dataset

    _refuse_existing(a.out, a.overwrite)
    fmt = a.format
    if not os.path.exists(a.input):
        raise DatasetError("input", f"{a.input} does not exist")
    if fmt == "auto":
        fmt = "siemens-star" if a.input.endswith(".npz.bz2") else "npz" if a.input.endswith((".npz", ".npy")) else None
        fmt = "cxi" if a.input.lower().endswith((".cxi", ".h5", ".hdf5")) else fmt
        if fmt is None:
            raise OptionsError("format", f"cannot tell the format of {a.input}; give format='siemens-star', 'npz' or 'cxi'")
    kw = {}
    if a.pixel_size_m is not None:
        kw["pixel_size_m"] = a.pixel_size_m
    if a.energy_eV is not None:
        kw["energy_eV"] = a.energy_eV
    if fmt == "cxi":
        from .io.cxi import read_cxi

        ds = read_cxi(a.input, geometry=a.geometry, source_distance_m=a.source_distance_m, radiation=a.radiation)
    elif fmt == "siemens-star":
        ds = importers.import_siemens_star(a.input, **kw)
    else:
        if a.radiation is not None:
            kw["radiation"] = a.radiation
        ds = importers.import_npz(a.input, **kw)
    write_dataset(ds, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out}: {ds.sizes['scan']} patterns of {ds.sizes['ky']}x{ds.sizes['kx']} from {a.input} ({fmt})")
    if ds.attrs.get("geometry") == "near-field":
        print(f"near-field data (Fresnel number {ds.attrs['fresnel_number']:.3g}): reconstruct it with engine ml or gd "
              "(a Fresnel propagation to the detector; see docs/near-field.md)")


def _cmd_export(a):
    from .errors import OptionsError

    out = a.out.lower()
    if out.endswith(".cxi"):
        from .io.cxi import write_cxi

        print(f"wrote {write_cxi(a.store, a.out, overwrite=a.overwrite)}: CXI 1.6")
    elif out.endswith((".tif", ".tiff")):
        from .io.store import open_result
        from .io.tiff import write_tiff

        for path, what in write_tiff(open_result(a.store), a.out, amplitude=a.amplitude, overwrite=a.overwrite):
            print(f"wrote {path}: {what}")
    else:
        raise OptionsError("OUT", f"{a.out}: expected a name ending in .cxi (CXI 1.6) or .tif/.tiff (phase TIFF stack)")


def _cmd_graph(a):
    from .cluster import log_to_stderr
    from .graphs import render

    with log_to_stderr():  # --timeline: the cluster's start
        for path, what in render(a.out, a.tiles, store=a.store, timeline=a.timeline, workers=a.workers, iterations=a.iterations):
            print(f"wrote {path}: {what}")


def _in_finalizer(frame):
    """Is ``frame`` (or a caller) a finalizer: ``__del__`` or a ``weakref.finalize`` callback?
    Python prints an exception raised there as 'Exception ignored in ...' and drops it."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (code.co_name == "__call__" and code.co_filename.endswith("weakref.py")):
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum, frame):
    """SIGINT: KeyboardInterrupt, as Python's own handler raises it, except in a finalizer
    that the garbage collector happened to run (a client's future, say): there it would be
    dropped and the run would go on, so the signal is sent again a moment later."""
    import signal
    import threading

    if _in_finalizer(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def _sigint_handled():
    """Install :func:`_on_sigint` for a command (from the main thread only; elsewhere Python
    delivers no signal anyway); a context manager restoring the previous handler."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def cm():
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield  # embedded somewhere with its own idea of Ctrl-C: leave it alone
            return
        signal.signal(signal.SIGINT, _on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    return cm()


def main(argv=None):
    """Run ``daskptycho ARGV``; return the exit status (0, 2 for a user error, 130 for an interrupt)."""
    import contextlib
    import io

    from .errors import DaskptychoError

    err = io.StringIO()
    parser = _parser()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as e:
        text = err.getvalue().strip()
        if e.code == 2 and ": error: " in text:  # argparse's refusal: its last line, without the usage block
            prog, _, msg = text.splitlines()[-1].partition(": error: ")
            print(f"daskptycho: error: {msg} (see '{prog} --help')", file=sys.stderr)
            return 2
        sys.stderr.write(err.getvalue())
        if e.code in (0, None):  # --help, --version
            return 0
        raise
    flags = flag_map(parser, args.command)
    try:
        with _sigint_handled():
            {"simulate": _cmd_simulate, "info": _cmd_info, "reconstruct": _cmd_reconstruct, "view": _cmd_view,
             "graph": _cmd_graph, "import": _cmd_import, "export": _cmd_export}[args.command](args)
    except DaskptychoError as e:
        print("daskptycho: error: " + render_error(e, flags), file=sys.stderr)  # one line, whatever the message holds
        return 2
    except OSError as e:  # the file system refused (permission, disk full, read-only): one line, not a traceback
        print("daskptycho: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .cluster import close_all

        close_all(quiet=True)  # a cluster the interrupt left open (its owner never got to close it)
        print("daskptycho: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
