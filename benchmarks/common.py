"""Helpers shared by the benchmarks: machine description and atomic JSON output."""

from __future__ import annotations

import json
import os
import platform
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine():
    import dask
    import distributed
    import numpy
    import psutil
    import scipy
    import xarray
    import zarr

    import daskptycho

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {**{m.__name__: m.__version__ for m in (daskptycho, dask, distributed, numpy, scipy, xarray, zarr)}, **_optional_versions()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _optional_versions():
    out = {}
    for name in ("pyfftw", "torch", "ptychi", "cupy"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken optional packages are simply not listed
            pass
    return out


def write(name, payload):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=1, default=str)
    os.replace(tmp, path)
    return path
