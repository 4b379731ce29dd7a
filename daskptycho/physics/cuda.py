"""The GPU hot path: custom CUDA kernels (CuPy) and the NumPy reference of each.

On a GPU the multislice model and the difference map are memory-bound: each pass over a
batch of waves (J, K, N_y, N_x) costs as much as a third of an FFT of it. CuPy's generic
operations make a pass (and often a temporary) per arithmetic step and its fancy-index
``scatter_add`` takes no complex numbers, so the hot path here is a few custom kernels,
each one pass over the waves that reads the object windows in place:

:func:`window_multiply`
    ``out[j, k] = psi[j, k] * O[window j]``: the transmission through one slice.
:func:`cost_gradient`
    The amplitude or Poisson cost of the far-field waves (a per-pixel map, summed on the
    device) and ``2 dL/dPsi*`` written over the waves.
:func:`adjoint_slice`
    The adjoint of one slice: ``sum_k conj(psi) g`` and ``sum_k |psi|^2`` added into the
    object-sized accumulators with float atomics (the real and imaginary parts as a pair
    of floats: CUDA has no complex atomics), and ``g *= conj(O[window])``.
:func:`window_abs2_sum`
    ``sum_j |O[window j]|^2`` (N_y, N_x): the probe's preconditioner.
:func:`scatter_windows`, :func:`gather_windows`
    Add values into windows of an object (any float or complex target, float64 included),
    and cut the windows out.
:func:`dm_views_in`, :func:`dm_fourier`, :func:`dm_views_out`, :func:`dm_probe_sums`
    The difference map's view update (eq. 3), its Fourier projection (eq. 4) with the
    Fourier error, the object sums (eq. 6) and the probe sums (eq. 5), fused likewise.

Each function takes NumPy or CuPy arrays: on CuPy arrays it launches its kernel, on NumPy
arrays it runs the reference (plain vectorised NumPy, written for clarity, not speed), so
the CPU tests check the algorithm around the kernels and the GPU tests check each kernel
against its reference. :func:`gradients` is the whole multislice cost and gradient of a
batch on the device: the patterns stay in device memory (picked by row on the device),
FFTs run in place through cuFFT's cached plans, and nothing returns to the host: the cost
is a device scalar.

Window corners are int32 arrays (J, 2) of (row, column) on the device. The kernels are
compiled by NVRTC on first use (once per process, cached on disk by CuPy).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ..backend import fft2, get_array_module, ifft2, is_gpu
from .propagation import split_propagators
from .wave_checkpoints import effective_interval, gradient_working_set, segments

__all__ = ["window_multiply", "cost_gradient", "adjoint_slice", "window_abs2_sum", "scatter_windows", "gather_windows",
           "dm_views_in", "dm_fourier", "dm_views_out", "dm_probe_sums", "gradients", "positions_per_launch",
           "device_corners", "cached_corners", "memory_fraction", "free_device_bytes", "fft_unscaled",
           "launch_budget"]

_TINY = 1e-30
_THREADS = 256

SOURCE = r"""
typedef long long i64;
#define LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

__device__ __forceinline__ float2 cmul(float2 a, float2 b) { return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x); }
__device__ __forceinline__ float2 cmulconj(float2 a, float2 b) { /* a * conj(b) */ return make_float2(a.x * b.x + a.y * b.y, a.y * b.x - a.x * b.y); }

// item i of a (J, nn) launch: its position j, its pixel p in the window, and the object pixel under it
__device__ __forceinline__ i64 window_pixel(const i64 i, const i64 nn, const int nx, const int W, const int* __restrict__ corners,
                                            i64& j, i64& p) {
    j = i / nn;
    p = i - j * nn;
    const int y = (int)(p / nx), x = (int)(p - (i64)y * nx);
    return (i64)(corners[2 * j] + y) * W + corners[2 * j + 1] + x;
}

// target[l, window j] += values[l, j] over real units: a complex array is its (re, im) pairs (m = 2)
template <typename T>
__device__ void scatter_windows(T* __restrict__ target, const float* __restrict__ values, const int* __restrict__ corners,
                                const int L, const int J, const int ny, const int nxr, const i64 H, const i64 Wr, const int m) {
    const i64 nn = (i64)ny * nxr, per_l = (i64)J * nn;
    LOOP(i, (i64)L * per_l) {
        const i64 l = i / per_l, r = i - l * per_l, j = r / nn, p = r - j * nn;
        const int y = (int)(p / nxr), x = (int)(p - (i64)y * nxr);
        atomicAdd(target + l * H * Wr + (i64)(corners[2 * j] + y) * Wr + (i64)m * corners[2 * j + 1] + x, (T)values[i]);
    }
}

