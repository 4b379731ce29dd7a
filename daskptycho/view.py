"""PNG pictures of results: phase and amplitude per slice, probe modes, cost curve."""

from __future__ import annotations

import os

import numpy as np


def _save(fig, path):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)  # never leave a half-written picture


def write_pngs(result, out_dir, truth=None, position=None):
    """Write PNGs of a result dataset into ``out_dir``; return the list of paths.

    Parameters
    ----------
    result : xarray.Dataset from :func:`daskptycho.reconstruct`
    truth : xarray.DataArray (slice, y, x), optional; adds a comparison picture
    position : array (J, 2), optional; outlines the scanned field
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    obj = result["object"].load()
    y = obj["y"].values * 1e9
    x = obj["x"].values * 1e9
    extent = (x[0], x[-1], y[-1], y[0])
    paths = []
    n = obj.sizes["slice"]
    for kind, fn in (("phase", np.angle), ("amplitude", np.abs)):
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.8, 3.4), squeeze=False, layout="constrained")
        for s in range(n):
            ax = axes[0, s]
            im = ax.imshow(fn(obj.values[s]), extent=extent, cmap="gray")
            ax.set_title(f"{kind}, slice {s}")
            ax.set_xlabel("x (nm)")
            if s == 0:
                ax.set_ylabel("y (nm)")
            fig.colorbar(im, ax=ax, fraction=0.046, label="rad" if kind == "phase" else "")
        p = os.path.join(out_dir, f"object_{kind}.png")
        _save(fig, p)
        plt.close(fig)
        paths.append(p)

    probe = result["probe"].values
    fr = result["probe_power_fraction"].values if "probe_power_fraction" in result else np.ones(probe.shape[0]) / probe.shape[0]
    k = probe.shape[0]
    fig, axes = plt.subplots(2, k, figsize=(3 * k, 6), squeeze=False)
    for m in range(k):
        axes[0, m].imshow(np.abs(probe[m]), cmap="magma")
        axes[0, m].set_title(f"mode {m}: {100 * fr[m]:.1f}% power")
        axes[1, m].imshow(np.angle(probe[m]), cmap="twilight")
        axes[1, m].set_title("phase")
        for a in axes[:, m]:
            a.set_xticks([])
            a.set_yticks([])
    p = os.path.join(out_dir, "probe_modes.png")
    _save(fig, p)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(result["iteration"].values, result["cost"].values, "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"cost ({result['cost'].attrs.get('long_name', '')})")
    ax.grid(True, which="both", alpha=0.3)
    p = os.path.join(out_dir, "cost.png")
    _save(fig, p)
    plt.close(fig)
    paths.append(p)

    if truth is not None:
        from .metrics import projected_phase, scanned_region

        t = truth.load()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
        for ax, data, title in ((axes[0], projected_phase(t), "truth"), (axes[1], projected_phase(obj), "reconstruction")):
            im = ax.imshow(data.values, extent=(data.x[0] * 1e9, data.x[-1] * 1e9, data.y[-1] * 1e9, data.y[0] * 1e9), cmap="gray")
            ax.set_title(f"projected phase, {title}")
            ax.set_xlabel("x (nm)")
            fig.colorbar(im, ax=ax, fraction=0.046, label="rad")
            if position is not None:
                y0, y1, x0, x1 = (v * 1e9 for v in scanned_region(position))
                ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], "c--", lw=0.8)
        p = os.path.join(out_dir, "truth_comparison.png")
        _save(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths
