"""The ``daskptycho`` command line: simulate | import | info | reconstruct | view | graph.

User errors print one line (``daskptycho: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


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


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _parser():
    p = argparse.ArgumentParser(prog="daskptycho", description="Ptychographic reconstruction on Dask clusters.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="write a simulated dataset with known truth", description="Write a simulated dataset (with its ground truth) to a Zarr store.")
    s.add_argument("out", help="output store (directory)")
    s.add_argument("--kind", default="pbtio3", choices=["pbtio3", "image", "flyscan"],
                   help="pbtio3: electron multislice perovskite; image: X-ray 2D test image; flyscan: X-ray fly scan (motion blur, Poisson noise)")
    s.add_argument("--scan", type=_pair, default=(16, 16), help="scan grid, e.g. 16x16 (default)")
    s.add_argument("--step", type=float, help="scan step in metres")
    s.add_argument("--detector", type=int, default=64, help="detector pixels per side (default 64)")
    s.add_argument("--slices", type=_positive_int, help="object slices")
    s.add_argument("--slice-thickness", type=float, help="slice thickness in metres")
    s.add_argument("--energy", type=float, help="beam energy in eV")
    s.add_argument("--semiangle", type=float, help="probe semi-angle in rad")
    s.add_argument("--defocus", type=float, help="probe defocus in metres (positive = underfocus)")
    s.add_argument("--probe-modes", type=_positive_int, default=1, help="incoherent probe modes (default 1)")
    s.add_argument("--dose", type=float, help="dose in particles per square angstrom (Poisson noise); default: noise-free "
                   "for pbtio3 and image, 0.5 photons/A^2 for flyscan")
    s.add_argument("--noise-free", action="store_true", help="no Poisson noise, whatever the kind")
    s.add_argument("--flyscan-subpositions", type=_positive_int, help="flyscan: sub-positions summed per exposure (default 5)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing store")

    i = sub.add_parser("info", help="describe a dataset or result store", description="Print the geometry and contents of a store.")
    i.add_argument("store")

    r = sub.add_parser("reconstruct", help="reconstruct a dataset", description="Reconstruct a dataset store and write a result store.")
    r.add_argument("store", help="input dataset store")
    r.add_argument("--out", required=True, help="output result store")
    r.add_argument("--engine", default=None, help="ml | gd | hve | dm (default from config)")
    r.add_argument("--iterations", type=_positive_int)
    r.add_argument("--batch-size", type=_positive_int, help="positions per update (default: full batch)")
    r.add_argument("--slices", type=_positive_int, default=1)
    r.add_argument("--slice-thickness", type=float, help="slice thickness in metres")
    r.add_argument("--step", type=float, help="object step (1 = preconditioned Newton-like step)")
    r.add_argument("--refine-probe", action="store_true", help="also refine the probe")
    r.add_argument("--probe-modes", type=_modes, help="incoherent probe modes (dm: an integer or 'auto')")
    r.add_argument("--object-modes", type=_positive_int, help="object modes (dm)")
    r.add_argument("--partitions", type=_positive_int, help="parts of the scan for dm (default: one per worker)")
    r.add_argument("--partition", choices=["blocks", "index"], help="dm: spatially contiguous blocks (default) or even split by index")
    r.add_argument("--beta", type=float, help="dm: the difference-map parameter beta (default 0.8)")
    r.add_argument("--cost", choices=["amplitude", "poisson"])
    r.add_argument("--seed", type=int)
    r.add_argument("--tiles", type=_pair, help="tile grid for gd/hve, e.g. 3x3")
    r.add_argument("--pad-px", type=int, help="object grid margin in pixels (a fly-scan store recommends one: recommended_pad_px)")
    r.add_argument("--workers", type=_positive_int, help="workers of the embedded LocalCluster")
    r.add_argument("--device", choices=["cpu", "gpu"], help="where arrays live (default cpu; gpu with --cluster cuda)")
    r.add_argument("--cluster", metavar="SPEC", help="local (default from config) | cuda | ucx | slurm | lsf | pbs | a profile of "
                   "cluster/jobqueue.yaml | a scheduler address tcp://HOST:PORT, ucx://..., tls://...")
    r.add_argument("--jobs", type=_positive_int, help="batch jobs to submit with --cluster slurm/lsf/pbs (default 1)")
    r.add_argument("--scheduler-file", help="attach to the scheduler that wrote this file (dask scheduler --scheduler-file)")
    r.add_argument("--tls", action="store_true", default=None, help="TLS between client, scheduler and workers "
                   "(certificates from config daskptycho.cluster.tls-*, else temporary ones for an embedded cluster)")
    r.add_argument("--report", help="write a Dask performance report (HTML) of the run")
    r.add_argument("--timing", help="write per-iteration wall times (JSON)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing result")
    r.add_argument("--checkpoint-every", type=int, metavar="K", help="write the full state into the --out store every K iterations (0: never)")
    r.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out up to --iterations in total")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("graph", help="draw one iteration's task graph (and a real run's timeline)",
                       description="Render one gradient-decomposition iteration's task graph (SVG) and, with --timeline, "
                                   "the task stream of a real run on an embedded LocalCluster.")
    g.add_argument("--tiles", type=_pair, default=(3, 3), help="tile grid (default 3x3)")
    g.add_argument("--out", default="graphs", help="output directory (default graphs/)")
    g.add_argument("--store", help="take the scan geometry from this dataset (default: a 16x16 scan, 64 px patterns)")
    g.add_argument("--timeline", action="store_true", help="also run a small real reconstruction and draw its task stream")
    g.add_argument("--workers", type=_positive_int, default=2, help="workers for --timeline (default 2)")
    g.add_argument("--iterations", type=_positive_int, default=3, help="iterations for --timeline (default 3)")

    m = sub.add_parser("import", help="convert measured data into a daskptycho store",
                       description="Convert measured data into a daskptycho dataset store. Formats: the Tike Siemens-star "
                                   "test file (.npz.bz2: data, scan, probe), generic .npz/.npy files and CXI 1.6 (.cxi/.h5; see docs/format.md).")
    m.add_argument("input", help="input file")
    m.add_argument("out", help="output store (directory)")
    m.add_argument("--format", choices=["auto", "siemens-star", "npz", "cxi"], default="auto")
    m.add_argument("--geometry", choices=["auto", "far-field", "near-field"], default="auto", help="cxi: the diffraction regime (default: decided from the file)")
    m.add_argument("--source-distance", type=float, help="cxi: focus(source)-to-sample distance in metres of a cone beam (Fresnel scaling)")
    m.add_argument("--pixel-size", type=float, help="real-space pixel size in metres (nominal when the file has none)")
    m.add_argument("--energy", type=float, help="photon energy in eV (nominal when the file has none)")
    m.add_argument("--radiation", choices=["xray", "electron"], help="npz: the radiation, if the file does not say")
    m.add_argument("--overwrite", action="store_true", help="replace an existing store")

    x = sub.add_parser("export", help="export a result or dataset as CXI or a TIFF stack",
                       description="Export a result store as CXI 1.6 (OUT ending in .cxi: object, probe, cost, positions, geometry) "
                                   "or as an ImageJ TIFF stack of phase images (OUT ending in .tif/.tiff); a dataset store as CXI.")
    x.add_argument("store", help="result (or dataset) store")
    x.add_argument("out", help="output file: .cxi, .tif or .tiff")
    x.add_argument("--amplitude", action="store_true", help="tiff: also write the amplitude stack (OUT_amplitude.tif)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")

    v = sub.add_parser("view", help="write PNGs of a result", description="Write PNGs: phase and amplitude per slice, probe modes, cost curve.")
    v.add_argument("result", help="result store")
    v.add_argument("--out", required=True, help="output directory for PNGs")
    v.add_argument("--truth", help="dataset store with truth_object: also print the phase correlation and draw a comparison")
    return p


class _Progress:
    """A one-line progress bar on stderr with the cost of each iteration."""

    def __init__(self, total, quiet=False):
        self.total = total
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.times = []

    def __call__(self, it, cost):
        now = time.perf_counter()
        self.times.append(now)
        if self.quiet:
            return
        done = it + 1
        width = 30
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        line = f"iteration {done:>4}/{self.total} [{bar}] cost {cost:.6g}  {now - self.t0:6.1f} s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def iteration_times(self):
        edges = [self.t0] + self.times
        return [b - a for a, b in zip(edges[:-1], edges[1:])]


def _refuse_existing(out, overwrite):
    """Refuse an existing output before any work is done (the writer checks again at the end)."""
    from .errors import OutputExistsError

    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it")


def _cmd_simulate(a):
    from . import simulate, write_dataset

    _refuse_existing(a.out, a.overwrite)
    kw = {"kind": a.kind, "scan": a.scan, "detector": a.detector, "probe_modes": a.probe_modes, "seed": a.seed}
    if a.noise_free:
        kw["dose"] = None
    elif a.dose is not None:
        kw["dose"] = a.dose
    if a.flyscan_subpositions is not None:
        kw["flyscan_subpositions"] = a.flyscan_subpositions
    for opt, key in (("step", "step_m"), ("slices", "slices"), ("slice_thickness", "slice_thickness_m"), ("energy", "energy_eV"),
                     ("semiangle", "semiangle_rad"), ("defocus", "defocus_m")):
        if getattr(a, opt) is not None:
            kw[key] = getattr(a, opt)
    ds = simulate(**kw)
    write_dataset(ds, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out}: {ds.sizes['scan']} patterns of {ds.sizes['ky']}x{ds.sizes['kx']}, "
          f"object {ds.sizes['slice']}x{ds.sizes['y']}x{ds.sizes['x']}, pixel {ds.attrs['pixel_size_m']:.4g} m")


def _describe(path):
    from .io.store import RESULT_FORMAT_NAME, _open_zarr, open_dataset

    raw = _open_zarr(path)
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
        lines.append("  note: the engines here model far-field diffraction; 'reconstruct' refuses near-field data")
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


def _cmd_reconstruct(a):
    from . import config, open_dataset, reconstruct, write_result
    from .errors import OutputExistsError

    if os.path.exists(a.out) and not (a.overwrite or a.resume):
        raise OutputExistsError(f"{a.out} exists: pass --overwrite to replace it (or --resume to continue its checkpoint)")
    ds = open_dataset(a.store)
    kw = {}
    if a.pad_px is None and "recommended_pad_px" in ds.attrs:
        kw["pad_px"] = int(ds.attrs["recommended_pad_px"])
    for opt, key in (("iterations", "iterations"), ("batch_size", "batch_size"), ("slices", "slices"),
                     ("slice_thickness", "slice_thickness_m"), ("step", "step"), ("probe_modes", "probe_modes"),
                     ("cost", "cost"), ("seed", "seed"), ("tiles", "tiles"), ("workers", "workers"), ("device", "device"),
                     ("object_modes", "object_modes"), ("pad_px", "pad_px"), ("partitions", "partitions"), ("partition", "partition"), ("beta", "beta")):
        if getattr(a, opt) is not None:
            kw[key] = getattr(a, opt)
    if a.refine_probe:
        kw["refine_probe"] = True
    if a.checkpoint_every is not None or a.resume:  # the checkpoints live in the result store
        kw.update(checkpoint=a.out, resume=a.resume)
        if a.checkpoint_every is not None:
            kw["checkpoint_every"] = a.checkpoint_every
    iterations = kw.get("iterations", config.get("reconstruct.iterations"))
    bar = _Progress(iterations, a.quiet)
    cluster_options = {k: v for k, v in (("jobs", a.jobs), ("scheduler_file", a.scheduler_file), ("tls", a.tls)) if v is not None}
    if not a.quiet:  # a batch cluster says which jobs it submitted and where its dashboard is
        from .cluster import log_to_stderr

        log_to_stderr()
    res = reconstruct(ds, engine=a.engine, progress=bar, report=a.report, cluster=a.cluster, cluster_options=cluster_options, **kw)
    if "checkpoint" in kw:
        from .io.checkpoint import write_result_keeping_checkpoint

        write_result_keeping_checkpoint(res, a.out)
    else:
        write_result(res, a.out, overwrite=a.overwrite)
    times = bar.iteration_times()
    if a.timing:
        import statistics

        from .metrics import steady_iteration_s

        rec = {"iteration_s": times, "iteration_s_median": statistics.median(times[1:] or times),
               "iteration_s_steady": steady_iteration_s(times),
               "engine": res.attrs["engine"], "store": os.path.abspath(a.store)}
        tmp = a.timing + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, a.timing)
    print(f"wrote {a.out}: cost {res.cost.values[0]:.6g} -> {res.cost.values[-1]:.6g} in {res.sizes['iteration']} iterations")


def _cmd_view(a):
    from . import open_dataset, open_result
    from .view import write_pngs

    res = open_result(a.result)
    truth = pos = None
    if a.truth:
        ds = open_dataset(a.truth, check_values=False)
        if "truth_object" not in ds:
            from .errors import DatasetError

            raise DatasetError("truth_object", f"{a.truth} holds no truth_object; --truth needs a simulated store")
        truth, pos = ds["truth_object"], ds["position"].values
    paths = write_pngs(res, a.out, truth=truth, position=pos)
    for p in paths:
        print(f"wrote {p}")
    if truth is not None:
        from .metrics import phase_correlation

        r, rms = phase_correlation(res["object"], truth, pos)
        print(f"phase correlation with the truth over the scanned field: Pearson r = {r:.4f} (RMS error {rms:.4f} rad after removing the offset)")


def _cmd_import(a):
    from . import write_dataset
    from .errors import DatasetError, OptionsError
    from .io import importers

    _refuse_existing(a.out, a.overwrite)
    fmt = a.format
    if not os.path.exists(a.input):
        raise DatasetError("input", f"{a.input} does not exist")
    if fmt == "auto":
        fmt = "siemens-star" if a.input.endswith(".npz.bz2") else "npz" if a.input.endswith((".npz", ".npy")) else None
        fmt = "cxi" if a.input.lower().endswith((".cxi", ".h5", ".hdf5")) else fmt
        if fmt is None:
            raise OptionsError("--format", f"cannot tell the format of {a.input}; give --format siemens-star, npz or cxi")
    kw = {}
    if a.pixel_size is not None:
        kw["pixel_size_m"] = a.pixel_size
    if a.energy is not None:
        kw["energy_eV"] = a.energy
    if fmt == "cxi":
        from .io.cxi import read_cxi

        ds = read_cxi(a.input, geometry=a.geometry, source_distance_m=a.source_distance, radiation=a.radiation)
    elif fmt == "siemens-star":
        ds = importers.import_siemens_star(a.input, **kw)
    else:
        if a.radiation is not None:
            kw["radiation"] = a.radiation
        ds = importers.import_npz(a.input, **kw)
    write_dataset(ds, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out}: {ds.sizes['scan']} patterns of {ds.sizes['ky']}x{ds.sizes['kx']} from {a.input} ({fmt})")
    if ds.attrs.get("geometry") == "near-field":
        print(f"near-field data (Fresnel number {ds.attrs['fresnel_number']:.3g}): kept for exchange; the engines here model far-field diffraction")


def _cmd_export(a):
    from .errors import OptionsError

    out = a.out.lower()
    if out.endswith(".cxi"):
        from .io.cxi import write_cxi

        print(f"wrote {write_cxi(a.store, a.out, overwrite=a.overwrite)}: CXI 1.6")
    elif out.endswith((".tif", ".tiff")):
        from . import open_result
        from .io.tiff import write_tiff

        for path, what in write_tiff(open_result(a.store), a.out, amplitude=a.amplitude, overwrite=a.overwrite):
            print(f"wrote {path}: {what}")
    else:
        raise OptionsError("OUT", f"{a.out}: expected a name ending in .cxi (CXI 1.6) or .tif/.tiff (phase TIFF stack)")


def _cmd_graph(a):
    from .graphs import render

    for path, what in render(a.out, a.tiles, store=a.store, timeline=a.timeline, workers=a.workers, iterations=a.iterations):
        print(f"wrote {path}: {what}")


def main(argv=None):  # noqa: D103
    import contextlib
    import io

    from .errors import DaskptychoError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _parser().parse_args(argv)
    except SystemExit as e:
        text = err.getvalue().strip()
        if e.code == 2 and ": error: " in text:  # argparse's refusal: its last line, without the usage block
            prog, _, msg = text.splitlines()[-1].partition(": error: ")
            print(f"daskptycho: error: {msg} (see '{prog} --help')", file=sys.stderr)
            return 2
        sys.stderr.write(err.getvalue())
        raise
    try:
        {"simulate": _cmd_simulate, "info": _cmd_info, "reconstruct": _cmd_reconstruct, "view": _cmd_view,
         "graph": _cmd_graph, "import": _cmd_import, "export": _cmd_export}[args.command](args)
    except DaskptychoError as e:
        print("daskptycho: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    except OSError as e:  # the file system refused (permission, disk full, read-only): one line, not a traceback
        print("daskptycho: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daskptycho: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