extern "C" {

// out[j, k, p] = psi[j, k, p] * obj[window j at p]; psi's j stride is 0 for the probe itself
__global__ void window_multiply(const float2* __restrict__ psi, const i64 psi_stride_j, const float2* __restrict__ obj,
                                const int* __restrict__ corners, float2* __restrict__ out,
                                const int J, const int K, const int ny, const int nx, const int W) {
    const i64 nn = (i64)ny * nx;
    LOOP(i, (i64)J * nn) {
        i64 j, p;
        const float2 o = obj[window_pixel(i, nn, nx, W, corners, j, p)];
        for (int k = 0; k < K; ++k)
            out[(j * K + k) * nn + p] = cmul(psi[j * psi_stride_j + k * nn + p], o);
    }
}

// cost map and 2 dL/dPsi* over far (unnormalised FFT: the model intensity is s2 * |far|^2)
__global__ void cost_gradient(float2* __restrict__ far, const float* __restrict__ intensity, const int* __restrict__ rows,
                              const unsigned char* __restrict__ mask, float* __restrict__ cost_map,
                              const int J, const int K, const i64 nn, const float s2, const float two_s2, const int poisson) {
    LOOP(i, (i64)J * nn) {
        const i64 j = i / nn, p = i - j * nn;
        const i64 r = rows ? (i64)rows[j] : j;
        const float meas = intensity[r * nn + p];
        float model = 0.f;
        for (int k = 0; k < K; ++k) { const float2 f = far[(j * K + k) * nn + p]; model += f.x * f.x + f.y * f.y; }
        model *= s2;
        float c, w;
        if (poisson) {
            const float den = model + 1e-30f;
            c = model - meas * logf(den);
            w = 1.f - meas / den;
        } else {
            const float amp = sqrtf(model), res = amp - sqrtf(meas);
            c = res * res;
            w = amp > 0.f ? res / fmaxf(amp, 1e-30f) : 0.f;
        }
        if (mask && !mask[p]) { c = 0.f; w = 0.f; }
        cost_map[i] = c;
        w *= two_s2;
        for (int k = 0; k < K; ++k) { float2* f = far + (j * K + k) * nn + p; f->x *= w; f->y *= w; }
    }
}

// adjoint of one slice: accumulate sum_k conj(psi) g and sum_k |psi|^2 on the windows, then g *= conj(O)
__global__ void adjoint_slice(float2* __restrict__ g, const float2* __restrict__ psi, const i64 psi_stride_j,
                              const float2* __restrict__ obj, const int* __restrict__ corners,
                              float* __restrict__ g_obj, float* __restrict__ illum,
                              const int J, const int K, const int ny, const int nx, const int W) {
    const i64 nn = (i64)ny * nx;
    LOOP(i, (i64)J * nn) {
        i64 j, p;
        const i64 q = window_pixel(i, nn, nx, W, corners, j, p);
        const float2 o = obj[q];
        float gr = 0.f, gi = 0.f, il = 0.f;
        for (int k = 0; k < K; ++k) {
            const float2 a = psi[j * psi_stride_j + k * nn + p];
            float2* b = g + (j * K + k) * nn + p;
            const float2 bv = *b;
            gr += a.x * bv.x + a.y * bv.y;
            gi += a.x * bv.y - a.y * bv.x;
            il += a.x * a.x + a.y * a.y;
            *b = cmulconj(bv, o);
        }
        atomicAdd(g_obj + 2 * q, gr);
        atomicAdd(g_obj + 2 * q + 1, gi);
        atomicAdd(illum + q, il);
    }
}

// out[p] += sum_j |obj[window j at p]|^2; blockIdx.y takes every gridDim.y-th position
__global__ void window_abs2_sum(const float2* __restrict__ obj, const int* __restrict__ corners, float* __restrict__ out,
                                const int J, const int ny, const int nx, const int W) {
    const i64 nn = (i64)ny * nx;
    LOOP(p, nn) {
        const int y = (int)(p / nx), x = (int)(p - (i64)y * nx);
        float acc = 0.f;
        for (int j = blockIdx.y; j < J; j += gridDim.y) {
            const float2 o = obj[(i64)(corners[2 * j] + y) * W + corners[2 * j + 1] + x];
            acc += o.x * o.x + o.y * o.y;
        }
        atomicAdd(out + p, acc);
    }
}

// out[l, j, p] = obj[l, window j at p]
__global__ void gather_windows(const float2* __restrict__ obj, const int* __restrict__ corners, float2* __restrict__ out,
                               const int L, const int J, const int ny, const int nx, const i64 H, const int W) {
    const i64 nn = (i64)ny * nx, per_l = (i64)J * nn;
    LOOP(i, (i64)L * per_l) {
        const i64 l = i / per_l, r = i - l * per_l, j = r / nn, p = r - j * nn;
        const int y = (int)(p / nx), x = (int)(p - (i64)y * nx);
        out[i] = obj[l * H * W + (i64)(corners[2 * j] + y) * W + corners[2 * j + 1] + x];
    }
}

__global__ void scatter_windows_f(float* target, const float* values, const int* corners, const int L, const int J,
                                  const int ny, const int nxr, const i64 H, const i64 Wr, const int m) {
    scatter_windows<float>(target, values, corners, L, J, ny, nxr, H, Wr, m);
}

__global__ void scatter_windows_d(double* target, const float* values, const int* corners, const int L, const int J,
                                  const int ny, const int nxr, const i64 H, const i64 Wr, const int m) {
    scatter_windows<double>(target, values, corners, L, J, ny, nxr, H, Wr, m);
}

// difference map, eq. 3 input: out[j, k, l] = P_k O_l (twice = 0) or 2 P_k O_l - psi[j, k, l] (twice = 1)
__global__ void dm_views_in(const float2* __restrict__ psi, const float2* __restrict__ probe, const float2* __restrict__ obj,
                            const int* __restrict__ corners, float2* __restrict__ out, const int twice,
                            const int J, const int K, const int L, const int ny, const int nx, const i64 H, const int W) {
    const i64 nn = (i64)ny * nx;
    LOOP(i, (i64)J * nn) {
        i64 j, p;
        const i64 q = window_pixel(i, nn, nx, W, corners, j, p);
        for (int l = 0; l < L; ++l) {
            const float2 o = obj[l * H * W + q];
            for (int k = 0; k < K; ++k) {
                const i64 v = ((j * K + k) * L + l) * nn + p;
                const float2 po = cmul(probe[k * nn + p], o);
                out[v] = twice ? make_float2(2.f * po.x - psi[v].x, 2.f * po.y - psi[v].y) : po;
            }
        }
    }
}

// eq. 4 on far-field waves of an unnormalised FFT: each pixel's modes scaled to the measured
// modulus (times 1/nn, the inverse FFT's missing factor); with error, the error map instead
__global__ void dm_fourier(float2* __restrict__ far, const float* __restrict__ intensity, const unsigned char* __restrict__ mask,
                           float* __restrict__ error_map, const int J, const int KL, const i64 nn, const float inv_nn) {
    LOOP(i, (i64)J * nn) {
        const i64 j = i / nn, p = i - j * nn;
        float total = 0.f;
        for (int m = 0; m < KL; ++m) { const float2 f = far[(j * KL + m) * nn + p]; total += f.x * f.x + f.y * f.y; }
        total *= inv_nn;  // the orthonormal FFT's intensity
        const float meas = intensity[i];
        const bool lit = !mask || mask[p];
        if (error_map) {
            const float r = sqrtf(total) - sqrtf(meas);
            error_map[i] = lit ? r * r : 0.f;
        } else {
            const float s = (lit ? sqrtf(meas / fmaxf(total, 1e-30f)) : 1.f) * inv_nn;
            for (int m = 0; m < KL; ++m) { float2* f = far + (j * KL + m) * nn + p; f->x *= s; f->y *= s; }
        }
    }
}

// eq. 3 output: psi += beta (w - P O), in place, and the object sums of eq. 6 added (float64)
__global__ void dm_views_out(float2* __restrict__ psi, const float2* __restrict__ w, const float2* __restrict__ probe,
                             const float2* __restrict__ obj, const int* __restrict__ corners, const float beta,
                             double* __restrict__ num, double* __restrict__ den,
                             const int J, const int K, const int L, const int ny, const int nx, const i64 H, const int W) {
    const i64 nn = (i64)ny * nx;
    LOOP(i, (i64)J * nn) {
        i64 j, p;
        const i64 q = window_pixel(i, nn, nx, W, corners, j, p);
        float p2 = 0.f;
        for (int k = 0; k < K; ++k) { const float2 a = probe[k * nn + p]; p2 += a.x * a.x + a.y * a.y; }
        for (int l = 0; l < L; ++l) {
            const float2 o = obj[l * H * W + q];
            float sr = 0.f, si = 0.f;
            for (int k = 0; k < K; ++k) {
                const i64 v = ((j * K + k) * L + l) * nn + p;
                const float2 a = probe[k * nn + p], po = cmul(a, o), wv = w[v], old = psi[v];
                const float2 nv = make_float2(old.x + beta * (wv.x - po.x), old.y + beta * (wv.y - po.y));
                psi[v] = nv;
                sr += a.x * nv.x + a.y * nv.y;  // conj(P_k) psi
                si += a.x * nv.y - a.y * nv.x;
            }
            atomicAdd(num + 2 * (l * H * W + q), (double)sr);
            atomicAdd(num + 2 * (l * H * W + q) + 1, (double)si);
        }
        atomicAdd(den + q, (double)p2);
    }
}

// eq. 5 sums: num[k, p] += sum_j sum_l conj(O_l[window j]) psi[j, k, l, p], den[p] += sum_j sum_l |O_l|^2 (float64);
// blockIdx.y takes every gridDim.y-th position
__global__ void dm_probe_sums(const float2* __restrict__ psi, const float2* __restrict__ obj, const int* __restrict__ corners,
                              double* __restrict__ num, double* __restrict__ den,
                              const int J, const int K, const int L, const int ny, const int nx, const i64 H, const int W) {
    const i64 nn = (i64)ny * nx;
    LOOP(t, (i64)K * nn) {
        const int k = (int)(t / nn);
        const i64 p = t - (i64)k * nn;
        const int y = (int)(p / nx), x = (int)(p - (i64)y * nx);
        double sr = 0., si = 0., s2 = 0.;
        for (int j = blockIdx.y; j < J; j += gridDim.y) {
            const i64 q = (i64)(corners[2 * j] + y) * W + corners[2 * j + 1] + x;
            for (int l = 0; l < L; ++l) {
                const float2 o = obj[l * H * W + q], v = psi[((j * K + k) * L + l) * nn + p];
                sr += o.x * v.x + o.y * v.y;
                si += o.x * v.y - o.y * v.x;
                if (k == 0) s2 += o.x * o.x + o.y * o.y;
            }
        }
        atomicAdd(num + 2 * t, sr);
        atomicAdd(num + 2 * t + 1, si);
        if (k == 0) atomicAdd(den + p, s2);
    }
}

}
"""

_module = None
_module_lock = threading.Lock()


def _kernel(name):
    """The compiled kernel ``name`` (the module is compiled once per process)."""
    global _module
    if _module is None:
        with _module_lock:
            if _module is None:
                import cupy

                _module = cupy.RawModule(code=SOURCE, options=("-std=c++14",))
    return _module.get_function(name)


def _launch(name, n, args, split=1):
    """Launch kernel ``name`` over ``n`` items (grid-stride loops), ``split`` blocks along y."""
    blocks = max(1, min(int(math.ceil(n / _THREADS)), 65535 * 8))
    _kernel(name)((blocks, max(1, int(split))), (_THREADS,), args)


def _ptr(a):
    """A kernel's optional array argument: the array, or a null pointer for None."""
    return np.uint64(0) if a is None else a


