"""Independent quality benchmark (issue 17, part 6): daskptycho and Pty-Chi on data that
daskptycho's own simulator did not make, scored by one registration-aware phase error.

    bash benchmarks/independent/setup.sh               # once: abTEM in benchmarks/independent/.venv
    bash benchmarks/peers/setup.sh                     # once: Pty-Chi in benchmarks/peers/.venv
    python -m benchmarks independent [--cases thin,thick,flyscan] [--quick] [--no-peer]

Cases (docs/quality.md has the physics, sizes and doses):

* ``thin``, ``thick``: 4D-STEM of PbTiO3 along [001] at 200 keV made by abTEM
  (``benchmarks/independent/make_electron.py``, run in the abTEM venv): 1.17 nm
  reconstructed with 1 slice, 7.81 nm with 20 slices; 20 x 20 positions, 64 px patterns
  (binned 3 x 3 from abTEM's far field), 0.122 A pixels, Poisson noise at 1e5 e/A^2.
* ``flyscan``: an X-ray fly scan written here (:func:`make_flyscan`, NumPy only): 4
  incoherent probe modes with powers 0.39/0.38/0.19/0.04, the sample moving continuously
  along x over 80 % of a step during each exposure (9 sub-pixel sub-positions), an object
  from matplotlib's sample image, Poisson noise.

Runs, 50 iterations each: daskptycho ``reconstruct(store, engine=..., iterations=50,
slices=...)`` with nothing else for ml and gd; on the fly scan also dm (to 100), and ml
and dm with 1 and 4 probe modes; Pty-Chi's LSQML (its defaults, probe optimisation on,
its default batch of 100; 1 and 4 modes on the fly scan) in benchmarks/peers/.venv. The
error at iterations 40 and 50 (and 100): daskptycho, one run from scratch each (its default
schedule depends on the run's total); Pty-Chi, the object after those epochs of one task.

Python API, to try option sets quickly::

    from benchmarks.independent import case_store, score
    import daskptycho as dp
    res = dp.reconstruct(case_store("thin"), engine="ml", iterations=50, step=0.5)
    score("thin", res)      # {'phase_nrmse': ..., 'complex_error': ..., 'shift_px': ...}

Writes benchmarks/results/independent.json (``--quick``: independent_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIR = os.path.join(HERE, "independent")
DATA = os.path.join(DIR, "data")
ABTEM_PYTHON = os.path.join(DIR, ".venv", "bin", "python")
PEER_PYTHON = os.path.join(HERE, "peers", ".venv", "bin", "python")
CASES = ("thin", "thick", "flyscan")
SLICES = {"thin": 1, "thick": 20, "flyscan": 1}
ITERATIONS = 50
STAGES = (40, 50)
FLY_STAGES = (40, 50, 100)  # dm on the fly scan
PTYCHI_BATCH = 100  # Pty-Chi's default minibatch (LSQML reconstructor_options.batch_size)

# --------------------------------------------------------------------------- data


def case_store(name, regenerate=False):
    """The path of case ``name``'s daskptycho store (thin, thick, flyscan), made if missing.

    Stores and the abTEM .npz they come from are cached under benchmarks/independent/data/.
    The electron cases need abTEM's venv (made by benchmarks/independent/setup.sh, run here
    when missing).
    """
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; expected one of {CASES}")
    path = os.path.join(DATA, f"{name}.zarr")
    if os.path.isdir(path) and not regenerate:
        return path
    os.makedirs(DATA, exist_ok=True)
    import daskptycho as dp

    ds = make_flyscan() if name == "flyscan" else electron_dataset(name, regenerate)
    dp.write_dataset(ds, path, overwrite=True)
    return path


def _abtem_npz(name, regenerate=False):
    npz = os.path.join(DATA, f"{name}.npz")
    if os.path.exists(npz) and not regenerate:
        return npz
    if not os.path.exists(ABTEM_PYTHON):
        subprocess.run(["bash", os.path.join(DIR, "setup.sh")], check=True)
    tmp = npz + ".tmp.npz"
    subprocess.run([ABTEM_PYTHON, os.path.join(DIR, "make_electron.py"), name, tmp], check=True)
    os.replace(tmp, npz)
    return npz


def electron_dataset(name, regenerate=False):
    """The abTEM case ``name`` as a daskptycho dataset: patterns, positions (metres, probe
    centres, on whole pixels of the reconstruction grid), the probe's nominal aperture and
    defocus (for the initial probe), the slice thickness, and ``truth_object`` on the
    default reconstruction grid (the periodic supercell's band-limited phase per slice)."""
    import daskptycho as dp
    from daskptycho.geometry import object_grid

    with np.load(_abtem_npz(name, regenerate)) as z:
        meta = json.loads(str(z["meta"]))
        intensity, pos_px, phase = z["intensity"], z["position_px"], z["truth_phase"]
    dx = meta["pixel_size_A"] * 1e-10
    n = meta["detector_px"]
    position = pos_px * dx
    grid = object_grid(position, (n, n), dx)
    m = phase.shape[-1]  # the supercell's period in pixels
    iy = np.rint(grid.y / dx).astype(int) % m
    ix = np.rint(grid.x / dx).astype(int) % m
    truth = np.exp(1j * phase[:, iy][:, :, ix]).astype(np.complex64)
    attrs = {"probe_semiangle_rad": meta["semiangle_mrad"] * 1e-3, "probe_defocus_m": meta["defocus_A"] * 1e-10,
             "probe_cs_m": 0.0, "simulation": f"abtem {name}", "independent_case": json.dumps(meta),
             "licence": "simulated with abTEM (GPL-3.0) for this benchmark"}
    return dp.build_dataset(intensity, position, pixel_size_m=dx, radiation="electron", energy_eV=meta["energy_eV"],
                            truth_object=truth, truth_grid=grid, slice_thickness_m=meta["recon_slice_thickness_A"] * 1e-10,
                            attrs=attrs)


# the fly scan: X-ray, 8 keV, 64 px patterns on 10 nm pixels
FLY = dict(energy_eV=8e3, detector=64, pixel_size_m=10e-9, scan=(20, 20), step_px=6, motion_fraction=0.8, subpositions=9,
           semiangle_rad=2.5e-3, defocus_m=40e-6, astigmatism_m=8e-6, mode_powers=(0.39, 0.38, 0.19, 0.04),
           photons_per_pattern=5e5, phase_rad=1.2, amplitude_min=0.75, seed=7)


def _fly_image(shape):
    """Phase and amplitude images of ``shape`` in [0, 1] from matplotlib's sample data
    (Grace Hopper's portrait and the Jacksboro fault elevation map), resampled by PIL."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("L")
        hopper = hopper.crop((40, 40, hopper.size[0] - 40, hopper.size[0] - 40 + hopper.size[0] - 80))
    with cbook.get_sample_data("jacksboro_fault_dem.npz") as f:
        dem = np.asarray(f["elevation"], dtype=np.float64)
    out = []
    for img in (hopper, Image.fromarray(dem.astype(np.float32))):
        a = np.asarray(img.resize(shape[::-1], Image.BICUBIC), dtype=np.float64)
        out.append((a - a.min()) / (a.max() - a.min()))
    return out


def fly_modes(n, dx, lam, p=FLY):
    """The beam: ``len(mode_powers)`` orthogonal modes of a focused, defocused, astigmatic
    beam (a soft-edged circular pupil times the Zernike polynomials 1, x, y, 2r^2-1, which
    are orthogonal over the pupil, so the modes are orthogonal in real space too), mode k
    holding ``mode_powers[k]`` of the power; returned (K, n, n) with unit total power."""
    k = np.fft.fftshift(np.fft.fftfreq(n, dx))
    ky, kx = np.meshgrid(k, k, indexing="ij")
    kmax = p["semiangle_rad"] / lam
    r = np.sqrt(kx ** 2 + ky ** 2) / kmax
    pupil = np.clip((1.0 - r) * n / 4 + 0.5, 0, 1)  # about 2 pixels of soft edge
    chi = -np.pi * lam * (p["defocus_m"] * (kx ** 2 + ky ** 2) + p["astigmatism_m"] * (kx ** 2 - ky ** 2))
    zern = (np.ones_like(r), kx / kmax, ky / kmax, 2 * r ** 2 - 1)
    modes = []
    for z, power in zip(zern, p["mode_powers"]):
        f = pupil * z * np.exp(-1j * chi)  # daskptycho's (and abTEM's) sign: positive defocus_m = underfocus
        psi = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(f)))
        modes.append(psi * np.sqrt(power / np.sum(np.abs(psi) ** 2)))
    return np.array(modes)


def make_flyscan(p=FLY):
    """The fly-scan dataset, by this module's own forward model (not daskptycho's
    simulator): for each exposure the sample moves along x over ``motion_fraction`` of a
    step, sampled at ``subpositions`` evenly spaced sub-pixel offsets; each sub-position's
    far-field intensity is the incoherent sum over the beam's modes of ``|FFT(P_k O)|^2``
    (the sub-pixel part of the offset applied to the beam as a Fourier shift, the whole
    part to the object window); the pattern is their mean, scaled to
    ``photons_per_pattern`` for unit transmission, Poisson-sampled."""
    import daskptycho as dp
    from daskptycho.geometry import object_grid
    from daskptycho.physics import wavelength

    rng = np.random.default_rng(p["seed"])
    n, dx = p["detector"], p["pixel_size_m"]
    lam = float(wavelength("xray", p["energy_eV"]))
    iy, ix = np.meshgrid(np.arange(p["scan"][0]), np.arange(p["scan"][1]), indexing="ij")
    pos_px = np.stack([iy.ravel(), ix.ravel()], 1) * p["step_px"] + 40
    position = pos_px * dx
    reach = p["step_px"] * p["motion_fraction"] / 2
    offsets = np.linspace(-reach, reach, p["subpositions"])
    pad = int(np.ceil(reach)) + 1
    grid = object_grid(position, (n, n), dx, pad_px=pad)
    phase01, amp01 = _fly_image(grid.shape)
    obj = ((p["amplitude_min"] + (1 - p["amplitude_min"]) * amp01) * np.exp(1j * p["phase_rad"] * phase01)).astype(np.complex128)
    modes = fly_modes(n, dx, lam, p)
    freq = np.fft.fftfreq(n)
    corner = np.rint((position - np.array(grid.origin_m)) / dx).astype(int) - n // 2
    expected = np.zeros((len(position), n, n))
    for off in offsets:
        whole = int(np.floor(off))
        ramp = np.exp(-2j * np.pi * freq * (off - whole))  # shift the beam by the fraction along x
        beam = np.fft.ifft(np.fft.fft(modes, axis=-1) * ramp, axis=-1)
        for j, (cy, cx) in enumerate(corner):
            win = obj[cy:cy + n, cx + whole:cx + whole + n]
            far = np.fft.fft2(beam * win, norm="ortho")
            expected[j] += np.sum(np.abs(far) ** 2, axis=0)
    expected = np.fft.fftshift(expected, axes=(-2, -1)) / len(offsets) * p["photons_per_pattern"]
    intensity = rng.poisson(expected).astype(np.float32)
    attrs = {"probe_semiangle_rad": p["semiangle_rad"], "probe_defocus_m": p["defocus_m"], "probe_cs_m": 0.0,
             "simulation": "independent flyscan", "independent_case": json.dumps({**p, "offsets_px": offsets.tolist()}),
             "recommended_pad_px": pad}
    return dp.build_dataset(intensity, position, pixel_size_m=dx, radiation="xray", energy_eV=p["energy_eV"],
                            truth_object=obj[None].astype(np.complex64), truth_grid=grid,
                            truth_probe=(modes * np.sqrt(p["photons_per_pattern"])).astype(np.complex64), attrs=attrs)


# --------------------------------------------------------------------------- scoring


def _wrap(a):
    return np.angle(np.exp(1j * a))


def score_object(obj, truth, position, reach=4):
    """The registration-aware error of ``obj`` against ``truth`` over the scanned field.

    Parameters
    ----------
    obj, truth : xarray.DataArray (slice, y, x), complex, coordinates in metres (pixel centres)
    position : (J, 2) probe centres (m); the scanned field is their bounding box
    reach : int
        Whole-pixel shifts tried each way (the scan's translation is free; a
        reconstruction may also come out shifted with its probe).

    The result is put on the truth's pixel lattice, shifted by (dy, dx) in [-reach, reach]
    pixels, and the shift with the least ``phase_nrmse`` kept. With ``a`` the projected
    phase of the result (the sum of its slices' phases) and ``b`` the truth's:

    * ``phase_nrmse``: rms of ``a - b - c``, each pixel's difference wrapped into
      (-pi, pi] around the best constant ``c`` (the global phase offset is free), divided
      by the standard deviation of ``b`` (0 = perfect; 1 = as far off as a flat phase);
      a phase wrap of a single slice (heavy columns) is no error;
    * ``phase_nrmse_unwrapped``: the same without the wrap, ``c`` the mean (the slices'
      phases summed as they are);
    * ``complex_error``: ``||s P - T|| / ||T||`` for the projected transmissions (the
      products over slices, the phase-wrapped comparison) with ``s`` the least-squares
      complex scale (the object's scale and phase against the probe's are free);
    * ``phase_r``: Pearson's r of ``b`` and ``a`` unwrapped toward it (``b + c + wrap(a - b - c)``);
    * ``shift_px``: the registration kept; ``pixels``: the pixels compared.
    """
    from daskptycho.metrics import scanned_region

    dx = float(truth.y[1] - truth.y[0])
    y0, y1, x0, x1 = scanned_region(position)
    t = truth.sel(y=slice(y0 - dx / 2, y1 + dx / 2), x=slice(x0 - dx / 2, x1 + dx / 2)).values.astype(np.complex128)
    ty = np.rint((truth.sel(y=slice(y0 - dx / 2, y1 + dx / 2)).y.values - float(truth.y[0])) / dx).astype(int)
    tx = np.rint((truth.sel(x=slice(x0 - dx / 2, x1 + dx / 2)).x.values - float(truth.x[0])) / dx).astype(int)
    b = np.angle(t).sum(0)
    tp = np.prod(t, axis=0)
    o = np.asarray(obj.values, dtype=np.complex128)
    # the result's pixel indices on the truth's lattice
    oy = np.rint((obj.y.values - float(truth.y[0])) / dx).astype(int)
    ox = np.rint((obj.x.values - float(truth.x[0])) / dx).astype(int)
    best = None
    for sy in range(-reach, reach + 1):
        for sx in range(-reach, reach + 1):
            iy = np.searchsorted(oy + sy, ty)
            ix = np.searchsorted(ox + sx, tx)
            if iy.max(initial=0) >= len(oy) or ix.max(initial=0) >= len(ox) or not (
                    np.array_equal(oy[np.minimum(iy, len(oy) - 1)] + sy, ty) and np.array_equal(ox[np.minimum(ix, len(ox) - 1)] + sx, tx)):
                continue  # the shifted result does not cover the scanned field
            w = o[:, iy][:, :, ix]
            a = np.angle(w).sum(0)
            d = a - b
            c = np.angle(np.mean(np.exp(1j * d)))
            e = float(np.sqrt(np.mean(_wrap(d - c) ** 2)) / b.std())
            if best is None or e < best[0]:
                best = (e, (sy, sx), a, w)
    if best is None:
        raise ValueError("no registration within reach leaves the scanned field inside the result")
    e, shift, a, w = best
    d = a - b
    wp = np.prod(w, axis=0)
    s = np.vdot(wp, tp) / np.vdot(wp, wp)
    c = np.angle(np.mean(np.exp(1j * d)))
    au = b + c + _wrap(d - c)  # the result's phase unwrapped toward the truth's (heavy columns wrap in one slice)
    am, bm = au - au.mean(), b - b.mean()
    return {"phase_nrmse": e, "phase_nrmse_unwrapped": float(np.sqrt(np.mean((d - d.mean()) ** 2)) / b.std()),
            "complex_error": float(np.linalg.norm(s * wp - tp) / np.linalg.norm(tp)),
            "phase_r": float(np.dot(am.ravel(), bm.ravel()) / np.sqrt(np.dot(am.ravel(), am.ravel()) * np.dot(bm.ravel(), bm.ravel()))),
            "shift_px": list(shift), "pixels": int(b.size)}


_TRUTH = {}


def _truth(name):
    if name not in _TRUTH:
        import daskptycho as dp

        ds = dp.open_dataset(case_store(name))
        _TRUTH[name] = (ds["truth_object"].load(), ds["position"].values)
    return _TRUTH[name]


def object_array(obj, name, slices=None):
    """An object (S, H, W) on case ``name``'s default reconstruction grid (``pad_px=0``, as
    daskptycho's ``prepare`` makes it: Pty-Chi's object when given daskptycho's initial
    object) as a DataArray with that grid's coordinates."""
    import xarray as xr

    from daskptycho.geometry import object_grid

    truth, position = _truth(name)
    obj = np.asarray(obj)
    if obj.ndim == 2:
        obj = obj[None]
    dx = float(truth.y[1] - truth.y[0])
    import daskptycho as dp

    n = dp.open_dataset(case_store(name))["intensity"].shape[-1]
    g = object_grid(position, (n, n), dx)
    if obj.shape[-2:] != tuple(g.shape):
        raise ValueError(f"object of {obj.shape[-2:]} pixels; case {name!r} has a {tuple(g.shape)} default grid")
    return xr.DataArray(obj, dims=("slice", "y", "x"), coords={"y": g.y, "x": g.x, "slice": np.arange(obj.shape[0])})


