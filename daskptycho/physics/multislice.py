"""Multislice forward model and its hand-written adjoint, batched over positions.

Geometry: the object is a stack of complex transmission functions ``obj`` with
shape (S, H, W). Probe position ``j`` illuminates the window of ``N x N`` pixels
whose flat indices into ``obj[s]`` are ``index[j]`` (see :func:`window_index`).
The incident wave on slice 0 is the probe (K modes); after each slice but the last
it is propagated by the Fresnel kernel; the exit wave of the last slice goes to the
far field by an orthonormal FFT. Modes are mutually incoherent: intensities add.

Near field: with a detector transfer function ``H_d`` (``kernel`` given as the stacked
propagators of :func:`~daskptycho.physics.propagation.propagators`) the exit wave goes
to the detector by the unitary Fresnel propagation ``IFFT(H_d FFT(exit))`` instead
(:func:`~daskptycho.physics.propagation.detector_kernel`, which also puts the
detector wave in FFT order), and the adjoint starts with ``IFFT(conj(H_d) FFT(g))``.
Everything else (slices, windows, cost, the fused elementwise kernels) is the same.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from ..backend import empty, fft2, get_array_module, ifft2, is_gpu, scatter_add
from .cost import cost_and_far_field_gradient
from .dispatch import FFT_TALLY, aligned_stride, fftw_plans, kernels
from .intensity import abs2, abs2_modes
from .propagation import split_propagators
from .wave_checkpoints import checkpoint_interval, effective_interval, segments

__all__ = ["window_index", "windows", "Windows", "forward", "backward", "far_field_intensity", "gradients", "position_scratch_waves"]


def window_index(corners, window, object_shape, xp=np):
    """Flat indices of the probe windows in an object slice.

    Parameters
    ----------
    corners : int array (J, 2)
        Top-left pixel (row, col) of each window.
    window : (int, int)
        Window shape (N_y, N_x).
    object_shape : (int, int)
        (H, W) of one object slice.

    Returns
    -------
    int array, shape (J, N_y, N_x)
    """
    corners = np.asarray(corners)
    h, w = object_shape
    ny, nx = window
    if corners.size and (corners.min() < 0 or (corners[:, 0] + ny).max() > h or (corners[:, 1] + nx).max() > w):
        raise ValueError("a probe window falls outside the object array")
    rows = corners[:, 0, None, None] + np.arange(ny)[None, :, None]
    cols = corners[:, 1, None, None] + np.arange(nx)[None, None, :]
    return xp.asarray((rows * w + cols).astype(np.int64))


class Windows:
    """Rectangular probe windows on an object slice, given by their top-left corners.

    What :func:`window_index` flattens, kept compact: the CPU paths cut and add
    windows as slices of the object (``N_y`` contiguous rows each) instead of
    gathering and scattering ``J N_y N_x`` flat indices.

    Parameters
    ----------
    corners : int array (J, 2)
        Top-left pixel (row, col) of each window.
    window : (int, int)
        Window shape (N_y, N_x).
    object_shape : (int, int)
        (H, W) of one object slice.
    """

    def __init__(self, corners, window, object_shape):
        corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
        h, w = object_shape
        ny, nx = window
        if corners.size and (corners.min() < 0 or (corners[:, 0] + ny).max() > h or (corners[:, 1] + nx).max() > w):
            raise ValueError("a probe window falls outside the object array")
        self.corners = corners
        self.window = (int(ny), int(nx))
        self.object_shape = (int(h), int(w))

    @property
    def shape(self):
        """(J, N_y, N_x), the shape of the equivalent :func:`window_index` array."""
        return (self.corners.shape[0],) + self.window

    def flat(self, xp=np):
        """The flat indices (J, N_y, N_x) of :func:`window_index`."""
        return window_index(self.corners, self.window, self.object_shape, xp)


def windows(corners, window, object_shape):
    """:class:`Windows` of ``corners``: accepted by :func:`forward`, :func:`backward` and
    :func:`gradients` wherever a :func:`window_index` array is."""
    return Windows(corners, window, object_shape)


def _as_windows(index, object_shape):
    """``index`` as :class:`Windows` when it is one or a rectangular :func:`window_index`
    array on this grid, else ``None`` (arbitrary index arrays take the flat path)."""
    if isinstance(index, Windows):
        return index
    if type(index).__module__.startswith("cupy") or index.ndim != 3 or index.shape[0] == 0:
        return None
    _, ny, nx = index.shape
    h, w = object_shape[-2:]
    first = np.asarray(index[:, 0, 0])
    corners = np.stack([first // w, first % w], axis=1)
    if corners[:, 1].max() + nx > w or not (np.array_equal(index[:, -1, -1], first + (ny - 1) * w + nx - 1)
                                           and np.array_equal(index[:, 0, -1], first + nx - 1)):
        return None
    if corners[:, 0].max() + ny > h:
        return None
    return Windows(corners, (ny, nx), (h, w))


def _gather(obj, index):
    """Object patches under each window: (S, J, N_y, N_x), a new array."""
    win = _as_windows(index, obj.shape)
    if win is None or is_gpu(get_array_module(obj)):
        flat = index.flat(get_array_module(obj)) if isinstance(index, Windows) else index
        return obj.reshape(obj.shape[0], -1)[:, flat]
    # one slice copy per window (N_y rows of N_x contiguous values): cheaper than fancy
    # indexing a sliding-window view, which walks the (S, J) subspace element by element
    ny, nx = win.window
    out = np.empty((obj.shape[0], win.corners.shape[0], ny, nx), dtype=obj.dtype)
    for j, (y, x) in enumerate(win.corners.tolist()):
        out[:, j] = obj[:, y:y + ny, x:x + nx]
    return out


def _scatter(targets, index, values):
    """``target[s] += value[s, j]`` on each window ``j`` for each (target, value) pair;
    overlaps accumulate.

    targets : (S, H, W) array or tuple of them, modified in place;
    values : (S, J, N_y, N_x) array or tuple of them (same length as ``targets``).
    """
    if not isinstance(targets, tuple):
        targets, values = (targets,), (values,)
    xp = get_array_module(targets[0])
    win = _as_windows(index, targets[0].shape)
    if win is None or is_gpu(xp):
        flat = index.flat(xp) if isinstance(index, Windows) else index
        for target, value in zip(targets, values):
            s = target.shape[0]
            scatter_add(target.reshape(s, -1), flat.reshape(-1), value.reshape(s, -1))
        return targets
    ny, nx = win.window
    # one strided add per window (N_y rows of N_x contiguous values): cheaper than a
    # bincount over J N_y N_x indices, which also goes through float64
    # complex addition is addition of the (re, im) pairs: bit-identical, and NumPy's strided
    # in-place add of N_y float rows runs ~1.5x faster than the complex one
    pairs = []
    for target, value in zip(targets, values):
        if target.dtype.kind == "c" and target.dtype == value.dtype and target.strides[-1] == target.itemsize \
                and value.strides[-1] == value.itemsize:
            real = target.real.dtype
            pairs.append((target.view(real), value.view(real), 2))
        else:
            pairs.append((target, value, 1))
    for j, (y, x) in enumerate(win.corners.tolist()):
        for target, value, m in pairs:
            target[:, y:y + ny, m * x:m * (x + nx)] += value[:, j]
    return targets


def _propagate_inplace(wave, kernel_scaled):
    """``ifft2(fft2(wave) * kernel)`` in place; ``kernel_scaled`` includes 1/(N_y N_x)."""
    fft2(wave, out=wave, norm="none")
    wave *= kernel_scaled
    ifft2(wave, out=wave, norm="none")
    return wave


def _scaled_kernel(kernel, dtype):
    n = kernel.shape[-1] * kernel.shape[-2]
    return (kernel * (1.0 / n)).astype(dtype, copy=False)


def _fused_path(xp, index, obj, probe):
    """(compiled kernels, :class:`Windows`) when the fused CPU kernels apply, else (None, None):
    NumPy arrays of one complex dtype, rectangular windows and ``daskptycho.kernels`` not ``numpy``."""
    if is_gpu(xp) or obj.dtype != probe.dtype or obj.dtype.kind != "c":
        return None, None
    compiled = kernels()
    if compiled is None:
        return None, None
    win = _as_windows(index, obj.shape)
    return (compiled, win) if win is not None else (None, None)


class _FusedCache:
    """What :func:`backward` needs after a fused :func:`forward`: the incident waves (slice
    0's is the probe, shape (1, K, N, N)), the object they went through and the windows."""

    def __init__(self, incident, obj, win):
        self.incident, self.obj, self.win = incident, obj, win


class _CheckpointedCache:
    """What :func:`backward` needs after a :func:`forward` with a wave checkpoint interval
    ``c > 1`` (see :mod:`~daskptycho.physics.wave_checkpoints`).

    Attributes
    ----------
    interval : int
        c, in [2, S - 1].
    checkpoints : dict {slice a: wave}
        The incident wave of the first slice of every segment (slice 0's is the probe:
        (J, K, N, N) broadcast on the NumPy path, (1, K, N, N) on the fused one).
    tail, tail_patches : dict {slice: (J, K, N, N) wave}, {slice: (J, N, N) patch}
        The last segment's other incident waves and (NumPy path) its object patches, as
        the forward pass left them: :func:`backward` takes them out as it uses them.
    obj, index, k_scaled, fused :
        What recomputes a segment: the object (S, H, W), the windows, the scaled Fresnel
        kernel, and whether the fused kernels (``fused`` is the compiled module) transmit.
    """

    def __init__(self, interval, checkpoints, tail, tail_patches, obj, index, k_scaled, fused):
        self.interval, self.checkpoints, self.tail, self.tail_patches = interval, checkpoints, tail, tail_patches
        self.obj, self.index, self.k_scaled, self.fused = obj, index, k_scaled, fused


def _transmit(cache, s, psi, patch):
    """The exit wave of slice ``s`` for incident ``psi``, a new SIMD-aligned array (J, K, N, N):
    the same operation on either batched path as :func:`forward` runs, so recomputed waves
    are the same bits."""
    xp = get_array_module(psi)
    if cache.fused is not None:
        shape = (cache.index.corners.shape[0],) + psi.shape[1:]
        return cache.fused.multiply_windows(psi, cache.obj[s], cache.index.corners, empty(shape, cache.obj.dtype, xp))
    return xp.multiply(psi, patch[:, None], out=empty(psi.shape, np.result_type(psi.dtype, patch.dtype), xp))


def _forward_checkpointed(cache, psi, n_slices):
    """The forward pass keeping the checkpoints and the last segment's waves in ``cache``;
    returns the last slice's exit wave."""
    segs = segments(n_slices, cache.interval)
    for a, b in segs:
        cache.checkpoints[a] = psi
        last = b == n_slices
        # the object patches of one segment at a time (the NumPy path): the others are cut again when recomputed
        patches = None if cache.fused is not None else _gather(cache.obj[a:b], cache.index)
        for s in range(a, b):
            patch = None if patches is None else patches[s - a]
            if last:
                if s > a:
                    cache.tail[s] = psi
                if patch is not None:
                    cache.tail_patches[s] = patch
            phi = _transmit(cache, s, psi, patch)
            if s < n_slices - 1:
                psi = _propagate_inplace(phi, cache.k_scaled)
    return phi


def _incident_backward(cache, n_slices):
    """Yield ``(s, incident wave, patch)`` for s = S - 1 .. 0 after a checkpointed forward,
    recomputing each earlier segment's waves from its checkpoint just before its first
    slice is asked for; each wave is released once the caller has used it. ``patch`` is
    None on the fused path (the kernels read the object in place)."""
    segs = segments(n_slices, cache.interval)
    for i in range(len(segs) - 1, -1, -1):
        a, b = segs[i]
        waves, patches = {a: cache.checkpoints[a]}, {}
        if i == len(segs) - 1 and len(cache.tail) == b - a - 1:
            # the forward pass's own waves: taken out of the cache, so each is freed after use
            waves.update(cache.tail)
            patches.update(cache.tail_patches)
            cache.tail, cache.tail_patches = {}, {}
        if len(waves) < b - a or (cache.fused is None and len(patches) < b - a):
            cut = None if cache.fused is not None else _gather(cache.obj[a:b], cache.index)
            patches = {} if cut is None else {s: cut[s - a] for s in range(a, b)}
            psi = waves[a]
            for s in range(a, b - 1):  # the forward pass again, from the checkpoint
                psi = _propagate_inplace(_transmit(cache, s, psi, patches.get(s)), cache.k_scaled)
                waves[s + 1] = psi
            del psi, cut
        for s in range(b - 1, a - 1, -1):
            yield s, waves.pop(s), patches.pop(s, None)


def _to_detector(phi, detector, xp, ortho):
    """The exit waves ``phi`` (J, K, N_y, N_x) taken to the detector in place: far field
    (``detector`` None) an FFT, orthonormal or (``ortho`` False) unnormalised; near field
    the unitary ``IFFT(H_d FFT(phi))`` (no scale left over in either case of ``ortho``)."""
    if detector is None:
        return fft2(phi, xp, out=phi, norm="ortho" if ortho else "none")
    return _propagate_inplace(phi, _scaled_kernel(detector, phi.dtype))


def _from_detector(g_far, detector, xp, ortho, overwrite):
    """The adjoint of :func:`_to_detector` applied to ``g_far`` (in place with ``overwrite``)."""
    if detector is None:
        return ifft2(g_far, xp, out=g_far if overwrite else None, norm="ortho" if ortho else "none")
    g = g_far if overwrite else g_far.copy()
    return _propagate_inplace(g, _scaled_kernel(detector.conj(), g.dtype))


def forward(obj, probe, index, kernel, keep=False, _ortho=True, wave_checkpoints=1):
    """Far-field (or near-field detector) waves of every position and probe mode.

    Parameters
    ----------
    obj : complex array (S, H, W)
    probe : complex array (K, N, N)
    index : int array (J, N, N) from :func:`window_index`, or :class:`Windows`
    kernel : complex array (N, N) or (2, N, N), or None
        Fresnel transfer function between consecutive slices (FFT order); or, near
        field, that and the detector's stacked
        (:func:`~daskptycho.physics.propagation.propagators`).
    keep : bool
        Also return what :func:`gradients` needs (incident waves and patches).
    wave_checkpoints : int >= 1
        With ``keep``: keep the incident waves of every ``wave_checkpoints``-th slice only
        (and the last segment's), for :func:`backward` to recompute the others from (see
        :mod:`~daskptycho.physics.wave_checkpoints`); 1 keeps every slice's.

    Returns
    -------
    far : complex array (J, K, N, N), FFT order (zero frequency at [0, 0]; near field:
        the detector wave, ``ifftshift`` of the centred frame)
    """
    xp = get_array_module(obj, probe)
    kernel, detector = split_propagators(kernel)
    n_slices = obj.shape[0]
    interval = effective_interval(wave_checkpoints, n_slices) if keep else 1
    compiled, win = _fused_path(xp, index, obj, probe)
    if interval > 1:
        dtype = np.result_type(obj.dtype, probe.dtype)
        k_scaled = _scaled_kernel(kernel, dtype)
        if compiled is not None:
            obj = np.ascontiguousarray(obj)
            psi = np.ascontiguousarray(probe)[None]
            cache = _CheckpointedCache(interval, {}, {}, {}, obj, win, k_scaled, compiled)
        else:
            n_pos = index.shape[0]
            psi = xp.broadcast_to(probe[None], (n_pos,) + probe.shape)
            cache = _CheckpointedCache(interval, {}, {}, {}, obj, index, k_scaled, None)
        phi = _forward_checkpointed(cache, psi, n_slices)
        return _to_detector(phi, detector, xp, _ortho), cache
    if compiled is not None:
        # no patches cut: each slice's windows are read in place by the kernel
        obj = np.ascontiguousarray(obj)
        psi = np.ascontiguousarray(probe)[None]
        shape = (win.corners.shape[0],) + probe.shape
        k_scaled = _scaled_kernel(kernel, obj.dtype) if n_slices > 1 else None
        incident = []
        for s in range(n_slices):
            incident.append(psi)
            phi = compiled.multiply_windows(psi, obj[s], win.corners, empty(shape, obj.dtype, xp))
            if s < n_slices - 1:
                psi = _propagate_inplace(phi, k_scaled)
        far = _to_detector(phi, detector, xp, _ortho)
        return (far, _FusedCache(incident, obj, win)) if keep else far
    patches = _gather(obj, index)  # (S, J, N, N)
    dtype = np.result_type(obj.dtype, probe.dtype)
    psi = xp.broadcast_to(probe[None], (patches.shape[1],) + probe.shape)
    incident = []
    k_scaled = _scaled_kernel(kernel, dtype) if n_slices > 1 else None
    for s in range(n_slices):  # loop over slices, vectorised over positions and modes
        incident.append(psi)
        # a new (SIMD-aligned) array each slice: transformed in place below, kept as the next incident wave
        phi = xp.multiply(psi, patches[s][:, None], out=empty(psi.shape, dtype, xp))
        if s < n_slices - 1:
            psi = _propagate_inplace(phi, k_scaled)
    # _ortho=False (for gradients): unnormalised, the scale goes into the cost's (J, N, N) terms
    far = _to_detector(phi, detector, xp, _ortho)
    if keep:
        return far, (incident, patches)
    return far


def far_field_intensity(obj, probe, index, kernel):
    """Model diffraction intensity (J, N, N), summed over modes, **centred**
    (zero frequency at ``(N // 2, N // 2)``), as stored in a dataset. With near-field
    propagators as ``kernel`` (see :func:`forward`): the detector frames as recorded."""
    xp = get_array_module(obj, probe)
    far = forward(obj, probe, index, kernel)
    inten = xp.sum(abs2(far, xp), axis=1)
    return xp.fft.fftshift(inten, axes=(-2, -1))


def backward(g_far, cache, index, obj_shape, kernel, probe_gradient=True, out=None, overwrite=False, _ortho=True):
    """Adjoint of the multislice model, applied to a far-field gradient.

    Given ``g = 2 dL/dPsi*`` for the far-field waves Psi of :func:`forward`,
    return ``2 dL/dO*`` for every slice and ``2 dL/dP*`` for the probe: the
    Jacobian's conjugate transpose applied to ``g``, written by hand.

    Parameters
    ----------
    g_far : complex array (J, K, N, N), FFT order
    cache : the second output of ``forward(..., keep=True)``
        After a checkpointed forward (``wave_checkpoints > 1``) the waves between
        checkpoints are recomputed here, segment by segment, and the last segment's
        waves, left by the forward pass, are released as they are used (a second
        call with the same cache recomputes them too).
    index : int array (J, N, N) from :func:`window_index`, or :class:`Windows`
    obj_shape : (S, H, W)
    kernel : complex array (N, N) or (2, N, N) (near field, see :func:`forward`), or None
    out : dict, optional
        Accumulators to add into (``object``, ``illumination`` of shape (S, H, W)
        and, with ``probe_gradient``, ``probe``, ``probe_illumination``), so a sum
        over many batches allocates the object-sized arrays once.
    overwrite : bool
        ``g_far`` may be used as work space (it is transformed in place).

    Returns
    -------
    dict with ``object`` (S, H, W), ``illumination`` (S, H, W) real (``sum_j sum_k
    |incident wave|^2``), and if ``probe_gradient``: ``probe`` (K, N, N) and
    ``probe_illumination`` (N, N) real (``sum_j |O_0 patch|^2``). With ``out``,
    these are ``out``'s arrays, added into.
    """
    xp = get_array_module(g_far)
    kernel, detector = split_propagators(kernel)
    # adjoint of the orthonormal FFT (_ortho=False: g_far already carries the scale), or of the near-field propagation
    g = _from_detector(g_far, detector, xp, _ortho, overwrite)
    n_slices = obj_shape[0]
    if out is None:
        g_obj = xp.zeros(obj_shape, dtype=g_far.dtype)
        illum = xp.zeros(obj_shape, dtype=g_far.real.dtype)
    else:
        g_obj = out["object"]
        illum = out["illumination"]
    k_conj = _scaled_kernel(kernel.conj(), g.dtype) if n_slices > 1 else None
    if isinstance(cache, _CheckpointedCache):
        waves = _incident_backward(cache, n_slices)
        if cache.fused is not None:
            return _backward_fused(g, waves, cache.obj, cache.index, g_obj, illum, k_conj, probe_gradient, out)
    elif isinstance(cache, _FusedCache):
        waves = ((s, cache.incident[s], None) for s in range(n_slices - 1, -1, -1))
        return _backward_fused(g, waves, cache.obj, cache.win, g_obj, illum, k_conj, probe_gradient, out)
    else:
        incident, patches = cache
        waves = ((s, incident[s], patches[s]) for s in range(n_slices - 1, -1, -1))
    work = xp.empty_like(g)  # conj(incident) * g, reused for every slice
    conj_patch = il_buf = p0 = None
    for s, psi, patch in waves:
        if conj_patch is None:
            conj_patch = xp.empty(patch.shape, dtype=patch.dtype)
            il_buf = xp.empty(patch.shape, dtype=g.real.dtype)  # |incident|^2, reused
        if s == 0:  # the probe itself, the same for every position
            il = xp.broadcast_to(abs2(psi[0], xp).sum(axis=0), il_buf.shape)
            p0 = patch
        else:  # before ``work`` is filled: it is the scratch space of the squares
            il = abs2_modes(psi, xp, out=il_buf, scratch=work)
        xp.conjugate(psi, out=work)
        work *= g
        go = work[:, 0] if work.shape[1] == 1 else work.sum(axis=1)  # (J, N, N): sum over modes
        _scatter((g_obj[s:s + 1], illum[s:s + 1]), index, (go[None], il[None]))
        xp.conjugate(patch, out=conj_patch)
        g *= conj_patch[:, None]  # gradient w.r.t. the incident wave
        if s > 0:
            _propagate_inplace(g, k_conj)
        del psi, patch, il
    result = {"object": g_obj, "illumination": illum}
    if probe_gradient:
        gp = xp.sum(g, axis=0)
        pil = xp.sum(abs2(p0, xp), axis=0)
        if out is not None:
            out["probe"] += gp
            out["probe_illumination"] += pil
            gp, pil = out["probe"], out["probe_illumination"]
        result["probe"] = gp
        result["probe_illumination"] = pil
    return result


def _backward_fused(g, waves, obj, win, g_obj, illum, k_conj, probe_gradient, out):
    """:func:`backward` after a fused :func:`forward`: one kernel call per slice.

    ``waves`` yields ``(s, incident wave, _)`` for s = S - 1 .. 0 (waves (J, K, N, N) or,
    slice 0's, the probe (1, K, N, N)); ``obj`` (S, H, W) C-contiguous; ``win`` :class:`Windows`.
    """
    compiled = kernels()
    k_modes, ny, nx = g.shape[1:]
    real = illum.dtype
    if probe_gradient:
        gp = out["probe"] if out is not None and "probe" in out else np.zeros((k_modes, ny, nx), dtype=g.dtype)
        pil = out["probe_illumination"] if out is not None and "probe_illumination" in out else np.zeros((ny, nx), dtype=real)
    else:  # not written; the kernel's arguments keep their types
        gp, pil = np.zeros((1, 1, 1), dtype=g.dtype), np.zeros((1, 1), dtype=real)
    if not (g.flags.c_contiguous and g_obj.flags.c_contiguous and illum.flags.c_contiguous
            and gp.flags.c_contiguous and pil.flags.c_contiguous):
        raise ValueError("the fused adjoint needs C-contiguous gradient and accumulator arrays")
    corners = win.corners
    for s, psi, _ in waves:
        compiled.adjoint_slice(g, psi, obj[s], corners, g_obj[s], illum[s], gp, pil, bool(probe_gradient and s == 0))
        if s > 0:
            _propagate_inplace(g, k_conj)
        del psi
    result = {"object": g_obj, "illumination": illum}
    if probe_gradient:
        result["probe"] = gp
        result["probe_illumination"] = pil
    return result


def _rectangular_on_device(index, object_shape):
    """Whether a device ``window_index`` array is rectangular windows (read on the host: a
    caller that cares passes :class:`Windows`)."""
    return index.ndim == 3 and index.shape[0] > 0 and _as_windows(cuda_index_to_host(index), object_shape) is not None


def cuda_index_to_host(index):
    """A device index array copied to the host (NumPy arrays as they are)."""
    return index.get() if hasattr(index, "get") and type(index).__module__.startswith("cupy") else index


def per_position_path(obj, probe):
    """True when :func:`gradients` on these arrays runs the compiled per-position model
    (:func:`daskptycho.physics.dispatch.fftw_plans`): its memory does not grow with the
    number of positions per call, so callers need not split a batch into chunks."""
    xp = get_array_module(obj, probe)
    return (not is_gpu(xp) and obj.dtype == np.complex64 and probe.dtype == np.complex64 and probe.ndim == 3
            and fftw_plans(probe.shape) is not None and aligned_stride(probe.shape))


def position_scratch_waves(slices, interval=1):
    """Waves of K modes (N_y x N_x) in the incident-wave scratch of the compiled
    per-position model: for slices 1 .. S - 1, one slot per checkpoint but slice 0's
    (the probe) and one per other slice of a segment (see
    :mod:`~daskptycho.physics.wave_checkpoints`); at least 1.

    Parameters
    ----------
    slices : int, S
    interval : int >= 1, the wave checkpoint interval

    Returns
    -------
    int, ``max(S - 1, 1)`` for interval 1, else ``max(ceil(S / c) - 1 + c - 1, 1)``
    """
    c = effective_interval(interval, slices)
    return max(-(-slices // c) - 1 + c - 1, 1)


#: each thread's scratch of the compiled per-position model (:func:`_position_scratch`)
_SCRATCH = threading.local()


def _position_scratch(slots, shape):
    """The incident-wave scratch (slots, K, N_y, N_x) and the wave and far-field scratch
    (K, N_y, N_x) of the compiled per-position model, SIMD-aligned: the calling thread's,
    kept from its last call of the same shape (the model writes them before it reads
    them, and a thread runs one call at a time), so that a call of a few positions does
    not pay three aligned allocations. At most one set per thread."""
    key = (int(slots), tuple(shape))
    held = getattr(_SCRATCH, "arrays", None)
    if held is None or held[0] != key:
        held = (key, empty((key[0], *key[1]), np.complex64), empty(key[1], np.complex64), empty(key[1], np.complex64))
        _SCRATCH.arrays = held
    return held[1:]


@functools.lru_cache(maxsize=16)
def _read_only(kind, shape):
    """Constant arrays of the per-position model, made once per shape: ``ones`` (complex64:
    the slice kernel of one slice, never read) and ``mask`` (bool: every pixel counted)."""
    a = np.ones(shape, dtype=np.complex64 if kind == "ones" else bool)
    a.flags.writeable = False
    return a


def _gradients_per_position(obj, probe, index, kernel, intensity, mask, cost, probe_gradient, out, rows, interval=1,
                            detector=None):
    """:func:`gradients` by :func:`daskptycho.physics._compiled.position_gradients`, or
    None when that path does not apply. Every shape and index is checked here: the
    compiled loops do not check bounds. ``interval``: the effective wave checkpoint interval;
    ``kernel`` the slice kernel (N_y, N_x) or None, ``detector`` the near-field detector
    transfer function (N_y, N_x) or None (far field)."""
    if intensity.dtype != np.float32 or not per_position_path(obj, probe):
        return None
    compiled, win = _fused_path(np, index, obj, probe)
    if compiled is None:
        return None
    n_slices = obj.shape[0]
    k, ny, nx = probe.shape
    if win.window != (ny, nx) or intensity.ndim != 3 or intensity.shape[1:] != (ny, nx):
        raise ValueError(f"windows {win.window} and patterns {intensity.shape[1:]} must match the probe's {(ny, nx)}")
    corners = np.ascontiguousarray(win.corners, dtype=np.int64)
    rows = np.arange(corners.shape[0], dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    if rows.shape != (corners.shape[0],) or (rows.size and (rows.min() < 0 or rows.max() >= intensity.shape[0])):
        raise ValueError(f"rows must give one pattern of the {intensity.shape[0]} for each of the {corners.shape[0]} positions")
    m = _read_only("mask", (ny, nx)) if mask is None else np.ascontiguousarray(np.broadcast_to(mask, (ny, nx)), dtype=bool)
    if n_slices > 1:
        if kernel is None or kernel.shape != (ny, nx):
            raise ValueError(f"kernel must be ({ny}, {nx}) with {n_slices} slices")
        k_fwd = np.ascontiguousarray(_scaled_kernel(kernel, np.complex64))
        k_adj = np.ascontiguousarray(_scaled_kernel(kernel.conj(), np.complex64))
    else:
        k_fwd = k_adj = _read_only("ones", (ny, nx))
    near = detector is not None
    if near:
        if detector.shape != (ny, nx):
            raise ValueError(f"the detector transfer function must be ({ny}, {nx}), got {detector.shape}")
        d_fwd = np.ascontiguousarray(_scaled_kernel(detector, np.complex64))
        d_adj = np.ascontiguousarray(_scaled_kernel(detector.conj(), np.complex64))
    else:  # not read
        d_fwd = d_adj = k_fwd

    def acc(name, shape, dtype):
        a = out.get(name) if out is not None else None
        if a is None:
            return np.zeros(shape, dtype=dtype)
        if a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"out[{name!r}] must be a C-contiguous {np.dtype(dtype)} array of shape {shape}")
        return a

    g_obj = acc("object", obj.shape, np.complex64)
    illum = acc("illumination", obj.shape, np.float32)
    if probe_gradient:
        gp, pil = acc("probe", probe.shape, np.complex64), acc("probe_illumination", (ny, nx), np.float32)
    else:  # not written; the arguments keep their types
        gp, pil = np.zeros((1, 1, 1), dtype=np.complex64), np.zeros((1, 1), dtype=np.float32)
    inc, wave, far = _position_scratch(position_scratch_waves(n_slices, interval), (k, ny, nx))
    plan_f, plan_b = fftw_plans(probe.shape)
    s2 = 1.0 if near else 1.0 / (ny * nx)  # near field: the detector wave comes out of a unitary propagation
    counts = np.zeros(1, dtype=np.int64)
    value = compiled.position_gradients(np.ascontiguousarray(obj), np.ascontiguousarray(probe), corners, rows,
                                        np.ascontiguousarray(intensity), m, k_fwd, k_adj, s2, 2 * s2, cost == "poisson",
                                        g_obj, illum, gp, pil, bool(probe_gradient), plan_f, plan_b, inc, wave, far, counts,
                                        int(interval), near, d_fwd, d_adj)
    FFT_TALLY["calls"] += 1
    FFT_TALLY["ffts"] += int(counts[0])
    FFT_TALLY["by_size"][nx] = FFT_TALLY["by_size"].get(nx, 0) + int(counts[0])
    result = {"object": g_obj, "illumination": illum, "cost": float(value)}
    if probe_gradient:
        result["probe"] = gp
        result["probe_illumination"] = pil
    return result


def gradients(obj, probe, index, kernel, intensity, mask=None, cost="amplitude", probe_gradient=True, out=None, rows=None,
              wave_checkpoints=None):
    """Cost, gradients and illumination for one batch of positions.

    Parameters
    ----------
    obj : complex array (S, H, W)
    probe : complex array (K, N, N)
    index : int array (J, N, N) from :func:`window_index`, or :class:`Windows`
    kernel : complex array (N, N) or None, or (2, N, N): the slice kernel and the
        near-field detector transfer function stacked (see :func:`forward`)
    intensity : real array (J, N, N), measured, **FFT order** (ifftshifted)
    mask : bool array (N, N) or None, FFT order
    cost : "amplitude" or "poisson"
    out : dict, optional: accumulators (see :func:`backward`)
    rows : int array (J,), optional
        Each position's pattern in ``intensity``, which is then (J_all, N, N); default:
        ``intensity`` holds exactly the J patterns, in order.
    wave_checkpoints : int >= 1, optional
        Keep the incident waves of every ``wave_checkpoints``-th slice only and recompute
        the others in the adjoint (:mod:`~daskptycho.physics.wave_checkpoints`): less
        memory per position, more FFTs, the same result. Default: the integer of
        ``daskptycho.reconstruct.wave_checkpoints``, or 1 (every wave kept) under ``auto``,
        which needs a memory budget: callers that have one pass
        :func:`~daskptycho.physics.wave_checkpoints.checkpoint_interval`'s.

    Returns
    -------
    dict: ``cost`` (float) and the entries of :func:`backward`.
    """
    if cost not in ("amplitude", "poisson"):
        raise ValueError(f"cost must be 'amplitude' or 'poisson', got {cost!r}")
    xp = get_array_module(obj, probe)
    if wave_checkpoints is None:
        wave_checkpoints = checkpoint_interval(obj.shape[0], probe.shape[0], probe.shape[-2:], None)
    interval = effective_interval(wave_checkpoints, obj.shape[0])
    if is_gpu(xp) and obj.dtype == np.complex64 and probe.dtype == np.complex64 \
            and (isinstance(index, Windows) or _rectangular_on_device(index, obj.shape)):
        # the device path: custom kernels, patterns read by row on the device
        from . import cuda

        win = index if isinstance(index, Windows) else _as_windows(cuda_index_to_host(index), obj.shape)
        corners = cuda.device_corners(win.corners, win.window, obj.shape[-2:], xp)
        rows_d = None if rows is None else xp.asarray(np.asarray(rows), dtype=xp.int32)
        result = cuda.gradients(obj, probe, corners, kernel, intensity.astype(xp.float32, copy=False), rows_d, mask, cost,
                                probe_gradient, out, wave_checkpoints=interval)
        result["cost"] = float(result["cost"])
        return result
    slice_kernel, detector = split_propagators(kernel)
    result = _gradients_per_position(obj, probe, index, slice_kernel, intensity, mask, cost, probe_gradient, out, rows,
                                     interval, detector)
    if result is not None:
        return result
    if rows is not None:
        intensity = intensity[get_array_module(intensity).asarray(rows)]
    # unnormalised far field: the 1/sqrt(N_y N_x) of both far-field FFTs is applied to
    # the cost's (J, N, N) intensities and weights instead of two passes over the waves
    # (near field: the detector propagation is unitary, nothing to fold)
    far, cache = forward(obj, probe, index, kernel, keep=True, _ortho=False, wave_checkpoints=interval)
    scale = 1.0 if detector is not None else 1.0 / np.sqrt(far.shape[-1] * far.shape[-2])
    value, g = cost_and_far_field_gradient(far, intensity, mask, cost, overwrite=True, far_scale=scale)
    result = backward(g, cache, index, obj.shape, kernel, probe_gradient, out, overwrite=True, _ortho=False)
    result["cost"] = value
    return result
