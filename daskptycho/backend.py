"""Array-module dispatch: NumPy on the CPU, CuPy on the GPU; the FFTs of the hot path.

Physics functions look the array module up from their inputs with
:func:`get_array_module`, so the same code runs on either. CuPy is never imported at
module import time.

FFTs (:func:`fft2`, :func:`ifft2`) go to the fastest library available, chosen by the
configuration key ``daskptycho.fft.backend``:

``auto`` (default)
    pyFFTW (optional extra ``fast``) when it imports, else ``scipy.fft``.
``pyfftw``, ``scipy``, ``numpy``
    That library (``pyfftw`` falls back to ``scipy`` with a warning when it is missing).

CuPy arrays always use ``cupy.fft`` (its own plan cache). With pyFFTW, one FFTW plan
per (shape, dtype, direction, in-place, threads) is made once per thread (planned with
``FFTW_MEASURE`` and a machine-wide wisdom file, see ``daskptycho.fft.planner``, on scratch buffers, so the caller's data is never overwritten) and
re-executed on the caller's arrays, which are SIMD-aligned when this module allocates
them.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings

import numpy as np
import scipy.fft

from . import config
from .errors import DeviceError, OptionsError

FFT_BACKENDS = ("auto", "pyfftw", "scipy", "numpy")


def get_array_module(*arrays):
    """Return ``cupy`` if any input is a CuPy array, else ``numpy``."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


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


