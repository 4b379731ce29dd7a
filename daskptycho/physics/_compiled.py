"""The Numba-compiled kernels behind :mod:`daskptycho.physics.fused` (imported only
through :func:`daskptycho.physics.fused.kernels`, so Numba is never imported by
``import daskptycho``).

Every loop takes one row view per (position, mode, row) and indexes it by x alone:
measured 4-6x faster than indexing the 4-D arrays element by element, which Numba
compiles to a stride computation per access that LLVM does not vectorise. Loops run
positions in order and sum modes before adding into an accumulator, as the NumPy path
does, single-threaded and with no fast-math licence (LLVM may not reorder a sum, so every
build of a kernel, compiled in this process or loaded from Numba's cache, computes the
same bits): deterministic, and equal to the NumPy path to float32 rounding.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_TINY = 1e-30
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_jit_inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")

# --- one window (one position): the pieces every kernel below is made of ---


@_jit
def mul_window(psi, obj_s, cy, cx, out):
    """``out[k] = psi[k] * obj_s[cy:cy + N_y, cx:cx + N_x]``; psi, out (K, N_y, N_x)."""
    n_modes, ny, nx = out.shape
    for k in range(n_modes):
        for y in range(ny):
            orow = obj_s[cy + y, cx:cx + nx]
            prow = psi[k, y]
            frow = out[k, y]
            for x in range(nx):
                frow[x] = prow[x] * orow[x]


@_jit
def scale_window(wave, factor):
    """``wave[k] *= factor``; wave (K, N_y, N_x), factor (N_y, N_x)."""
    n_modes, ny, nx = wave.shape
    for k in range(n_modes):
        for y in range(ny):
            frow = wave[k, y]
            krow = factor[y]
            for x in range(nx):
                frow[x] = frow[x] * krow[x]


# The cost's sums are kept in a fixed order, so every build of a kernel (compiled in this
# process or loaded from Numba's cache, vectorised at any width) computes the same bits
# without a fast-math licence: amplitude terms go into one partial sum per column (an
# element-wise add per row, which LLVM vectorises), Poisson terms into float64 row sums in
# LANES interleaved partial sums, and either set is added up by _lane_sum. With
# reassociation allowed, the build a process compiles and the one another loads from
# Numba's cache summed in different orders (a two-mode cost and gradient did), and a lost
# worker's replacement or a resumed run must recompute the same bits.
LANES = 8  # the partial sums of _lane_sum, written out there
# a row's loop inlined into its caller: measured 10% faster than the call per row
_jit_row = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
# float32 constants: a float64 one would turn a float32 pixel's arithmetic into float64
# (float64 patterns promote them)
_ZERO32, _ONE32, _TINY32 = np.float32(0.0), np.float32(1.0), np.float32(_TINY)


@_jit
def _amplitude_term(m, i, ok, ws):
    """The amplitude cost ``(sqrt(m) - sqrt(i))^2`` of one pixel of model intensity ``m``
    and measured ``i`` (counted when ``ok``), and the factor ``(1 - sqrt(i / m)) ws`` that
    makes ``2 dL/dPsi*`` of its far-field wave; by one division and one square root, the
    cost as ``m (1 - sqrt(i / m))^2`` (where ``m`` is 0: ``i``, and no gradient)."""
    d = _ONE32 - math.sqrt(i / m)
    live = ok and m > _ZERO32
    return (m * d * d if live else (i if ok else _ZERO32)), (d * ws if live else _ZERO32)


@_jit
def _poisson_term(m, i, ok, ws):
    """As :func:`_amplitude_term`, for the Poisson likelihood."""
    den = m + _TINY32
    return (m - i * math.log(den) if ok else _ZERO32), ((_ONE32 - i / den) * ws if ok else _ZERO32)


@_jit_row
def _lane_sum(terms, zero):
    """``sum(terms)`` (1-D) in :data:`LANES` interleaved partial sums of ``zero``'s type,
    then those in order: the same bits however the loop is vectorised."""
    n = terms.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    x = 0
    while x + LANES <= n:
        a0 += terms[x]
        a1 += terms[x + 1]
        a2 += terms[x + 2]
        a3 += terms[x + 3]
        a4 += terms[x + 4]
        a5 += terms[x + 5]
        a6 += terms[x + 6]
        a7 += terms[x + 7]
        x += LANES
    while x < n:
        a0 += terms[x]
        x += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@_jit_row
def _row_cost(frow, irow, mrow, s2, ws, poisson, sign, trow, acc):
    """One row of one mode: its waves (pairs of reals (2 N_x,)) scaled in place into the
    gradient, conjugated with ``sign`` -1 (1: not). Poisson: returns the float64 sum of
    the row's terms (``trow`` (N_x,) scratch for them); amplitude: adds each pixel's term
    to its column's partial sum in ``acc`` (N_x,) and returns 0."""
    # Poisson terms differ in sign: their sum is kept in float64; amplitude terms are
    # >= 0, and a column's sum in the patterns' precision stays within its rounding
    if poisson:
        for x in range(irow.shape[0]):
            re = frow[2 * x]
            im = frow[2 * x + 1]
            t, f = _poisson_term((re * re + im * im) * s2, irow[x], mrow[x], ws)
            trow[x] = t
            frow[2 * x] = re * f
            frow[2 * x + 1] = im * (f * sign)
        return _lane_sum(trow, 0.0)
    for x in range(irow.shape[0]):
        re = frow[2 * x]
        im = frow[2 * x + 1]
        t, f = _amplitude_term((re * re + im * im) * s2, irow[x], mrow[x], ws)
        acc[x] += t
        frow[2 * x] = re * f
        frow[2 * x + 1] = im * (f * sign)
    return 0.0


