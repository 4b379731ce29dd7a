"""Electron 4D-STEM data of PbTiO3 made with abTEM, for the independent quality benchmark.

Runs in benchmarks/independent/.venv (abTEM; ``bash benchmarks/independent/setup.sh``), not in
the project venv, and imports nothing of daskptycho::

    benchmarks/independent/.venv/bin/python benchmarks/independent/make_electron.py thin OUT.npz

``benchmarks/independent.py`` calls it and turns the .npz into a daskptycho store.

Physics (all abTEM's): cubic PbTiO3 (a = 3.905 A, Pm-3m: Pb at the corner, Ti at the body
centre, O at the face centres) seen along [001], a periodic 6 x 6 cell supercell (23.43 A);
Lobato parametrisation, infinite projection, slices of a/2; a 200 keV probe with a soft
20 mrad aperture and 50 A of underfocus (abTEM's ``defocus``, = -C10); the exit waves of
abTEM's multislice at every scan position, on 384 x 384 points (0.061 A; abTEM's
antialiasing aperture keeps 2/3 of that band, 137 mrad). The detector: the far-field
intensity ``|FFT(exit wave)|^2`` (1.07 mrad pixels) cropped to the centred 192 x 192 pixels
(+-103 mrad) and binned 3 x 3 into 64 x 64 pixels of 3.2 mrad, the zero frequency in the
middle of bin 32 (a pixel integrates the intensity that falls on it, as a real detector
does); scaled to ``dose * step^2`` electrons for the incident probe's whole intensity and
Poisson-sampled. The reconstruction pixel this detector implies is 23.43 A / 192 = 0.122 A.

Scan: 20 x 20 positions on a 3-pixel (0.366 A) grid starting at pixel 20 of the supercell,
so every position is a whole number of reconstruction pixels from abTEM's origin.

Truth: abTEM's per-slice projected potentials (V A), band-limited to the reconstruction
grid (Fourier crop 384 -> 192), summed over the slices of each reconstruction slice, times
the interaction constant sigma (rad / (V A)): the phase of each reconstruction slice on the
192 x 192 periodic supercell grid (pixel (i, j) centred at (i, j) * 0.122 A).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

A = 3.905  # PbTiO3 cubic lattice constant, angstrom
CELLS = 6  # supercell: CELLS x CELLS unit cells laterally
GPTS = 384  # abTEM's grid over the supercell
BIN = 3  # detector binning
N = 64  # detector pixels after binning
ENERGY = 200e3
SEMIANGLE_MRAD = 20.0
DEFOCUS_A = 50.0  # abTEM's defocus (= -C10), positive = underfocus, as daskptycho's probe_defocus_m
SCAN = 20
STEP_PX = 3
START_PX = 20
DOSE = 1e5  # electrons per square angstrom

CASES = {
    "thin": dict(cells_z=3, recon_slices=1),  # 1.17 nm
    "thick": dict(cells_z=20, recon_slices=20),  # 7.81 nm, one unit cell per reconstruction slice
}


def crystal(cells_z):
    from ase import Atoms

    cell = Atoms("PbTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[A, A, A], pbc=True)
    return cell * (CELLS, CELLS, cells_z)


def main(argv):
    name, out = argv[0], argv[1]
    seed = int(argv[2]) if len(argv) > 2 else 0
    case = CASES[name]
    import abtem
    from abtem.core.energy import energy2sigma, energy2wavelength

    abtem.config.set({"device": "cpu", "fft": "numpy"})
    t0 = time.perf_counter()
    atoms = crystal(case["cells_z"])
    L = CELLS * A
    delta = L / GPTS
    dx = L / (N * BIN) * 1.0  # the reconstruction pixel: L / 192
    potential = abtem.Potential(atoms, gpts=GPTS, slice_thickness=A / 2, parametrization="lobato", projection="infinite")
    pot = np.asarray(potential.build(lazy=False).array)  # (abTEM slices, GPTS, GPTS), V A; axes (x, y) = our (row, col)
    n_ab = pot.shape[0]
    s = case["recon_slices"]
    if n_ab % s:
        raise SystemExit(f"{n_ab} abTEM slices do not group into {s}")
    sigma = energy2sigma(ENERGY)
    # band-limit each slice to the reconstruction grid: keep the centred (N BIN)^2 frequencies
    m = N * BIN
    f = np.fft.fftshift(np.fft.fft2(pot), axes=(-2, -1))
    c = GPTS // 2
    f = f[:, c - m // 2:c + m // 2, c - m // 2:c + m // 2]
    low = np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))).real * (m * m) / (GPTS * GPTS)
    phase = sigma * low.reshape(s, n_ab // s, m, m).sum(axis=1)  # (recon slices, 192, 192), rad

    probe = abtem.Probe(semiangle_cutoff=SEMIANGLE_MRAD, energy=ENERGY, defocus=DEFOCUS_A, extent=L, gpts=GPTS)
    idx = START_PX + STEP_PX * np.arange(SCAN)
    pos_px = np.stack(np.meshgrid(idx, idx, indexing="ij"), -1).reshape(-1, 2)
    pos_a = pos_px * dx
    incident = float((np.abs(np.asarray(probe.build(scan=abtem.CustomScan(pos_a[:1]), lazy=False).array)) ** 2).sum())
    intensity = np.empty((len(pos_a), N, N), np.float64)
    lo = c - BIN * (N // 2) - BIN // 2  # bin N//2 centred on the zero frequency (index c of the shifted pattern)
    batch = 40
    for b in range(0, len(pos_a), batch):
        w = probe.multislice(potential, scan=abtem.CustomScan(pos_a[b:b + batch]), lazy=False)
        psi = np.asarray(w.array).reshape(-1, GPTS, GPTS)
        far = np.abs(np.fft.fftshift(np.fft.fft2(psi), axes=(-2, -1))) ** 2 / (GPTS * GPTS)
        crop = far[:, lo:lo + m, lo:lo + m]
        intensity[b:b + batch] = crop.reshape(-1, N, BIN, N, BIN).sum(axis=(2, 4))
        print(f"{name}: positions {b + len(psi)}/{len(pos_a)}, {time.perf_counter() - t0:.0f} s", flush=True)
    counts_per_pattern = DOSE * (STEP_PX * dx) ** 2
    expected = intensity * (counts_per_pattern / incident)
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(expected).astype(np.float32)
    meta = dict(case=name, cells_z=case["cells_z"], thickness_A=case["cells_z"] * A, recon_slices=s,
                recon_slice_thickness_A=case["cells_z"] * A / s, abtem_slices=n_ab, abtem_slice_thickness_A=A / 2,
                supercell_A=L, cells=CELLS, gpts=GPTS, abtem_sampling_A=delta, detector_bin=BIN, detector_px=N,
                pixel_size_A=dx, energy_eV=ENERGY, wavelength_A=float(energy2wavelength(ENERGY)), sigma_rad_per_VA=float(sigma),
                semiangle_mrad=SEMIANGLE_MRAD, defocus_A=DEFOCUS_A, scan=[SCAN, SCAN], step_px=STEP_PX, start_px=START_PX,
                dose_e_per_A2=DOSE, counts_per_pattern=counts_per_pattern, seed=seed,
                captured_fraction=float(intensity.sum() / (incident * len(pos_a))),
                abtem=abtem.__version__, parametrization="lobato", projection="infinite", soft_aperture=True,
                seconds=time.perf_counter() - t0)
    np.savez_compressed(out, intensity=noisy, expected=expected.astype(np.float32), position_px=pos_px,
                        truth_phase=phase.astype(np.float32), meta=np.array(json.dumps(meta)))
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