def gpu_available() -> bool:
    """True when CuPy imports and finds a usable CUDA device (False without CuPy, a
    driver or a device; never raises)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # CuPy present but no CUDA driver/runtime
        return False


def is_gpu(xp) -> bool:
    return xp.__name__ == "cupy"


_pyfftw = None  # the module once imported; False when it is missing


def _import_pyfftw():
    global _pyfftw
    if _pyfftw is None:
        try:
            import pyfftw

            _pyfftw = pyfftw
        except ImportError:
            _pyfftw = False
    return _pyfftw


def _fft_setting(key, default):
    """``daskptycho.fft.<key>``: read straight from dask's config dict (called per FFT,
    where ``dask.config.get`` would cost more than a small transform), falling back to
    :func:`config.get` for anything unusual."""
    import dask.config

    try:
        return dask.config.config["daskptycho"]["fft"][key]
    except (KeyError, TypeError):
        return config.get(f"fft.{key}", default)


def fft_backend() -> str:
    """The CPU FFT library in use: ``"pyfftw"``, ``"scipy"`` or ``"numpy"``.

    Raises
    ------
    OptionsError
        ``daskptycho.fft.backend`` is not one of ``auto|pyfftw|scipy|numpy``.
    """
    name = _fft_setting("backend", "auto") or "auto"
    if name not in FFT_BACKENDS:

        raise OptionsError("fft.backend", f"is {name!r}; use one of {', '.join(FFT_BACKENDS)} (daskptycho.yaml or DASK_DASKPTYCHO__FFT__BACKEND)")
    if name in ("auto", "pyfftw"):
        if _import_pyfftw():
            return "pyfftw"
        if name == "pyfftw":
            warnings.warn("daskptycho.fft.backend is 'pyfftw' but pyFFTW is not installed "
                          "(pip install 'daskptycho[fast]'); using scipy.fft", RuntimeWarning, stacklevel=3)
        return "scipy"
    return name


_in_worker = threading.local()


def _inside_dask_worker() -> bool:
    flag = getattr(_in_worker, "flag", None)
    if flag is None:  # a thread stays a worker thread or not: look it up once
        try:
            from distributed import get_worker

            get_worker()
            flag = True
        except (ImportError, ValueError):
            flag = False
        _in_worker.flag = flag
    return flag


_THREADED_ELEMENTS = 2**20  # outside a worker, transforms of fewer elements run on one thread


def fft_threads(size=None) -> int:
    """Threads of one CPU FFT of ``size`` elements: ``daskptycho.fft.workers`` when it
    is positive; with ``-1`` (default) 1 inside a Dask worker task (each worker thread
    runs one task and the cluster already has a thread per core), and elsewhere every
    core of this process for transforms of at least 2^20 elements, one thread for
    smaller ones (thread start-up and sharing the cores with other processes cost more
    than they save there: measured 5-10x slower on a busy 2-core machine)."""
    n = int(_fft_setting("workers", -1) or -1)
    if n > 0:
        return n
    if _inside_dask_worker() or (size is not None and size < _THREADED_ELEMENTS):
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_MAX_PLANS = 16  # per thread; engines use a few shapes (full and last chunk, both directions)
_local = threading.local()  # FFTW plans are not safe to execute from two threads at once


def _plan(shape, dtype, forward, inplace, threads):
    pyfftw = _pyfftw
    plans = getattr(_local, "plans", None)
    if plans is None:
        plans = _local.plans = collections.OrderedDict()
    key = (shape, dtype.str, forward, inplace, threads, planner_flag())
    plan = plans.get(key)
    if plan is not None:
        plans.move_to_end(key)
        return plan
    a = pyfftw.empty_aligned(shape, dtype=dtype)
    b = a if inplace else pyfftw.empty_aligned(shape, dtype=dtype)
    direction = "FFTW_FORWARD" if forward else "FFTW_BACKWARD"
    flag = key[-1]
    if flag == "FFTW_ESTIMATE":
        plan = pyfftw.FFTW(a, b, axes=(-2, -1), direction=direction, threads=threads, flags=(flag,))
    else:
        plan = _plan_with_shared_wisdom(pyfftw, a, b, direction, threads, flag)
    plans[key] = plan
    if len(plans) > _MAX_PLANS:
        plans.popitem(last=False)
    return plan


_PLANNERS = {"estimate": "FFTW_ESTIMATE", "measure": "FFTW_MEASURE", "patient": "FFTW_PATIENT"}
wisdom_lock = threading.Lock()  # held while FFTW plans: its planner is not thread-safe
_wisdom_loaded = [None]  # the wisdom file this process has imported


def planner_flag():
    """FFTW planner from ``daskptycho.fft.planner`` (default ``measure``).

    ``measure`` times candidate algorithms once per transform shape and records the
    winner in a wisdom file shared by every process on the machine
    (``daskptycho.fft.wisdom``): the first process to need a shape measures it under
    a file lock, every other process (other workers, a restarted worker, a resumed
    run) reuses that plan, so all of them compute bit-identical transforms.
    ``estimate`` uses FFTW's fixed heuristics: deterministic without a file, but
    measured 3-5x slower for batches of 256 and 512 px patterns (no slower at 64-128
    px). ``patient`` measures harder (slow planning).
    """
    name = str(_fft_setting("planner", "measure") or "measure").lower()
    if name not in _PLANNERS:

        raise OptionsError("fft.planner", f"got {name!r}; expected one of {', '.join(_PLANNERS)}")
    return _PLANNERS[name]


def _wisdom_path():
    path = _fft_setting("wisdom", None)
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "daskptycho", f"fftw-wisdom-{os.uname().nodename}.json")
    return os.path.expanduser(str(path))


def _read_wisdom(pyfftw, path):
    """Import the wisdom file (JSON of base64 strings: data, never code)."""
    import base64
    import json

    try:
        with open(path) as f:
            text = json.load(f)
        pyfftw.import_wisdom(tuple(base64.b64decode(w) for w in text["wisdom"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no file yet, or an unreadable one: plan afresh and rewrite it


def _write_wisdom(pyfftw, path):
    import base64
    import json
    import uuid

    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump({"wisdom": [base64.b64encode(w).decode() for w in pyfftw.export_wisdom()]}, f)
    os.replace(tmp, path)


def _plan_with_shared_wisdom(pyfftw, a, b, direction, threads, flag):
    """A measured plan that every process on this machine shares (see :func:`planner_flag`)."""
    import fcntl

    path = _wisdom_path()

    def from_wisdom():
        try:
            return pyfftw.FFTW(a, b, axes=(-2, -1), direction=direction, threads=threads, flags=(flag, "FFTW_WISDOM_ONLY"))
        except RuntimeError:  # pyFFTW: no wisdom for this transform
            return None

    with wisdom_lock:
        if _wisdom_loaded[0] != path:
            _read_wisdom(pyfftw, path)
            _wisdom_loaded[0] = path
        plan = from_wisdom()
        if plan is not None:
            return plan
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = open(path + ".lock", "a")
        except OSError:  # nowhere to share wisdom: measure for this process alone
            return pyfftw.FFTW(a, b, axes=(-2, -1), direction=direction, threads=threads, flags=(flag,))
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process measures a shape; the others wait, then reuse it
            _read_wisdom(pyfftw, path)
            plan = from_wisdom()
            if plan is None:
                plan = pyfftw.FFTW(a, b, axes=(-2, -1), direction=direction, threads=threads, flags=(flag,))
                try:
                    _write_wisdom(pyfftw, path)
                except OSError:
                    pass
        return plan


def fftw_plan(shape, dtype, forward, inplace=True, threads=1):
    """The cached pyFFTW plan of a 2-D transform over the last two axes of ``shape``.

    Planned as every FFT of :func:`fft2` / :func:`ifft2` is (through the machine-wide
    wisdom, see :func:`planner_flag`), so a caller that makes its own FFTW plans from
    that wisdom gets the same algorithm. Needs pyFFTW (:func:`fft_backend` is
    ``"pyfftw"``).
    """
    return _plan(tuple(shape), np.dtype(dtype), forward, inplace, threads)


def simd_alignment():
    """pyFFTW's SIMD alignment in bytes (what :func:`empty` aligns to), or None without pyFFTW."""
    return _pyfftw.simd_alignment if _import_pyfftw() else None