@_jit
def cost_window(far, intensity, mask, s2, ws, poisson, model, w, acc, conj):
    """Cost of one position's unnormalised far field (K, N_y, N_x) against ``intensity``
    (N_y, N_x) (complex64 and float32, or complex128 and float64); the gradient is
    written over ``far`` (see :func:`cost_gradient`), its complex conjugate with ``conj``
    (negating a float is exact: the same bits but the imaginary parts' signs). ``s2``,
    ``ws`` of the intensity's type; ``model``, ``w``, ``acc``: row scratch (N_x,) of that
    type. Returns the float64 cost.

    The waves are read as pairs of reals (real, imaginary side by side): LLVM vectorises
    those loops, not the same arithmetic on complex values. With one mode each row is
    one pass (:func:`_row_cost`). Amplitude terms are summed per column down the rows,
    then the columns' sums by :func:`_lane_sum`: a sum across each row compiles to 8
    scalar chains, a quarter of this function's time at 96 px. Poisson terms are summed
    per row in float64.
    """
    n_modes, ny, nx = far.shape
    fv = far.view(intensity.dtype)  # (K, N_y, 2 N_x)
    one = intensity.dtype.type(1.0)
    sign = -one if conj else one
    cost = 0.0
    if not poisson:
        for x in range(nx):
            acc[x] = _ZERO32
    for y in range(ny):
        irow = intensity[y]
        mrow = mask[y]
        if n_modes == 1:
            cost += _row_cost(fv[0, y], irow, mrow, s2, ws, poisson, sign, model, acc)
            continue
        # several modes: their intensities summed, then one factor for every mode's pixel
        for k in range(n_modes):
            frow = fv[k, y]
            for x in range(nx):
                p = frow[2 * x] * frow[2 * x] + frow[2 * x + 1] * frow[2 * x + 1]
                model[x] = p if k == 0 else model[x] + p
        if poisson:  # each pixel's term written over its model intensity, once read
            for x in range(nx):
                model[x], w[x] = _poisson_term(model[x] * s2, irow[x], mrow[x], ws)
            cost += _lane_sum(model, 0.0)
        else:
            for x in range(nx):
                t, w[x] = _amplitude_term(model[x] * s2, irow[x], mrow[x], ws)
                acc[x] += t
        for k in range(n_modes):
            frow = fv[k, y]
            for x in range(nx):
                frow[2 * x] = frow[2 * x] * w[x]
                frow[2 * x + 1] = frow[2 * x + 1] * (w[x] * sign)
    if not poisson:
        cost = float(_lane_sum(acc, _ZERO32))
    return cost