def _c(a):
    """``a`` as a C-contiguous array (a no-op when it is one)."""
    return a if a.flags.c_contiguous else get_array_module(a).ascontiguousarray(a)


def _require_contiguous(**arrays):
    """The kernels index these arrays as C-contiguous and write some in place: refuse others."""
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (the kernels index it flat and write it in place)")


def _check_corners(corners, window, shape):
    if corners.ndim != 2 or corners.shape[1] != 2 or corners.dtype != np.int32:
        raise ValueError(f"corners must be an int32 array (J, 2), got {corners.dtype} {corners.shape}")
    if is_gpu(get_array_module(corners)) or corners.size == 0:
        return  # checked on the host when they were made (device_corners), not here: no synchronisation
    h, w = shape
    if corners.min() < 0 or (corners[:, 0] + window[0]).max() > h or (corners[:, 1] + window[1]).max() > w:
        raise ValueError("a probe window falls outside the object array")


def device_corners(corners, window, object_shape, xp):
    """Window corners (J, 2) as the int32 array the kernels take, in ``xp``'s memory,
    checked against the object's shape (here, on the host: the kernels do not check).

    Parameters
    ----------
    corners : int array (J, 2), host memory
    window : (N_y, N_x)
    object_shape : (H, W)
    xp : numpy or cupy
    """
    host = np.ascontiguousarray(corners, dtype=np.int32).reshape(-1, 2)
    _check_corners(host, window, object_shape)
    return xp.asarray(host)