def _aligned(a):
    # __array_interface__ rather than .ctypes: no ctypes object per FFT call
    return a.__array_interface__["data"][0] % _pyfftw.simd_alignment == 0


def empty(shape, dtype=np.complex64, xp=np):
    """An uninitialised array, SIMD-aligned on the CPU when pyFFTW is used (so FFTs of it need no copy)."""
    if xp is np and _import_pyfftw():
        return _pyfftw.empty_aligned(shape, dtype=dtype)
    return xp.empty(shape, dtype=dtype)


def _fftw(a, forward, out, ortho):
    if out is not None and out is not a and not (_aligned(out) and out.flags.c_contiguous):
        out[...] = _fftw(a, forward, None, ortho)
        return out
    if out is a and not _aligned(a):
        a[...] = _fftw(a.copy(), forward, None, ortho)
        return a
    plan = _plan(a.shape, a.dtype, forward, out is a, fft_threads(a.size))
    if out is None:
        out = _pyfftw.empty_aligned(a.shape, dtype=a.dtype)
    if not _aligned(a):
        a = _pyfftw.byte_align(a)
    plan.update_arrays(a, out)
    plan.execute()
    if ortho:  # both directions scaled by 1/sqrt(ny nx)
        out *= out.real.dtype.type(1.0 / np.sqrt(a.shape[-1] * a.shape[-2]))
    return out


# scipy/numpy ``norm`` giving no scaling in each direction
_UNSCALED = {True: "backward", False: "forward"}


_allocator_tuned = False


def tune_allocator(mmap_threshold_mib=1, trim_threshold_mib=2):
    """Let glibc serve the hot path's temporaries (0.1 to 32 MiB) from its heap.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory
    back to the OS), which also pins glibc's mmap threshold at 128 KiB: every
    chunk-sized temporary of a gradient call is then a fresh mapping whose pages are
    faulted in and zeroed again, measured 2-3x slower gradient calls in a worker than
    in a plain process. Raising the mmap threshold to ``mmap_threshold_mib`` and the trim
    threshold to ``trim_threshold_mib`` makes freed temporaries reusable; at most
    ``trim_threshold_mib`` of free heap stays with the process. Thresholds only rise:
    the compiled kernels ask for 1/2 MiB when they make their FFTW plans, the first
    batched backend FFT of at least 1 MiB (NumPy path, dm) for 32/64 MiB; a no-op where
    the C library has no ``mallopt`` (not glibc).

    The thresholds are small on purpose: FFTW allocates scratch inside some plans'
    execute (about one transform's size, 128 KiB at 128 px), which at Dask's 128 KiB
    mmap threshold was a fresh mapping per FFT (the compiled per-position model ran at
    1.8x its in-process time in a worker); 1 MiB keeps that scratch on the heap, while
    arrays above it are still mapped and returned when freed. Larger values (32/64 MiB,
    which the batched paths need) keep up to 64 MiB of freed heap resident: a gd worker
    holding a 22 MB tile peaked at 83 MB above its baseline with them, 41 MB without.
    """
    global _allocator_tuned
    if _allocator_tuned and _allocator_tuned[0] >= mmap_threshold_mib:
        return
    _allocator_tuned = (mmap_threshold_mib, trim_threshold_mib)
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    mallopt(m_mmap_threshold, int(mmap_threshold_mib * 2**20))
    mallopt(m_trim_threshold, int(trim_threshold_mib * 2**20))