@_jit_inline
def _object_row(prow, grow, orow, gorow, ilrow, conj, keep):
    """One row of one mode's adjoint into the object's accumulators: ``gorow +=
    conj(p) g``, ``ilrow += |p|^2``; with ``keep``, ``grow = g conj(o)`` (the wave
    gradient the next slice up reads)."""
    for x in range(grow.shape[0]):
        p = prow[x]
        gv = grow[x].conjugate() if conj else grow[x]
        gorow[x] += p.conjugate() * gv
        ilrow[x] += p.real * p.real + p.imag * p.imag
        if keep:
            grow[x] = gv * orow[x].conjugate()


@_jit
def adjoint_window(g, psi, obj_s, cy, cx, g_obj_s, illum_s, probe_g, probe_il, with_probe, go, il, conj):
    """The adjoint of one slice at one position (see :func:`adjoint_slice`); g, psi
    (K, N_y, N_x); ``go`` (N_x,) complex and ``il`` (N_x,) real are row scratch. With
    ``conj``, ``g`` holds the complex conjugate of the gradient (what a forward FFT of the
    conjugated far-field gradient gives: see :func:`position_gradients`). With
    ``with_probe`` (slice 0, whose wave gradient no one reads after) ``g`` may be left
    as it was instead of multiplied by ``conj(O_s)``."""
    n_modes, ny, nx = g.shape
    if conj and n_modes > 1:  # several modes: conjugated in place first
        for k in range(n_modes):
            for y in range(ny):
                grow = g[k, y]
                for x in range(nx):
                    grow[x] = grow[x].conjugate()
    if n_modes == 1:
        # one pass per row over the object's accumulators (no mode sums to stage: measured 2x
        # faster), the wave multiplied by conj(O_s) on the way; at slice 0 with the probe's
        # gradient the wave is not read again, so it is not written back, and the probe's
        # accumulators get a sweep of their own: each loop then writes two arrays and reads
        # two, which LLVM vectorises (one loop over all seven was measured 1.2-1.4x slower)
        for y in range(ny):
            _object_row(psi[0, y], g[0, y], obj_s[cy + y, cx:cx + nx], g_obj_s[cy + y, cx:cx + nx],
                        illum_s[cy + y, cx:cx + nx], conj, not with_probe)
        if with_probe:
            for y in range(ny):
                orow = obj_s[cy + y, cx:cx + nx]
                grow = g[0, y]
                pgrow = probe_g[0, y]
                pilrow = probe_il[y]
                for x in range(nx):
                    o = orow[x]
                    gv = grow[x].conjugate() if conj else grow[x]
                    pgrow[x] += gv * o.conjugate()
                    pilrow[x] += o.real * o.real + o.imag * o.imag
        return
    for y in range(ny):
        orow = obj_s[cy + y, cx:cx + nx]
        for k in range(n_modes):
            prow = psi[k, y]
            grow = g[k, y]
            if k == 0:
                for x in range(nx):
                    p = prow[x]
                    go[x] = p.conjugate() * grow[x]
                    il[x] = p.real * p.real + p.imag * p.imag
            else:
                for x in range(nx):
                    p = prow[x]
                    go[x] += p.conjugate() * grow[x]
                    il[x] += p.real * p.real + p.imag * p.imag
            for x in range(nx):
                grow[x] = grow[x] * orow[x].conjugate()
            if with_probe:
                pgrow = probe_g[k, y]
                for x in range(nx):
                    pgrow[x] += grow[x]
        gorow = g_obj_s[cy + y, cx:cx + nx]
        ilrow = illum_s[cy + y, cx:cx + nx]
        for x in range(nx):
            gorow[x] += go[x]
            ilrow[x] += il[x]
        if with_probe:
            pilrow = probe_il[y]
            for x in range(nx):
                pilrow[x] += orow[x].real * orow[x].real + orow[x].imag * orow[x].imag


# --- a batch of positions, one slice at a time (the FFTs run outside, batched) ---


@_jit
def multiply_windows(psi, obj_s, corners, out):
    """``out[j, k] = psi[j', k] * obj_s[window j]`` for every position ``j``; psi (J', K,
    N_y, N_x) with J' = J or 1 (the probe), out (J, K, N_y, N_x). Returns ``out``."""
    shared = psi.shape[0] == 1
    for j in range(out.shape[0]):
        mul_window(psi[0 if shared else j], obj_s, corners[j, 0], corners[j, 1], out[j])
    return out