_corner_cache = {}  # id(host corners) -> (weak reference to them, window, shape, device copy)
_corner_lock = threading.Lock()


def cached_corners(corners, window, object_shape, xp):
    """:func:`device_corners` of a host array that stays the same across calls (a tile's
    positions), uploaded once per process: later calls with the same array object take
    the device copy without a host-to-device copy."""
    import weakref

    key = id(corners)
    with _corner_lock:
        hit = _corner_cache.get(key)
        if hit is not None and hit[0]() is corners and hit[1] == tuple(window) and hit[2] == tuple(object_shape):
            return hit[3]
        dev = device_corners(corners, window, object_shape, xp)
        try:
            ref = weakref.ref(corners)
        except TypeError:  # not weakly referenceable: not cached
            return dev
        if len(_corner_cache) >= 64:
            _corner_cache.pop(next(iter(_corner_cache)))
        _corner_cache[key] = (ref, tuple(window), tuple(object_shape), dev)
        return dev


def _windows(obj2d, corners, window):
    """Reference: (J, N_y, N_x) windows of a 2-D array (fancy indexing)."""
    ny, nx = window
    rows = corners[:, 0, None, None] + np.arange(ny)[None, :, None]
    cols = corners[:, 1, None, None] + np.arange(nx)[None, None, :]
    return obj2d[rows, cols]


# --------------------------------------------------------------------------- multislice kernels
def window_multiply(psi, obj, corners, out):
    """``out[j, k] = psi[j, k] * obj[window j]``.

    Parameters
    ----------
    psi : complex64 (J, K, N_y, N_x), or (1, K, N_y, N_x): the same wave for every position
    obj : complex64 (H, W), one slice
    corners : int32 (J, 2)
    out : complex64 (J, K, N_y, N_x), written (may not be ``psi``)

    Returns
    -------
    ``out``
    """
    xp = get_array_module(obj)
    j, k, ny, nx = out.shape
    if not is_gpu(xp):
        out[...] = psi * _windows(obj, corners, (ny, nx))[:, None]
        return out
    _require_contiguous(out=out)
    psi, obj = _c(psi), _c(obj)
    stride = 0 if psi.shape[0] == 1 and j != 1 else k * ny * nx
    _launch("window_multiply", j * ny * nx, (psi, np.int64(stride), obj, corners, out, np.int32(j), np.int32(k),
                                             np.int32(ny), np.int32(nx), np.int32(obj.shape[-1])))
    return out