def _transform(a, forward, xp, out, norm):
    if norm not in ("ortho", "none"):
        raise ValueError(f"norm must be 'ortho' or 'none', got {norm!r}")
    if a.nbytes >= 2**20 and (not _allocator_tuned or _allocator_tuned[0] < 32):
        # batched transforms (the NumPy path, dm): their chunk-sized temporaries are the
        # reason for tuning; 32/64 MiB measured 2-3x faster than Dask's defaults in a worker
        tune_allocator(32, 64)
    xp = xp or get_array_module(a)
    np_norm = "ortho" if norm == "ortho" else _UNSCALED[forward]
    if is_gpu(xp):
        f = xp.fft.fft2 if forward else xp.fft.ifft2
        res = f(a, norm=np_norm)
        if out is None:
            return res
        out[...] = res
        return out
    backend = fft_backend()
    if backend == "pyfftw" and a.ndim >= 2 and a.dtype in (np.complex64, np.complex128) and a.flags.c_contiguous \
            and a.shape[-1] > 1 and a.shape[-2] > 1:
        return _fftw(a, forward, out, norm == "ortho")
    if backend == "numpy":
        res = (np.fft.fft2 if forward else np.fft.ifft2)(a, norm=np_norm)
    else:
        f = scipy.fft.fft2 if forward else scipy.fft.ifft2
        res = f(a, norm=np_norm, workers=fft_threads(a.size), overwrite_x=out is a)
    if np.iscomplexobj(a) and res.dtype != a.dtype:
        res = res.astype(a.dtype)  # numpy.fft computes in complex128
    if out is None:
        return res
    out[...] = res
    return out


def fft2(a, xp=None, out=None, norm="ortho"):
    """Orthonormal 2-D FFT over the last two axes.

    Parameters
    ----------
    a : complex array (..., ny, nx)
        complex64 in, complex64 out (no promotion).
    xp : array module, optional
    out : array like ``a``, optional
        Where to write the result; ``out=a`` transforms in place (no new array).
    norm : {"ortho", "none"}
        ``"none"``: no scaling in either direction (``ifft2(fft2(a))`` is ``ny nx a``),
        for callers that fold the factor into a multiplication they do anyway.

    Returns
    -------
    array like ``a``, FFT order.
    """
    return _transform(a, True, xp, out, norm)


def ifft2(a, xp=None, out=None, norm="ortho"):
    """Orthonormal inverse 2-D FFT over the last two axes; the adjoint of :func:`fft2` (same parameters)."""
    return _transform(a, False, xp, out, norm)


def scatter_add(target, flat_index, values):
    """Add ``values`` into the flattened last axes of ``target`` at ``flat_index``.

    Repeated indices accumulate (unlike ``target[idx] += v``).

    Parameters
    ----------
    target : array, shape (..., M)
        Modified in place.
    flat_index : int array, shape (K,)
        Indices into the last axis of ``target``.
    values : array, shape (..., K)
        Same leading shape as ``target``.
    """
    xp = get_array_module(target, values)
    lead = target.shape[:-1]
    m = target.shape[-1]
    if is_gpu(xp):
        import cupyx

        if target.dtype.kind == "c":
            # CuPy adds at real dtypes only: a complex array is its (re, im) float pairs
            if not target.flags.c_contiguous:
                raise ValueError("scatter_add needs a C-contiguous complex target on the GPU")
            flat_index = xp.stack([2 * flat_index, 2 * flat_index + 1], axis=-1).reshape(-1)
            real = target.real.dtype
            for i in np.ndindex(*lead):
                v = xp.ascontiguousarray(values[i]).astype(target.dtype, copy=False).view(real)
                cupyx.scatter_add(target[i].view(real), flat_index, v)
            return target
        for i in np.ndindex(*lead):
            cupyx.scatter_add(target[i], flat_index, values[i])
        return target
    for i in np.ndindex(*lead):
        v = values[i]
        if np.iscomplexobj(target):
            target[i].real += np.bincount(flat_index, weights=v.real, minlength=m).astype(target.real.dtype)
            target[i].imag += np.bincount(flat_index, weights=v.imag, minlength=m).astype(target.real.dtype)
        else:
            target[i] += np.bincount(flat_index, weights=v, minlength=m).astype(target.dtype)
    return target


def to_numpy(a):
    """Copy an array to host memory as NumPy (no-op for NumPy input)."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def to_host(value):
    """``value`` with every CuPy array in it (in dicts, lists and tuples too) copied to
    host memory as NumPy; everything else as it is. What a task returns to the client:
    device arrays never leave their worker implicitly."""
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    if type(value).__module__.startswith("cupy"):
        return value.get()
    return value


def gpu_pool_bytes():
    """Bytes CuPy's default memory pool holds on this process's device (the pool keeps
    what it once allocated, so this is the high-water mark of device arrays); 0 when
    CuPy was never imported here."""
    import sys

    cupy = sys.modules.get("cupy")
    if cupy is None:
        return 0
    try:
        return int(cupy.get_default_memory_pool().total_bytes())
    except Exception:  # no device
        return 0