@_jit
def cost_gradient(far, intensity, mask, scale2, w_scale, poisson):
    """Cost of far-field waves (J, K, N_y, N_x) and ``2 dL/dPsi*`` written over them.

    ``far`` are unnormalised (the waves are ``sqrt(scale2) * far``); ``intensity`` (J,
    N_y, N_x) measured counts; ``mask`` (N_y, N_x) bool; ``w_scale = 2 scale2``.
    Returns the float64 cost (see :func:`daskptycho.physics.cost.cost_and_far_field_gradient`).
    """
    real = intensity.dtype.type
    nx = far.shape[-1]
    model = np.empty(nx, dtype=intensity.dtype)
    w = np.empty(nx, dtype=intensity.dtype)
    acc = np.empty(nx, dtype=intensity.dtype)
    cost = 0.0
    for j in range(far.shape[0]):
        cost += cost_window(far[j], intensity[j], mask, real(scale2), real(w_scale), poisson, model, w, acc, False)
    return cost


@_jit
def adjoint_slice(g, psi, obj_s, corners, g_obj_s, illum_s, probe_g, probe_il, with_probe):
    """The adjoint of one slice for every position: ``g_obj_s[window j] += sum_k
    conj(psi[j, k]) g[j, k]``, ``illum_s[window j] += sum_k |psi[j, k]|^2``, then
    ``g[j, k] *= conj(obj_s[window j])``; with ``with_probe`` (slice 0) also
    ``probe_g[k] += g[j, k] conj(obj_s[window j])`` and ``probe_il += |obj_s[window j]|^2``.

    g (J, K, N_y, N_x) overwritten (with ``with_probe``: possibly left as it was, since
    nothing reads slice 0's wave gradient after); psi (J', K, N_y, N_x), J' = J or 1; accumulators
    g_obj_s, illum_s (H, W), probe_g (K, N_y, N_x), probe_il (N_y, N_x) added into.
    """
    shared = psi.shape[0] == 1
    nx = g.shape[-1]
    go = np.empty(nx, dtype=g.dtype)
    il = np.empty(nx, dtype=illum_s.dtype)
    for j in range(g.shape[0]):
        adjoint_window(g[j], psi[0 if shared else j], obj_s, corners[j, 0], corners[j, 1], g_obj_s, illum_s,
                       probe_g, probe_il, with_probe, go, il, False)


# --- the object step of a tile, its received strips applied on the way ---


@_jit
def step_tile(base, g, il, s_obj, s_il, boxes, adds, half_step, eps, out):
    """``out = base - G * (half_step / (I + eps))`` for one slice of a tile, in one pass,
    where ``G``, ``I`` are the gradient buffer ``g`` and illumination ``il`` with the
    strips applied in order (``adds[i]``: added, else pasted over), as
    :func:`~daskptycho.tasks.tiles.apply_patches` then
    :func:`~daskptycho.tasks.updates.object_step_consuming` compute them: the same
    float32 operations per pixel, so the same bits, and no copy of the buffer.

    Complex arrays are read as pairs of reals: base, g, out (H, 2 W) float32 (complex64
    viewed); il (H, W) float32; s_obj, s_il: tuples of the strips' arrays (h_i, 2 w_i)
    and (h_i, w_i); boxes (n, 6) int64: each strip's rows ``[y0, y1)`` and columns
    ``[x0, x1)`` in the tile and its own first row and column there; half_step, eps:
    float32.
    """
    h, w = il.shape
    row = np.empty(2 * w, dtype=np.float32)
    lrow = np.empty(w, dtype=np.float32)
    for y in range(h):
        grow = g[y]
        irow = il[y]
        for x in range(2 * w):
            row[x] = grow[x]
        for x in range(w):
            lrow[x] = irow[x]
        for i in range(boxes.shape[0]):
            y0, y1, x0, x1 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            if y < y0 or y >= y1:
                continue
            r = y - y0 + boxes[i, 4]
            c = boxes[i, 5]
            n = x1 - x0
            # sliced first: indices from 0 up, which LLVM vectorises (an offset index
            # could be negative, and NumPy-style wraparound keeps a check per element)
            dst, ldst = row[2 * x0:2 * x1], lrow[x0:x1]
            src, lsrc = s_obj[i][r, 2 * c:2 * (c + n)], s_il[i][r, c:c + n]
            if adds[i]:
                for x in range(2 * n):
                    dst[x] += src[x]
                for x in range(n):
                    ldst[x] += lsrc[x]
            else:
                for x in range(2 * n):
                    dst[x] = src[x]
                for x in range(n):
                    ldst[x] = lsrc[x]
        brow = base[y]
        orow = out[y]
        for x in range(w):
            f = half_step / (lrow[x] + eps)
            orow[2 * x] = brow[2 * x] - row[2 * x] * f
            orow[2 * x + 1] = brow[2 * x + 1] - row[2 * x + 1] * f