def cost_gradient(far, intensity, rows, mask, far_scale, poisson):
    """Cost of far-field waves and ``2 dL/dPsi*`` (times ``far_scale``) written over them.

    The arithmetic of :func:`daskptycho.physics.cost.cost_and_far_field_gradient` with
    ``overwrite=True``: ``Psi = far_scale * far`` (``far`` from an unnormalised FFT).

    Parameters
    ----------
    far : complex64 (J, K, N_y, N_x), FFT order; overwritten with the gradient
    intensity : float32 (J_all, N_y, N_x), measured, FFT order
    rows : int32 (J,) or None: each position's pattern in ``intensity`` (None: row j)
    mask : bool (N_y, N_x) or None
    far_scale : float
    poisson : bool (else the amplitude cost)

    Returns
    -------
    cost : 0-d float64 array in ``far``'s memory (no synchronisation on a GPU)
    """
    xp = get_array_module(far)
    j, k, ny, nx = far.shape
    s2 = far_scale * far_scale
    if not is_gpu(xp):
        meas = intensity if rows is None else intensity[rows]
        model = (far.real ** 2 + far.imag ** 2).sum(axis=1).astype(np.float32) * np.float32(s2)
        if poisson:
            den = model + np.float32(_TINY)
            cmap = model - meas * np.log(den)
            w = 1 - meas / den
        else:
            amp = np.sqrt(model)
            res = amp - np.sqrt(meas)
            cmap = res * res
            w = np.where(amp > 0, res / np.maximum(amp, np.float32(_TINY)), 0)
        if mask is not None:
            cmap, w = cmap * mask, w * mask
        far *= (w * np.float32(2 * s2)).astype(np.float32)[:, None]
        return np.asarray(np.sum(cmap, dtype=np.float64))
    _require_contiguous(far=far)
    cmap = xp.empty((j, ny, nx), dtype=xp.float32)
    m = None if mask is None else xp.ascontiguousarray(mask, dtype=xp.uint8)
    _launch("cost_gradient", j * ny * nx, (far, _c(intensity), _ptr(rows), _ptr(m), cmap, np.int32(j), np.int32(k), np.int64(ny * nx),
                                           np.float32(s2), np.float32(2 * s2), np.int32(bool(poisson))))
    return cmap.sum(dtype=xp.float64)


def adjoint_slice(g, psi, obj, corners, g_obj, illum):
    """The adjoint of one slice, in place.

    ``g_obj[window j] += sum_k conj(psi[j, k]) g[j, k]``, ``illum[window j] += sum_k
    |psi[j, k]|^2``, then ``g[j, k] *= conj(obj[window j])`` (the gradient with respect
    to the slice's incident wave).

    Parameters
    ----------
    g : complex64 (J, K, N_y, N_x), the gradient of the slice's exit waves; overwritten
    psi : complex64 (J, K, N_y, N_x) or (1, K, N_y, N_x): the incident waves
    obj : complex64 (H, W)
    corners : int32 (J, 2)
    g_obj : complex64 (H, W), C-contiguous, added into
    illum : float32 (H, W), C-contiguous, added into
    """
    xp = get_array_module(g)
    j, k, ny, nx = g.shape
    if not is_gpu(xp):
        go = (np.conj(psi) * g).sum(axis=1)
        il = np.broadcast_to((psi.real ** 2 + psi.imag ** 2).sum(axis=1), (j, ny, nx))
        scatter_windows(g_obj, corners, go)
        scatter_windows(illum, corners, il.astype(illum.dtype))
        g *= np.conj(_windows(obj, corners, (ny, nx)))[:, None]
        return g
    _require_contiguous(g=g, g_obj=g_obj, illum=illum)
    psi, obj = _c(psi), _c(obj)
    stride = 0 if psi.shape[0] == 1 and j != 1 else k * ny * nx
    _launch("adjoint_slice", j * ny * nx, (g, psi, np.int64(stride), obj, corners, g_obj.view(xp.float32), illum,
                                           np.int32(j), np.int32(k), np.int32(ny), np.int32(nx), np.int32(obj.shape[-1])))
    return g


def window_abs2_sum(obj, corners, window, out):
    """``out += sum_j |obj[window j]|^2``: float32 (N_y, N_x), added into.

    Parameters
    ----------
    obj : complex64 (H, W); corners : int32 (J, 2); window : (N_y, N_x)
    """
    xp = get_array_module(obj)
    ny, nx = window
    if not is_gpu(xp):
        win = _windows(obj, corners, window)
        out += (win.real ** 2 + win.imag ** 2).sum(axis=0, dtype=np.float32)
        return out
    j = corners.shape[0]
    split = min(j, 64)  # positions over 64 blocks along y: ~J/64 loads per thread, 64 atomics per pixel
    _launch("window_abs2_sum", ny * nx, (_c(obj), corners, out, np.int32(j), np.int32(ny), np.int32(nx),
                                         np.int32(obj.shape[-1])), split=split)
    return out