def score(name, result, reach=4):
    """Score a reconstruction of case ``name`` (see :func:`score_object`).

    ``result``: a daskptycho result (Dataset with ``object``), an object DataArray
    (slice, y, x) with metre coordinates, or an array (S, H, W) / (H, W) on the case's
    default grid (a Pty-Chi object started from daskptycho's initial object).
    """
    truth, position = _truth(name)
    if hasattr(result, "data_vars"):
        obj = result["object"]
    elif hasattr(result, "dims"):
        obj = result
    else:
        obj = object_array(result, name)
    return score_object(obj.load(), truth, position, reach)


# --------------------------------------------------------------------------- runs


def run_daskptycho(name, engine, client, stages=STAGES, **options):
    """daskptycho on case ``name``: one run from scratch per entry of ``stages`` (iterations),
    each scored. Separate runs, not a checkpoint resumed: the default schedule (minibatch
    rounds for the first part of the run, then full batch) depends on a run's total, so a
    40-iteration run extended to 50 is not a 50-iteration run. Options beyond
    ``iterations`` and ``slices`` are the row's own (probe modes)."""
    import daskptycho as dp

    store = case_store(name)
    row = {"case": name, "code": "daskptycho", "engine": engine, "options": dict(options), "errors": {}, "seconds": {}}
    for n in stages:
        t0 = time.perf_counter()
        res = dp.reconstruct(store, engine=engine, iterations=n, slices=SLICES[name], client=client, **options)
        row["seconds"][str(n)] = time.perf_counter() - t0
        row["errors"][str(n)] = score(name, res)
        print(f"{name} daskptycho {engine} {options or ''} it {n}: {row['errors'][str(n)]} ({row['seconds'][str(n)]:.0f} s)", flush=True)
    row["run_s"] = row["seconds"][str(stages[-1])]  # the longest run alone
    row["probe_power_fraction"] = res["probe_power_fraction"].values.tolist()
    row["final_cost"] = float(res["cost"].values[-1])
    return row