# --- the whole model, one position at a time, FFTs included (FFTW's new-array execute) ---


def _fftwf_libraries():
    """Paths of the single-precision FFTW library pyFFTW has loaded into this process (so
    plans made through it share pyFFTW's wisdom) and of its threads library, or None
    (no pyFFTW, not Linux)."""
    try:
        import pyfftw  # noqa: F401 - loads libfftw3f
    except ImportError:
        return None, None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libfftw3f" in line}
    except OSError:
        return None, None
    import os

    names = {p: os.path.basename(p) for p in paths}
    base = sorted(p for p, n in names.items() if n.startswith("libfftw3f") and "_omp" not in n and "_threads" not in n)
    threads = sorted(p for p, n in names.items() if n.startswith(("libfftw3f_omp", "libfftw3f_threads")))
    return (base[0] if base else None), (threads[0] if threads else None)


FFTWF_LIBRARY, FFTWF_THREADS_LIBRARY = _fftwf_libraries()
if FFTWF_LIBRARY is not None:
    import llvmlite.binding

    llvmlite.binding.load_library_permanently(FFTWF_LIBRARY)
    # pointers travel as integers (uintp): the same registers in the x86-64 and AArch64 ABIs
    execute_dft = numba.types.ExternalFunction(
        "fftwf_execute_dft", numba.types.void(numba.types.uintp, numba.types.uintp, numba.types.uintp))
else:
    execute_dft = None


@_jit
def transform(plan, src, dst):
    """Execute the out-of-place FFTW ``plan`` from ``src`` into ``dst`` (distinct, aligned,
    C-contiguous, the plan's shape)."""
    execute_dft(plan, src.ctypes.data, dst.ctypes.data)


@_jit
def wave_slot(s, interval, n_segments):
    """Where the incident wave of slice ``s`` >= 1 lives in :func:`position_gradients`'
    scratch: a checkpoint (``s`` a multiple of ``interval``) in slots 0 .. n - 2, another
    slice of a segment in the slots after them (reused by every segment). Interval 1:
    slot ``s - 1``."""
    r = s % interval
    if r == 0:
        return s // interval - 1
    return n_segments - 1 + r - 1


@_jit
def propagate_window(psi, obj_s, cy, cx, out, far, plan_f, plan_b, k_fwd):
    """``out = ifft(fft(psi * obj_s[window]) * k_fwd)``: the incident wave of the next
    slice; ``far`` (the shape of ``out``) is scratch."""
    mul_window(psi, obj_s, cy, cx, out)
    transform(plan_f, out, far)
    scale_window(far, k_fwd)
    transform(plan_b, far, out)