def scatter_windows(target, corners, values):
    """``target[..., window j] += values[..., j, :, :]`` (overlaps accumulate).

    Parameters
    ----------
    target : (L, H, W) or (H, W) array, float32/float64/complex64/complex128, C-contiguous; added into
    corners : int32 (J, 2)
    values : (L, J, N_y, N_x) or (J, N_y, N_x), float32 or complex64 (the target's kind)

    Returns
    -------
    ``target``
    """
    xp = get_array_module(target)
    squeeze = target.ndim == 2
    t3 = target[None] if squeeze else target
    v4 = values[None] if squeeze else values
    n_l, j, ny, nx = v4.shape
    if not is_gpu(xp):
        for m in range(n_l):
            for jj, (y, x) in enumerate(np.asarray(corners).tolist()):
                t3[m, y:y + ny, x:x + nx] += v4[m, jj]
        return target
    if not t3.flags.c_contiguous:
        raise ValueError("scatter_windows needs a C-contiguous target")
    m = 2 if target.dtype.kind == "c" else 1
    if (target.dtype.kind == "c") != (values.dtype.kind == "c"):
        raise ValueError(f"values ({values.dtype}) and target ({target.dtype}) must both be real or both complex")
    real = t3.view(t3.real.dtype) if m == 2 else t3
    vals = _c(v4.astype(np.complex64 if m == 2 else np.float32, copy=False))
    vals = vals.view(np.float32)
    name = "scatter_windows_d" if real.dtype == np.float64 else "scatter_windows_f"
    if real.dtype not in (np.float32, np.float64):
        raise ValueError(f"scatter_windows: unsupported target dtype {target.dtype}")
    h, w = t3.shape[-2:]
    _launch(name, n_l * j * ny * nx * m, (real, vals, corners, np.int32(n_l), np.int32(j), np.int32(ny), np.int32(nx * m),
                                          np.int64(h), np.int64(w * m), np.int32(m)))
    return target


def gather_windows(obj, corners, window):
    """The windows of every object mode: complex64 (L, J, N_y, N_x) from ``obj`` (L, H, W)."""
    xp = get_array_module(obj)
    n_l, h, w = obj.shape
    j = corners.shape[0]
    if not is_gpu(xp):
        return np.stack([_windows(obj[m], corners, window) for m in range(n_l)])
    out = xp.empty((n_l, j) + tuple(window), dtype=xp.complex64)
    _launch("gather_windows", n_l * j * window[0] * window[1], (_c(obj), corners, out, np.int32(n_l), np.int32(j),
                                                                np.int32(window[0]), np.int32(window[1]), np.int64(h), np.int32(w)))
    return out


# --------------------------------------------------------------------------- difference map kernels
def dm_views_in(psi, probe, obj, corners, out, twice):
    """``out = P_k O_l`` (``twice=False``) or ``2 P_k O_l - psi`` (``twice=True``) on every view.

    psi, out : complex64 (J, K, L, N_y, N_x); probe : (K, N_y, N_x); obj : (L, H, W); corners : int32 (J, 2)
    """
    xp = get_array_module(out)
    j, k, n_l, ny, nx = out.shape
    _require_contiguous(psi=psi, out=out)
    if not is_gpu(xp):
        po = probe[None, :, None] * gather_windows(obj, corners, (ny, nx)).transpose(1, 0, 2, 3)[:, None]
        out[...] = 2 * po - psi if twice else po
        return out
    _launch("dm_views_in", j * ny * nx, (psi, _c(probe), _c(obj), corners, out, np.int32(bool(twice)), np.int32(j), np.int32(k),
                                         np.int32(n_l), np.int32(ny), np.int32(nx), np.int64(obj.shape[1]), np.int32(obj.shape[2])))
    return out


def dm_fourier(far, intensity, mask, error):
    """Eq. 4 on far-field waves of an *unnormalised* FFT, in place, scaled for an
    unnormalised inverse FFT (so ``ifft_unscaled(result)`` is the projection); with
    ``error=True`` the waves are left alone and the Fourier error is returned instead.

    far : complex64 (J, K, L, N_y, N_x); intensity : float32 (J, N_y, N_x); mask : bool (N_y, N_x) or None

    Returns
    -------
    0-d float64 array (the error, ``sum (sqrt(sum_kl |F_ortho|^2) - sqrt(I))^2``) or None
    """
    xp = get_array_module(far)
    j, k, n_l, ny, nx = far.shape
    inv_nn = 1.0 / (ny * nx)
    if not is_gpu(xp):
        total = (far.real ** 2 + far.imag ** 2).sum(axis=(1, 2)) * np.float32(inv_nn)
        lit = np.ones((ny, nx), bool) if mask is None else mask
        if error:
            r = (np.sqrt(total) - np.sqrt(intensity)) ** 2
            return np.asarray(np.sum(np.where(lit, r, 0), dtype=np.float64))
        s = np.where(lit, np.sqrt(intensity / np.maximum(total, np.float32(_TINY))), 1).astype(np.float32) * np.float32(inv_nn)
        far *= s[:, None, None]
        return None
    _require_contiguous(far=far)
    m = None if mask is None else xp.ascontiguousarray(mask, dtype=xp.uint8)
    emap = xp.empty((j, ny, nx), dtype=xp.float32) if error else None
    _launch("dm_fourier", j * ny * nx, (far, _c(intensity), _ptr(m), _ptr(emap), np.int32(j), np.int32(k * n_l), np.int64(ny * nx),
                                        np.float32(inv_nn)))
    return emap.sum(dtype=xp.float64) if error else None