def run_ptychi(name, modes=1, stages=STAGES, batch_size=PTYCHI_BATCH, threads=1):
    """Pty-Chi's LSQML on case ``name`` in benchmarks/peers/.venv (a subprocess running
    benchmarks/independent/ptychi_run.py), scored here with the same scorer."""
    if not os.path.exists(PEER_PYTHON):
        raise RuntimeError("no Pty-Chi venv: run bash benchmarks/peers/setup.sh")
    store = case_store(name)
    row = {"case": name, "code": "Pty-Chi LSQML", "engine": "lsqml", "options": {"probe_modes": modes, "batch_size": batch_size},
           "errors": {}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="independent-ptychi-") as tmp:
        out = os.path.join(tmp, "objects.npz")
        t0 = time.perf_counter()
        cmd = [PEER_PYTHON, os.path.join(DIR, "ptychi_run.py"), store, out, "--slices", str(SLICES[name]), "--modes", str(modes),
               "--stages", ",".join(map(str, stages)), "--batch-size", str(batch_size), "--threads", str(threads)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        with np.load(out) as z:
            meta = json.loads(str(z["meta"]))
            for n in stages:
                row["errors"][str(n)] = score(name, z[f"object_{n}"])
                row["seconds"][str(n)] = meta["seconds"][str(n)]
                print(f"{name} Pty-Chi modes={modes} it {n}: {row['errors'][str(n)]}", flush=True)
        row["run_s"] = max(meta["seconds"].values())  # cumulative: the task's epochs
        row["versions"] = meta["versions"]
        row["wall_s"] = time.perf_counter() - t0
    return row


def plan(case, quick=False):
    """The runs of one case: (code, engine, options, stages)."""
    stages = (5, 10) if quick else STAGES
    runs = [("daskptycho", "ml", {}, stages), ("daskptycho", "gd", {}, stages)]
    if case == "flyscan":
        runs += [("daskptycho", "dm", {}, (5, 10) if quick else FLY_STAGES)]
        for m in (1, 4):
            runs += [("daskptycho", "ml", {"probe_modes": m}, stages), ("daskptycho", "dm", {"probe_modes": m}, stages)]
        runs += [("ptychi", "lsqml", {"probe_modes": 1}, stages), ("ptychi", "lsqml", {"probe_modes": 4}, stages)]
    else:
        runs += [("ptychi", "lsqml", {"probe_modes": 1}, stages)]
    return runs


def _tree_state():
    """The commit the run's daskptycho came from, and whether daskptycho/ had uncommitted
    changes (the repository is shared: the engines' defaults can be mid-change)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "daskptycho"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split("\n")
        return {"commit": head, "daskptycho_uncommitted": [d.strip() for d in dirty if d.strip()]}
    except (OSError, subprocess.CalledProcessError) as e:
        return {"error": str(e)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks independent")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated of thin,thick,flyscan")
    p.add_argument("--quick", action="store_true", help="10 iterations (errors at 5 and 10): a smoke run; writes independent_quick.json")
    p.add_argument("--no-peer", action="store_true", help="daskptycho only (no Pty-Chi venv needed); keeps earlier Pty-Chi rows")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (1 thread each)")
    p.add_argument("--regenerate", action="store_true", help="make the data again (abTEM and the fly scan)")
    a = p.parse_args(argv)
    cases = [c for c in a.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"--cases: unknown {sorted(unknown)}")
    from distributed import Client

    from daskptycho.cluster import local_cluster

    from .common import write

    out = "independent_quick" if a.quick else "independent"
    load0 = os.getloadavg()
    rows, data = [], {}
    previous = None
    path = os.path.join(HERE, "results", f"{out}.json")
    if os.path.exists(path) and (set(cases) != set(CASES) or a.no_peer):  # a partial rerun keeps the other rows
        with open(path) as f:
            previous = json.load(f)
        # rows of other cases, and with --no-peer the Pty-Chi rows of these, stay
        rows = [r for r in previous.get("rows", []) if r["case"] not in cases or (a.no_peer and r["code"] != "daskptycho")]
        data = {k: v for k, v in previous.get("data", {}).items() if k not in cases}
    command = "python -m benchmarks independent " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(partial):
        payload = {"daskptycho_tree": _tree_state(), "loadavg_start": load0, "loadavg_end": os.getloadavg(), "data": data, "rows": rows, "command": command,
                   "ptychi_batch_size": PTYCHI_BATCH}
        if partial:
            payload["partial"] = True
        return write(out, payload)

    for case in cases:
        t0 = time.perf_counter()
        store = case_store(case, regenerate=a.regenerate)
        import daskptycho as dp

        ds = dp.open_dataset(store)
        data[case] = {"store": os.path.relpath(store, ROOT), "patterns": list(ds["intensity"].shape),
                      "slices": SLICES[case], "pixel_size_m": ds.attrs["pixel_size_m"], "radiation": ds.attrs["radiation"],
                      "mean_counts": float(ds["intensity"].sum(("ky", "kx")).mean()), "made_s": time.perf_counter() - t0,
                      "case": json.loads(ds.attrs["independent_case"])}
        for code, engine, options, stages in plan(case, a.quick):
            try:
                if code == "ptychi":
                    if a.no_peer:
                        continue
                    rows.append(run_ptychi(case, modes=options["probe_modes"], stages=stages))
                else:
                    with local_cluster(a.workers, memory_limit=0) as cl, Client(cl) as c:
                        rows.append(run_daskptycho(case, engine, c, stages, **options))
            except Exception as e:  # noqa: BLE001 - recorded, the other runs go on
                rows.append({"case": case, "code": "Pty-Chi LSQML" if code == "ptychi" else "daskptycho", "engine": engine,
                             "options": options, "failed": f"{type(e).__name__}: {e}"})
                print(f"{case} {code} {engine} {options} FAILED: {rows[-1]['failed']}", flush=True)
            save(partial=True)
    print(f"wrote {save(partial=False)}")


if __name__ == "__main__":
    main()