@_jit
def position_gradients(obj, probe, corners, rows, data, mask, k_fwd, k_adj, s2, ws, poisson,
                       g_obj, illum, probe_g, probe_il, with_probe, plan_f, plan_b, inc, wave, far, counts, interval,
                       near, d_fwd, d_adj):
    """Cost and gradients of the multislice model, summed over positions, one position at
    a time: its waves (K, N_y, N_x) stay in cache through every FFT.

    obj (S, H, W); probe (K, N_y, N_x); corners (J, 2); rows (J,): each position's
    pattern in ``data`` (J_all, N_y, N_x), FFT order; mask (N_y, N_x) bool; k_fwd, k_adj
    (N_y, N_x): the Fresnel kernel and its conjugate, each times 1/(N_y N_x); s2 =
    1/(N_y N_x), ws = 2 s2; accumulators g_obj (S, H, W), illum (S, H, W), probe_g (K,
    N_y, N_x), probe_il (N_y, N_x); plan_f, plan_b: out-of-place FFTW plans of K
    transforms of N_y x N_x; inc (slots, K, N_y, N_x), wave and far (K, N_y, N_x): aligned
    scratch (each transform goes from one of ``wave``/``far`` to the other);
    counts (1,) int64: the FFTs run are added to ``counts[0]``.

    ``interval`` c: the incident waves kept are slice c, 2c, ... 's and the last
    segment's; the backward pass recomputes each earlier segment's other waves from its
    checkpoint (the same operations, so the same bits) before its adjoint. ``inc`` needs
    ``max(ceil(S / c) - 1 + c - 1, 1)`` slots (``max(S - 1, 1)`` for c = 1; c in [1, S - 1]).

    ``near``: near-field detector: the exit wave goes to the detector by ``IFFT(d_fwd
    FFT(.))`` and the gradient comes back by ``IFFT(d_adj FFT(.))`` (``d_fwd``, ``d_adj``
    (N_y, N_x): the detector transfer function and its conjugate, each times 1/(N_y N_x);
    then s2 = 1, ws = 2); far field (False): ``d_fwd``, ``d_adj`` are not read.
    Returns the float64 cost.
    """
    n_slices = obj.shape[0]
    n_modes = probe.shape[0]
    nx = probe.shape[-1]
    real = illum.dtype.type
    model = np.empty(nx, dtype=illum.dtype)
    w = np.empty(nx, dtype=illum.dtype)
    acc = np.empty(nx, dtype=illum.dtype)
    go = np.empty(nx, dtype=g_obj.dtype)
    il = np.empty(nx, dtype=illum.dtype)
    n_segments = (n_slices + interval - 1) // interval
    last_start = (n_segments - 1) * interval  # the last segment's waves are left by the forward pass
    cost = 0.0
    for i in range(corners.shape[0]):
        cy = corners[i, 0]
        cx = corners[i, 1]
        psi = probe
        for s in range(n_slices - 1):  # the incident wave of slice s + 1, kept for the adjoint (if a checkpoint or in the last segment)
            nxt = inc[wave_slot(s + 1, interval, n_segments)]
            propagate_window(psi, obj[s], cy, cx, nxt, far, plan_f, plan_b, k_fwd)
            counts[0] += 2 * n_modes
            psi = nxt
        mul_window(psi, obj[n_slices - 1], cy, cx, wave)
        transform(plan_f, wave, far)
        if near:  # on to the detector plane, and back from it after the cost
            scale_window(far, d_fwd)
            transform(plan_b, far, wave)
            cost += cost_window(wave, data[rows[i]], mask, real(s2), real(ws), poisson, model, w, acc, False)
            transform(plan_f, wave, far)
            scale_window(far, d_adj)
            transform(plan_b, far, wave)  # now the gradient w.r.t. the last slice's exit wave
            conj = False
            counts[0] += 2 * n_modes
        else:
            # the gradient's inverse transform as the conjugate of a forward one of its
            # conjugate (conj(F(conj(x))) is FFTW's unnormalised backward transform, which
            # FFTW itself computes by swapping real and imaginary parts): every transform of
            # a far-field position then runs the forward plan, whose speed the FFT floor is
            # measured at; the conjugations ride in the cost's and the adjoint's loops
            cost += cost_window(far, data[rows[i]], mask, real(s2), real(ws), poisson, model, w, acc, True)
            transform(plan_f, far, wave)  # the conjugate of the gradient w.r.t. the last slice's exit wave
            conj = True
        counts[0] += 2 * n_modes
        for s in range(n_slices - 1, -1, -1):
            if interval > 1 and s < last_start and s % interval == interval - 1:
                # the last slice of an earlier segment: its waves again, from the segment's checkpoint
                a = s - (interval - 1)
                psi = probe if a == 0 else inc[wave_slot(a, interval, n_segments)]
                for t in range(a, s):
                    nxt = inc[wave_slot(t + 1, interval, n_segments)]
                    propagate_window(psi, obj[t], cy, cx, nxt, far, plan_f, plan_b, k_fwd)
                    counts[0] += 2 * n_modes
                    psi = nxt
            psi = probe if s == 0 else inc[wave_slot(s, interval, n_segments)]
            adjoint_window(wave, psi, obj[s], cy, cx, g_obj[s], illum[s], probe_g, probe_il,
                           with_probe and s == 0, go, il, conj and s == n_slices - 1)
            if s > 0:
                transform(plan_f, wave, far)
                scale_window(far, k_adj)
                transform(plan_b, far, wave)
                counts[0] += 2 * n_modes
    return cost