def dm_views_out(psi, w, probe, obj, corners, beta, num, den):
    """Eq. 3's update ``psi += beta (w - P O)`` in place, and this batch's eq. 6 sums
    ``num[l, window j] += sum_k conj(P_k) psi_new``, ``den[window j] += sum_k |P_k|^2``.

    psi, w : complex64 (J, K, L, N_y, N_x); probe (K, N_y, N_x); obj (L, H, W); corners int32 (J, 2);
    num : complex128 (L, H, W); den : float64 (H, W), both C-contiguous, added into
    """
    xp = get_array_module(psi)
    j, k, n_l, ny, nx = psi.shape
    _require_contiguous(psi=psi, num=num, den=den)
    if not is_gpu(xp):
        po = dm_views_in(psi, probe, obj, corners, np.empty_like(psi), False)
        psi += np.float32(beta) * (w - po)
        contrib = (probe.conj()[None, :, None] * psi).sum(axis=1)  # (J, L, N, N)
        scatter_windows(num, corners, contrib.transpose(1, 0, 2, 3))
        p2 = (probe.real ** 2 + probe.imag ** 2).sum(axis=0)
        scatter_windows(den, corners, np.broadcast_to(p2, (j, ny, nx)).astype(np.float32))
        return psi
    _launch("dm_views_out", j * ny * nx, (psi, _c(w), _c(probe), _c(obj), corners, np.float32(beta), num.view(xp.float64), den,
                                          np.int32(j), np.int32(k), np.int32(n_l), np.int32(ny), np.int32(nx),
                                          np.int64(obj.shape[1]), np.int32(obj.shape[2])))
    return psi


def dm_probe_sums(psi, obj, corners, num, den):
    """Eq. 5's sums added in: ``num[k] += sum_j sum_l conj(O_l[window j]) psi[j, k, l]``
    (complex128 (K, N_y, N_x)), ``den += sum_j sum_l |O_l[window j]|^2`` (float64 (N_y, N_x))."""
    xp = get_array_module(psi)
    j, k, n_l, ny, nx = psi.shape
    if not is_gpu(xp):
        win = gather_windows(obj, corners, (ny, nx)).transpose(1, 0, 2, 3)  # (J, L, N, N)
        num += (win.conj()[:, None] * psi).sum(axis=(0, 2), dtype=np.complex128)
        den += (win.real ** 2 + win.imag ** 2).sum(axis=(0, 1), dtype=np.float64)
        return num, den
    split = min(j, 32)
    _launch("dm_probe_sums", k * ny * nx, (_c(psi), _c(obj), corners, num.view(xp.float64), den, np.int32(j), np.int32(k),
                                           np.int32(n_l), np.int32(ny), np.int32(nx), np.int64(obj.shape[1]),
                                           np.int32(obj.shape[2])), split=split)
    return num, den


# --------------------------------------------------------------------------- the multislice gradient
def fft_unscaled(a, forward):
    """Unnormalised 2-D FFT over the last two axes, in place where the library allows
    (cuFFT through CuPy's plan cache); returns the transformed array."""
    xp = get_array_module(a)
    if is_gpu(xp):
        import cupyx.scipy.fft as cufft

        if forward:
            return cufft.fft2(a, axes=(-2, -1), norm="backward", overwrite_x=True)
        return cufft.ifft2(a, axes=(-2, -1), norm="forward", overwrite_x=True)
    return (fft2 if forward else ifft2)(a, xp, out=a, norm="none")


def memory_fraction():
    """``daskptycho.gpu.memory_fraction``: the share of the device's free memory one
    gradient or view-update launch may use (default 0.5)."""
    from .. import config

    return float(config.get("gpu.memory_fraction", 0.5) or 0.5)


def free_device_bytes(xp):
    """Free bytes on the current device, counting what CuPy's pool holds unused."""
    free, _ = xp.cuda.runtime.memGetInfo()
    pool = xp.get_default_memory_pool()
    return free + pool.free_bytes()


def launch_budget(xp):
    """Bytes one :func:`gradients` or view-update launch may use: :func:`memory_fraction`
    of the free device memory (None on the host: no limit)."""
    if not is_gpu(xp):
        return None
    return free_device_bytes(xp) * memory_fraction()


def positions_per_launch(window, slices, modes, xp, extra_bytes_per_position=0, wave_checkpoints=1, budget_bytes=None):
    """Positions one :func:`gradients` call may take on the device: its transient
    memory per position (the incident waves it keeps, see
    :func:`~daskptycho.physics.wave_checkpoints.gradient_working_set` with ``path="cuda"``,
    plus the far field and the cost map) within ``budget_bytes`` (default
    :func:`launch_budget`). On the host (NumPy), all of them (``None``).

    Parameters
    ----------
    window : (N_y, N_x)
    slices, modes : int
    xp : numpy or cupy
    extra_bytes_per_position : int
    wave_checkpoints : int >= 1, the checkpoint interval the launches run
    budget_bytes : float, optional
    """
    if not is_gpu(xp):
        return None
    per_position = gradient_working_set(slices, modes, window, wave_checkpoints, "cuda") + extra_bytes_per_position
    budget = launch_budget(xp) if budget_bytes is None else budget_bytes
    return max(1, int(budget // per_position))


def gradients(obj, probe, corners, kernel, intensity, rows=None, mask=None, cost="amplitude", probe_gradient=True, out=None,
              wave_checkpoints=1):
    """Cost, gradients and illumination of one batch of positions, on the device.

    The arithmetic of :func:`daskptycho.physics.multislice.gradients` (unnormalised
    FFTs, the scale folded into the cost), organised for a GPU: one kernel per slice
    each way, FFTs in place, the patterns read by row from the device-resident array.
    The forward pass keeps the incident waves of every ``wave_checkpoints``-th slice and
    of the last segment; the backward pass recomputes each earlier segment's waves from
    its checkpoint (the same kernels and FFTs) just before going back through it, and
    frees every wave once used (see :mod:`~daskptycho.physics.wave_checkpoints`).

    Parameters
    ----------
    obj : complex64 (S, H, W)
    probe : complex64 (K, N_y, N_x)
    corners : int32 (J, 2), window corners on ``obj`` (:func:`device_corners`)
    kernel : complex64 (N_y, N_x) or None: the Fresnel transfer function (FFT order); or
        (2, N_y, N_x): that and the near-field detector transfer function stacked
        (:func:`~daskptycho.physics.propagation.propagators`): the exit wave then goes to
        the detector by ``IFFT(H_d FFT(.))`` (two more FFTs each way, unscaled cost)
    intensity : float32 (J_all, N_y, N_x), measured, FFT order
    rows : int32 (J,) or None: each position's row of ``intensity`` (None: row j)
    mask : bool (N_y, N_x) or None, FFT order
    cost : "amplitude" or "poisson"
    out : dict, optional: accumulators ``object`` (S, H, W) complex64, ``illumination``
        (S, H, W) float32 and, with ``probe_gradient``, ``probe`` (K, N_y, N_x) and
        ``probe_illumination`` (N_y, N_x): added into
    wave_checkpoints : int >= 1
        The checkpoint interval (1: every slice's incident wave kept, nothing recomputed).

    Returns
    -------
    dict like :func:`~daskptycho.physics.multislice.gradients`, with ``cost`` a 0-d
    float64 array in device memory.
    """
    if cost not in ("amplitude", "poisson"):
        raise ValueError(f"cost must be 'amplitude' or 'poisson', got {cost!r}")
    xp = get_array_module(obj)
    kernel, detector = split_propagators(kernel)
    n_slices = obj.shape[0]
    k, ny, nx = probe.shape
    j = corners.shape[0]
    _check_corners(corners, (ny, nx), obj.shape[-2:])
    nn = ny * nx
    out = {} if out is None else out
    g_obj = out.get("object")
    if g_obj is None:
        g_obj = out["object"] = xp.zeros(obj.shape, dtype=xp.complex64)
    illum = out.get("illumination")
    if illum is None:
        illum = out["illumination"] = xp.zeros(obj.shape, dtype=xp.float32)
    if not (g_obj.flags.c_contiguous and illum.flags.c_contiguous):
        raise ValueError("the gradient accumulators must be C-contiguous")
    k_fwd = k_adj = None
    if n_slices > 1:
        k_fwd = (kernel * (1.0 / nn)).astype(xp.complex64)
        k_adj = xp.conj(k_fwd)

    def transmit(s, psi):  # the exit wave of slice s, or with s < S - 1 the incident wave of s + 1
        phi = window_multiply(psi, obj[s], corners, xp.empty((j, k, ny, nx), dtype=xp.complex64))
        if s == n_slices - 1:
            return phi
        phi = fft_unscaled(phi, True)
        phi *= k_fwd
        return fft_unscaled(phi, False)

    segs = segments(n_slices, effective_interval(wave_checkpoints, n_slices))
    checkpoints, tail = {}, {}  # {slice: incident waves}: each segment's first, the last segment's others
    psi = probe[None]
    for a, b in segs:
        checkpoints[a] = psi
        for s in range(a, b):
            if b == n_slices and s > a:
                tail[s] = psi
            psi = transmit(s, psi)
    far = fft_unscaled(psi, True)
    del psi
    if detector is None:
        value = cost_gradient(far, intensity, rows, mask, 1.0 / math.sqrt(nn), cost == "poisson")
    else:  # near field: on to the detector (unitary), the cost unscaled, and back
        d_fwd = (detector * (1.0 / nn)).astype(xp.complex64)
        far *= d_fwd
        far = fft_unscaled(far, False)
        value = cost_gradient(far, intensity, rows, mask, 1.0, cost == "poisson")
        far = fft_unscaled(far, True)
        far *= xp.conj(d_fwd)
    g = fft_unscaled(far, False)
    del far
    for i in range(len(segs) - 1, -1, -1):
        a, b = segs[i]
        waves = tail if i == len(segs) - 1 else {}
        waves[a] = checkpoints.pop(a)
        for s in range(a, b - 1):
            if s + 1 not in waves:  # an earlier segment: its waves again, from its checkpoint
                waves[s + 1] = transmit(s, waves[s])
        for s in range(b - 1, a - 1, -1):
            g = adjoint_slice(g, waves.pop(s), obj[s], corners, g_obj[s], illum[s])  # each wave freed once used
            if s > 0:
                g = fft_unscaled(g, True)
                g *= k_adj
                g = fft_unscaled(g, False)
    result = {"object": g_obj, "illumination": illum, "cost": value}
    if probe_gradient:
        gp = g.sum(axis=0)
        if out.get("probe") is not None:
            out["probe"] += gp
            gp = out["probe"]
        pil = out.get("probe_illumination")
        if pil is None:
            pil = xp.zeros((ny, nx), dtype=xp.float32)
        window_abs2_sum(obj[0], corners, (ny, nx), pil)
        out["probe"], out["probe_illumination"] = gp, pil
        result["probe"], result["probe_illumination"] = gp, pil
    return result
