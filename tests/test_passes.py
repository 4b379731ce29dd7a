"""Tiling and gradient-decomposition pass graphs checked against independent facts.

* the four strip passes (``accumulate_passes``) leave on every tile, over its whole
  extended region, the sum of *every* tile's gradient buffer there: a hypothesis
  property over random R x C grids (1x1 .. 5x5), windows, halos (up to several
  cores wide, so non-adjacent tiles overlap), slices and tiles without positions,
  against a global NumPy accumulation;
* tiling invariants: cores partition the grid, windows sit in their own tile's
  extended region, ownership by centre pixel, contiguous covering blocks, errors;
* the structure of ``gd_iteration``: the pipelining independence the module
  documents (row 0's vertical backward pass never blocks row 2's horizontal passes),
  information crossing the whole grid, placements, rounds and the probe reduction,
  and that building a graph computes nothing;
* only strips travel between tiles, and a strip is exactly the overlap of the two
  tiles' extended regions.
"""

from __future__ import annotations

import itertools

import dask
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import daskptycho as dp
from daskptycho.geometry import ObjectGrid, object_grid
from daskptycho.schedule import Buffer, IterationGraph, accumulate_passes, gd_iteration, materialise
from daskptycho.schedule.passes import PROBE_STEPPERS, exchange_strips, neighbour_exchange
from daskptycho.tasks import tiles as tt
from daskptycho.tiling import intersect, make_tiling

PASSES = ("vfwd", "vbwd", "hfwd", "hbwd")
HORIZONTAL = ("hfwd-strip", "hbwd-strip")
# where a strip cut on tile (r, c) goes
STRIP_DEST = {"vfwd": (1, 0), "vbwd": (-1, 0), "hfwd": (0, 1), "hbwd": (0, -1)}
# the key names the passes module documents, plus the per-tile reduction inputs it adds
KEY_NAMES = {"grad", "update", "cost", "probe", "tile-cost", "tile-probe", "probe-sum"} | {f"{p}-strip" for p in PASSES}
STRIPS = tuple(f"{p}-strip" for p in PASSES)
UNPLACED = {"cost", "probe-sum"}


# --------------------------------------------------------------------------- helpers


def _min_halo(window):
    """The narrowest halo make_tiling accepts: N // 2 per axis (reference formula)."""
    return tuple(int(n) // 2 for n in window)


def _random_buffers(rng, tiling, n_slices):
    out = {}
    for t in tiling:
        shape = (n_slices, *t.shape)
        obj = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
        ill = rng.uniform(0.0, 2.0, shape).astype(np.float32)
        out[t.key] = {"object": obj, "illumination": ill}
    return out


def _reference_sums(tiling, buffers):
    """Each tile's expected buffer: every tile's buffer added into a global array, cropped."""
    H, W = tiling.grid.shape
    first = next(iter(buffers.values()))
    S = first["object"].shape[0]
    full = {"object": np.zeros((S, H, W), np.complex128), "illumination": np.zeros((S, H, W), np.float64)}
    for t in tiling:
        y0, y1, x0, x1 = t.extended
        for name in full:
            full[name][:, y0:y1, x0:x1] += buffers[t.key][name]
    return {t.key: {name: tiling.crop(full[name], t) for name in full} for t in tiling}


def _is_key(graph, v):
    return isinstance(v, tuple) and v in graph.tasks


def _run_passes(tiling, buffers, s=0):
    """Build the passes, execute them with the synchronous scheduler, return {tile: buffer}."""
    graph, final = accumulate_passes(tiling, s, dict(buffers))
    assert set(final) == {t.key for t in tiling}
    assert all(isinstance(b, Buffer) for b in final.values())
    final = materialise(tiling, s, final, graph)
    keys = [k for k, v in final.items() if _is_key(graph, v)]
    values = dask.get(graph.tasks, [final[k] for k in keys]) if keys else []
    result = dict(zip(keys, values))
    for k, v in final.items():
        if k not in result:
            # the buffer never changed (1x1 grid, or a tile nothing overlaps): the input itself
            assert v is buffers[k]
            result[k] = v
    return graph, result


def _assert_buffers_match(tiling, got, ref):
    scale = max(float(np.abs(r[name]).max(initial=0.0)) for r in ref.values() for name in r) or 1.0
    for t in tiling:
        assert got[t.key]["object"].dtype == np.complex64
        assert got[t.key]["illumination"].dtype == np.float32
        for name in ("object", "illumination"):
            assert got[t.key][name].shape == ref[t.key][name].shape, (t.key, name)
            np.testing.assert_allclose(got[t.key][name], ref[t.key][name], rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"tile {t.key} {name}")


def _non_adjacent_overlaps(tiling):
    """Pairs of tiles two or more rows or columns apart whose extended regions intersect."""
    out = []
    for a, b in itertools.combinations(tiling.tiles, 2):
        if max(abs(a.row - b.row), abs(a.col - b.col)) >= 2 and intersect(a.extended, b.extended) is not None:
            out.append((a.key, b.key))
    return out


def _lattice_tiling(shape=(3, 3), scan=(9, 9), step=3, window=(8, 8), halo_px=None):
    """A concrete tiling of a raster scan on a pixel lattice (via object_grid)."""
    dx = 1e-10
    pos = np.array([(i * step, j * step) for i in range(scan[0]) for j in range(scan[1])], float) * dx
    grid = object_grid(pos, window, dx, pad_px=2)
    corners = grid.window_corners(pos, window)
    return make_tiling(grid, corners, window, shape, halo_px=halo_px)


def _ancestors(graph):
    """``{key: every key it (transitively) depends on}``."""
    deps = graph.dependencies()
    memo = {}

    def visit(k):
        if k not in memo:
            acc = set()
            for d in deps[k]:
                acc.add(d)
                acc |= visit(d)
            memo[k] = acc
        return memo[k]

    for k in deps:
        visit(k)
    return memo


class _Token:
    """A placeholder argument: not a key, not callable, never executed."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


def _placeholders(tiling):
    states = {t.key: _Token(f"state{t.key}") for t in tiling}
    data = {t.key: _Token(f"data{t.key}") for t in tiling}
    return states, data, _Token("probe"), _Token("context")


# --------------------------------------------------------------------------- random tilings


@st.composite
def tilings(draw, max_tiles=5):
    """A random tiling: grid, scan, window, R x C, halo (from the minimum to several cores)."""
    R = draw(st.integers(1, max_tiles), label="R")
    C = draw(st.integers(1, max_tiles), label="C")
    window = (draw(st.integers(1, 9), label="Ny"), draw(st.integers(1, 9), label="Nx"))
    Ly = draw(st.integers(R, 24), label="scan rows of pixels")
    Lx = draw(st.integers(C, 24), label="scan cols of pixels")
    if draw(st.booleans(), label="raster scan"):
        sy, sx = draw(st.integers(1, 4), label="step y"), draw(st.integers(1, 4), label="step x")
        extra = [(i, j) for i in range(0, Ly, sy) for j in range(0, Lx, sx)]
    else:
        extra = draw(st.lists(st.tuples(st.integers(0, Ly - 1), st.integers(0, Lx - 1)), max_size=12))
    # the two scan extremes make the span exactly Ly x Lx; the rest is a raster or a sparse random scan
    pix = np.array([(0, 0), (Ly - 1, Lx - 1), *extra], dtype=np.int64)
    dx = draw(st.sampled_from([1.0, 0.25, 1e-10]))
    pad = draw(st.integers(0, 3), label="pad_px")
    positions_m = pix * dx + np.array([draw(st.integers(-5, 5)), draw(st.integers(-5, 5))]) * dx
    grid = object_grid(positions_m, window, dx, pad_px=pad)
    corners = grid.window_corners(positions_m, window)
    H, W = grid.shape
    need = _min_halo(window)
    core_y, core_x = -(-H // R), -(-W // C)
    hy = need[0] + draw(st.integers(0, 2) | st.integers(0, 3 * core_y + 2), label="extra halo y")
    hx = need[1] + draw(st.integers(0, 2) | st.integers(0, 3 * core_x + 2), label="extra halo x")
    tiling = make_tiling(grid, corners, window, (R, C), halo_px=(hy, hx))
    return tiling, corners, window


# --------------------------------------------------------------------------- 1. the passes sum over all tiles


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tilings(), n_slices=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_passes_leave_the_sum_over_every_tile_on_every_tile(case, n_slices, seed):
    tiling, _, window = case
    rng = np.random.default_rng(seed)
    buffers = _random_buffers(rng, tiling, n_slices)
    before = {k: {n: v.copy() for n, v in b.items()} for k, b in buffers.items()}

    far = _non_adjacent_overlaps(tiling)
    empty = [t.key for t in tiling if t.positions.size == 0]
    note(f"{tiling.rows}x{tiling.cols} tiles, grid {tiling.grid.shape}, window {window}, halo {tiling.halo}, "
         f"non-adjacent overlaps {far[:4]}, empty tiles {empty}")
    event("non-adjacent tiles overlap" if far else "only neighbours overlap")
    event("some tile has no positions" if empty else "every tile has positions")
    event("1x1 grid" if tiling.rows * tiling.cols == 1 else "several tiles")

    _, got = _run_passes(tiling, buffers)
    _assert_buffers_match(tiling, got, _reference_sums(tiling, buffers))
    # the tasks are pure: the input buffers are untouched
    for k, b in buffers.items():
        for n in b:
            np.testing.assert_array_equal(b[n], before[k][n])


def _run_strips(build, tiling, buffers, s=0):
    graph, final = build(tiling, s, dict(buffers))
    final = materialise(tiling, s, final, graph)
    keys = [k for k, v in final.items() if _is_key(graph, v)]
    out = dict(zip(keys, dask.get(graph.tasks, [final[k] for k in keys]) if keys else []))
    return {k: out.get(k, v) for k, v in final.items()}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tilings(), n_slices=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_neighbour_exchange_gives_the_passes_sums_bit_for_bit(case, n_slices, seed):
    # where no pixel lies in three tiles along an axis, each pair of neighbours adding the
    # other's strip is the forward and backward passes (a + b == b + a in floating point)
    tiling, _, _ = case
    if not neighbour_exchange(tiling):
        event("a pixel in three tiles along an axis: the chains")
        three = [(a, b) for a, b in _non_adjacent_overlaps(tiling) if a[0] == b[0] or a[1] == b[1]]
        assert three or any(  # tiles two apart overlap, or a middle tile's two overlaps meet
            intersect(tiling.overlap((r - 1, c), (r, c)), tiling.overlap((r, c), (r + 1, c))) is not None
            for r in range(1, tiling.rows - 1) for c in range(tiling.cols)) or any(
            intersect(tiling.overlap((r, c - 1), (r, c)), tiling.overlap((r, c), (r, c + 1))) is not None
            for r in range(tiling.rows) for c in range(1, tiling.cols - 1))
        return
    event("neighbour exchange")
    buffers = _random_buffers(np.random.default_rng(seed), tiling, n_slices)
    chained, paired = (_run_strips(build, tiling, buffers) for build in (accumulate_passes, exchange_strips))
    for t in tiling:
        for name in ("object", "illumination"):
            np.testing.assert_array_equal(paired[t.key][name], chained[t.key][name], err_msg=f"tile {t.key} {name}")


def test_passes_with_a_halo_spanning_several_tiles():
    """5x1 tiles, a huge halo: tile 0 reaches past tile 1 into tiles 2, 3 and 4."""
    dx = 1.0
    pos = np.array([(i, 0) for i in range(40)], float)
    window = (4, 4)
    grid = object_grid(pos, window, dx)
    tiling = make_tiling(grid, grid.window_corners(pos, window), window, (5, 1), halo_px=(20, 2))
    assert tiling.rows == 5 and tiling.cols == 1
    assert intersect(tiling[0, 0].extended, tiling[2, 0].extended) is not None
    assert intersect(tiling[0, 0].extended, tiling[4, 0].extended) is not None
    assert ((0, 0), (2, 0)) in _non_adjacent_overlaps(tiling)
    for n_slices in (1, 2):
        buffers = _random_buffers(np.random.default_rng(n_slices), tiling, n_slices)
        _, got = _run_passes(tiling, buffers)
        _assert_buffers_match(tiling, got, _reference_sums(tiling, buffers))


def test_passes_with_non_adjacent_overlaps_in_both_directions():
    tiling = _lattice_tiling(shape=(4, 5), scan=(12, 12), step=2, window=(6, 5), halo_px=(15, 13))
    far = _non_adjacent_overlaps(tiling)
    assert any(abs(a[0] - b[0]) >= 2 and abs(a[1] - b[1]) >= 2 for a, b in far)  # diagonal, two apart
    buffers = _random_buffers(np.random.default_rng(7), tiling, 2)
    _, got = _run_passes(tiling, buffers)
    _assert_buffers_match(tiling, got, _reference_sums(tiling, buffers))


def test_tiles_without_positions_take_part_in_the_passes():
    """Only two scan positions (two opposite corners) and 3x3 tiles: most tiles own nothing."""
    window = (6, 6)
    pos = np.array([(0.0, 0.0), (20.0, 20.0)])
    grid = object_grid(pos, window, 1.0, pad_px=1)
    tiling = make_tiling(grid, grid.window_corners(pos, window), window, (3, 3))
    empty = [t.key for t in tiling if t.positions.size == 0]
    assert len(empty) == 7 and (1, 1) in empty
    assert tiling[0, 0].positions.tolist() == [0] and tiling[2, 2].positions.tolist() == [1]
    buffers = _random_buffers(np.random.default_rng(3), tiling, 1)
    graph, got = _run_passes(tiling, buffers)
    ref = _reference_sums(tiling, buffers)
    _assert_buffers_match(tiling, got, ref)
    # the empty middle tile sends and receives strips like any other
    _, final = accumulate_passes(tiling, 0, buffers)
    assert ("vfwd-strip", 0, 1, 1) in graph.tasks and ("vfwd-strip", 0, 0, 1) in final[1, 1].strips
    assert ("hbwd-strip", 0, 1, 2) in final[1, 1].strips and ("hbwd-strip", 0, 1, 1) in final[1, 0].strips


def test_one_by_one_grid_returns_the_input_buffer():
    window = (4, 4)
    pos = np.array([(0.0, 0.0), (5.0, 3.0)])
    grid = object_grid(pos, window, 1.0)
    tiling = make_tiling(grid, grid.window_corners(pos, window), window, (1, 1))
    buf = _random_buffers(np.random.default_rng(0), tiling, 2)
    graph, final = accumulate_passes(tiling, 0, buf)
    assert graph.tasks == {} and final[(0, 0)].base is buf[(0, 0)] and final[(0, 0)].strips == ()
    assert materialise(tiling, 0, final, graph)[(0, 0)] is buf[(0, 0)] and graph.tasks == {}


def test_passes_extend_a_given_graph_and_keep_round_numbers_apart():
    tiling = _lattice_tiling()
    buffers = _random_buffers(np.random.default_rng(1), tiling, 1)
    graph = IterationGraph()
    g1, final1 = accumulate_passes(tiling, 4, buffers, graph)
    g2, final2 = accumulate_passes(tiling, 5, final1, graph)
    assert g1 is graph and g2 is graph
    assert {k[1] for k in graph.tasks} == {4, 5}
    # round 5 starts from round 4's results (keys, not values)
    deps = graph.dependencies()
    assert all(any(d[1] == 4 for d in deps[k]) for k in graph.tasks if k[0] == "vfwd-strip" and k[1] == 5 and k[2] == 0)
    final2 = materialise(tiling, 5, final2, graph)
    got = dict(zip(final2, dask.get(graph.tasks, list(final2.values()))))
    once = _reference_sums(tiling, buffers)
    twice = _reference_sums(tiling, {k: {n: v.astype(np.complex64 if n == "object" else np.float32) for n, v in b.items()}
                                         for k, b in once.items()})
    _assert_buffers_match(tiling, got, twice)


# --------------------------------------------------------------------------- 2. tiling


@settings(max_examples=60, deadline=None, database=None)
@given(case=tilings())
def test_tiling_invariants(case):
    tiling, corners, window = case
    H, W = tiling.grid.shape
    R, C = tiling.rows, tiling.cols
    assert len(tiling.tiles) == R * C
    assert len(tiling.row_edges) == R + 1 and len(tiling.col_edges) == C + 1

    # cores partition the grid: every pixel in exactly one core, none empty
    count = np.zeros((H, W), int)
    for t in tiling:
        assert tiling[t.key] is t and t.key == (t.row, t.col)
        y0, y1, x0, x1 = t.core
        assert 0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W
        count[y0:y1, x0:x1] += 1
        # extended region: the core grown by the halo, clipped to the grid
        hy, hx = tiling.halo
        assert t.extended == (max(0, y0 - hy), min(H, y1 + hy), max(0, x0 - hx), min(W, x1 + hx))
        assert t.shape == (t.extended[1] - t.extended[0], t.extended[3] - t.extended[2])
        assert t.local(t.extended) == (slice(0, t.shape[0]), slice(0, t.shape[1]))
    assert (count == 1).all()

    # every position in exactly one tile: the one whose core holds its window's centre pixel
    owner = {}
    for t in tiling:
        assert np.all(np.diff(t.positions) > 0)
        for j in t.positions.tolist():
            assert j not in owner
            owner[j] = t
    assert sorted(owner) == list(range(len(corners)))
    for j, (cy, cx) in enumerate(corners):
        t = owner[j]
        py, px = cy + window[0] // 2, cx + window[1] // 2
        y0, y1, x0, x1 = t.core
        assert y0 <= py < y1 and x0 <= px < x1
        # the probe window lies inside the owner's extended region
        ey0, ey1, ex0, ex1 = t.extended
        assert ey0 <= cy and cy + window[0] <= ey1 and ex0 <= cx and cx + window[1] <= ex1
        sy, sx = t.local((cy, cy + window[0], cx, cx + window[1]))
        assert 0 <= sy.start and sy.stop <= t.shape[0] and 0 <= sx.start and sx.stop <= t.shape[1]

    # for every pixel, the covering tiles form a block of contiguous rows x contiguous columns
    cover = np.zeros((H, W, R, C), bool)
    for t in tiling:
        y0, y1, x0, x1 = t.extended
        cover[y0:y1, x0:x1, t.row, t.col] = True
    rows_any = cover.any(axis=3)   # (H, W, R)
    cols_any = cover.any(axis=2)   # (H, W, C)
    assert (cover == (rows_any[..., :, None] & cols_any[..., None, :])).all()   # a full block
    assert rows_any.any(axis=2).all() and cols_any.any(axis=2).all()             # never uncovered

    def contiguous(mask):  # (..., n) bool: True runs have a single start
        starts = mask & ~np.concatenate([np.zeros(mask.shape[:-1] + (1,), bool), mask[..., :-1]], axis=-1)
        return starts.sum(axis=-1) == 1

    assert contiguous(rows_any).all() and contiguous(cols_any).all()


def test_halo_narrower_than_the_window_needs_raises():
    window = (8, 7)
    pos = np.array([(i, j) for i in range(0, 20, 2) for j in range(0, 20, 2)], float)
    grid = object_grid(pos, window, 1.0)
    corners = grid.window_corners(pos, window)
    need = _min_halo(window)
    assert need == (4, 3)
    ok = make_tiling(grid, corners, window, (2, 2), halo_px=need)        # the minimum is accepted
    assert ok.halo == need
    assert make_tiling(grid, corners, window, (2, 2)).halo == need       # and is the default
    for bad in [(need[0] - 1, need[1]), (need[0], need[1] - 1), (0, 0)]:
        with pytest.raises(dp.OptionsError) as info:
            make_tiling(grid, corners, window, (2, 2), halo_px=bad)
        assert "halo" in str(info.value)


def test_more_tiles_than_scan_pixels_raises():
    window = (4, 4)
    pos = np.array([(i, j) for i in range(3) for j in range(5)], float)   # centre span 3 x 5 px
    grid = object_grid(pos, window, 1.0)
    corners = grid.window_corners(pos, window)
    t = make_tiling(grid, corners, window, (3, 5))                        # exactly the span: fine
    assert all(t_.positions.size == 1 for t_ in t)                        # one position per 1-px core
    for tiles in [(4, 1), (1, 6), (4, 6)]:
        with pytest.raises(dp.OptionsError) as info:
            make_tiling(grid, corners, window, tiles)
        assert info.value.option == "tiles"
        assert "tiles" in str(info.value)


def test_stitch_cores_and_crop_round_trip():
    tiling = _lattice_tiling(shape=(3, 4), window=(6, 6))
    rng = np.random.default_rng(0)
    full = (rng.standard_normal((2, *tiling.grid.shape)) + 1j * rng.standard_normal((2, *tiling.grid.shape))).astype(np.complex64)
    cores = {}
    for t in tiling:
        patch = tiling.crop(full, t)
        assert patch.shape == (2, *t.shape)
        assert not np.shares_memory(patch, full)
        (y0, y1, x0, x1) = t.core
        sy, sx = t.local(t.core)
        np.testing.assert_array_equal(patch[:, sy, sx], full[:, y0:y1, x0:x1])
        cores[t.key] = patch[:, sy, sx]
    out = tiling.stitch_cores(cores)
    assert out.dtype == full.dtype and out.shape == full.shape
    np.testing.assert_array_equal(out, full)
    # any leading shape
    out2 = tiling.stitch_cores({k: v[0] for k, v in cores.items()})
    np.testing.assert_array_equal(out2, full[0])


# --------------------------------------------------------------------------- 3. gd_iteration structure


@pytest.fixture(scope="module")
def tiling33():
    return _lattice_tiling()


def test_row0_vertical_backward_never_blocks_row2_horizontal_passes(tiling33):
    g = gd_iteration(tiling33, 0, *_placeholders(tiling33))
    anc = _ancestors(g)
    # the strips that rows 0 and 1 receive in the vertical backward pass (cut on rows 1 and 2)
    src = [k for k in g.tasks if k[0] == "vbwd-strip"]
    dst = [k for k in g.tasks if k[0] in HORIZONTAL and k[2] == 2]
    assert len(src) == 2 * 3 and len(dst) == 2 * 2      # hfwd/hbwd strips: 2 per row each
    for a in src:
        for b in dst:
            assert a not in anc[b], (a, b)
    # the graph's own traversal agrees
    assert not g.reaches(("vbwd-strip", 0, 1, 0), ("hfwd-strip", 0, 2, 1))
    assert not g.reaches(("vbwd-strip", 0, 2, 1), ("hbwd-strip", 0, 2, 2))
    # row 2 is the last row: its horizontal passes and updates need only the forward pass
    for b in dst + [("update", 0, 2, c) for c in range(3)]:
        assert not any(k[0] == "vbwd-strip" for k in anc[b]), b
        assert any(k[0] == "vfwd-strip" for k in anc[b]), b


def _overlapping(tiling, a, b):
    return intersect(tiling[a].extended, tiling[b].extended) is not None


def test_information_crosses_the_grid(tiling33):
    g = gd_iteration(tiling33, 0, *_placeholders(tiling33))
    anc = _ancestors(g)
    # row 2's horizontal forward strips carry row 2's own vertical forward sums
    for c in (0, 1):
        assert ("vfwd-strip", 0, 1, c) in anc[("hfwd-strip", 0, 2, c)]
        assert ("vfwd-strip", 0, 0, c) not in anc[("hfwd-strip", 0, 2, c)]     # row 0 shares no pixel with row 2
    # every tile's update sees the gradient of every tile whose extended region meets its own
    keys = [t.key for t in tiling33]
    for a, b in itertools.product(keys, keys):
        if _overlapping(tiling33, a, b):
            assert ("grad", 0, *b) in anc[("update", 0, *a)], (a, b)
    # and waits for no more than it needs: (0, 0) and (2, 2) share no pixel here
    assert not _overlapping(tiling33, (0, 0), (2, 2))
    assert ("grad", 0, 2, 2) not in anc[("update", 0, 0, 0)] and ("grad", 0, 0, 0) not in anc[("update", 0, 2, 2)]
    assert not g.reaches(("update", 0, 0, 0), ("grad", 0, 2, 2))


def test_an_exchange_is_one_task_and_a_strip_waits_only_for_strips_that_reach_it(tiling33):
    """Each exchange adds one task (the strip, cut on the sender); the receiver applies it
    where it next reads its buffer. A strip depends on the strips its tile received only
    where those touch its pixels: with halos under half a core a column's passes are
    pairwise exchanges, all at once; with wider halos the paper's chains remain."""
    g = gd_iteration(tiling33, 0, *_placeholders(tiling33))
    names = [k[0] for k in g.tasks]
    assert sorted(set(names)) == sorted({"grad", "update", "tile-cost", "cost", *STRIPS})
    assert len([n for n in names if n in STRIPS]) == 4 * 3 * 2
    deps = g.dependencies()
    ov = tiling33.overlap
    reaches = intersect(ov((0, 0), (1, 0)), ov((1, 0), (2, 0))) is not None
    assert not reaches  # this tiling's halos are narrower than half a core
    # narrow halos: each pair of neighbours exchanges at once, both strips cut from the gradients
    assert neighbour_exchange(tiling33)
    assert deps[("vfwd-strip", 0, 1, 0)] == {("grad", 0, 1, 0)}
    assert deps[("vbwd-strip", 0, 2, 0)] == {("grad", 0, 2, 0)}
    # an update applies every strip its tile received, vertical ones first, each added
    upd = g.tasks[("update", 0, 1, 1)]
    assert upd[0] is tt.tile_update and upd[3] == ("grad", 0, 1, 1)
    assert upd[4] == [("vfwd-strip", 0, 0, 1), ("vbwd-strip", 0, 2, 1), ("hfwd-strip", 0, 1, 0), ("hbwd-strip", 0, 1, 2)]
    assert [op for op, _ in upd[5]] == ["add", "add", "add", "add"]
    # the paper's chains, built for the same tiling: the last forward receiver sends back
    # what it received added to its own, and a backward strip replaces
    _, chained = accumulate_passes(tiling33, 0, {t.key: ("grad", 0, *t.key) for t in tiling33}, IterationGraph())
    assert [op for op, _ in chained[(1, 1)].patches] == ["add", "replace", "add", "replace"]
    # a horizontal strip carries the vertical sums at its corners
    assert ("vfwd-strip", 0, 0, 0) in deps[("hfwd-strip", 0, 1, 0)] and ("vbwd-strip", 0, 2, 0) in deps[("hfwd-strip", 0, 1, 0)]

    # halos wider than half a core: the forward pass chains down the column again
    wide = _lattice_tiling(shape=(3, 1), scan=(12, 4), step=2, window=(6, 5), halo_px=(8, 3))
    assert intersect(wide.overlap((0, 0), (1, 0)), wide.overlap((1, 0), (2, 0))) is not None
    assert not neighbour_exchange(wide)
    gw = gd_iteration(wide, 0, *_placeholders(wide))
    assert gw.dependencies()[("vfwd-strip", 0, 1, 0)] == {("grad", 0, 1, 0), ("vfwd-strip", 0, 0, 0)}
    assert gw.reaches(("vfwd-strip", 0, 0, 0), ("vbwd-strip", 0, 1, 0))


def test_building_the_graph_computes_nothing(tiling33, monkeypatch):
    calls = []
    patched = {}
    for name in ("tile_gradient", "cut_strip", "apply_patches", "tile_update",
                 "probe_part", "add_parts", "probe_update"):
        def fake(*args, _name=name, **kwargs):
            calls.append(_name)
            raise AssertionError(f"{_name} ran while building the graph")
        fake.__name__ = f"fake_{name}"
        patched[name] = fake
        monkeypatch.setattr(tt, name, fake)

    states, data, probe, ctx = _placeholders(tiling33)
    states_in = dict(states)
    g = gd_iteration(tiling33, 2, states, data, probe, ctx, rounds=2, refine_probe=True)
    assert calls == []
    assert states == states_in                       # the caller's dict is left alone

    func_of = {"grad": "tile_gradient", "update": "tile_update", "tile-probe": "probe_part",
               "probe-sum": "add_parts", "probe": "probe_update"}
    func_of.update({f"{p}-strip": "cut_strip" for p in PASSES})
    for key, task in g.tasks.items():
        assert isinstance(key, tuple) and isinstance(key[0], str) and key[0] in KEY_NAMES, key
        assert key[1] in (4, 5)                                   # s = it * rounds + round
        if key[0] in func_of:
            assert task[0] is patched[func_of[key[0]]], key
        if key[0] == "probe-sum":  # a sum runs on its first part's tile (a worker's parts are summed there)
            assert g.placement[key] in {t.key for t in tiling33}, key
        elif key[0] == "probe":  # on the tile holding the total: no scheduler task between a block's rounds
            assert g.placement[key] == (0, 0), key
        elif key[0] in UNPLACED:
            assert key not in g.placement, key
        else:
            assert g.placement[key] == tuple(key[-2:]), key
    assert set(g.placement) <= set(g.tasks)

    # a strip is cut on the sending tile, from that tile's own gradient buffer and the
    # strips it has received, for one neighbour; only that neighbour's tasks read it
    deps = g.dependencies()
    dependents = {k: [d for d in g.tasks if k in deps[d]] for k in g.tasks}
    strips = [k for k in g.tasks if k[0].endswith("-strip")]
    assert len(strips) == 2 * 4 * 3 * 2                # 2 rounds x 4 passes x 3 lines x 2 sends per line

    def dest(k):
        dy, dx = STRIP_DEST[k[0][: -len("-strip")]]
        return (k[2] + dy, k[3] + dx)

    for k in strips:
        src = g.placement[k]
        own = [d for d in deps[k] if d[0] not in STRIPS]
        assert own == [("grad", k[1], *src)], k                        # its one buffer: the sender's gradient
        assert all(dest(d) == src for d in deps[k] if d[0] in STRIPS), k   # and strips sent to the sender
        assert dependents[k] and all(g.placement[d] == dest(k) for d in dependents[k]), k
        assert ("update", k[1], *dest(k)) in dependents[k]


def test_only_strips_cross_tiles(tiling33):
    g = gd_iteration(tiling33, 0, *_placeholders(tiling33), rounds=2, refine_probe=True)
    deps = g.dependencies()
    for k, ds in deps.items():
        if k not in g.placement:
            continue
        for d in ds:
            assert d in g.placement, (k, d)               # no unplaced task feeds a tile's
            if d[0] == "probe" and g.placement[d] != g.placement[k]:  # the new probe comes back
                assert k[0] in ("grad", "probe"), (k, d)
                continue
            if g.placement[d] != g.placement[k] and k[0] in ("probe-sum", "probe"):
                assert d[0] in ("tile-probe", "probe-sum"), (k, d)  # the small probe parts, summed on a tile
                continue
            if g.placement[d] != g.placement[k]:
                assert d[0].endswith("-strip"), (k, d)
                (r0, c0), (r1, c1) = g.placement[d], g.placement[k]
                assert abs(r0 - r1) + abs(c0 - c1) == 1, (k, d)


def test_two_rounds(tiling33):
    it = 3
    g = gd_iteration(tiling33, it, *_placeholders(tiling33), rounds=2)
    assert {k[1] for k in g.tasks} == {2 * it, 2 * it + 1}
    s0, s1 = 2 * it, 2 * it + 1
    for t in tiling33:
        r, c = t.key
        task = g.tasks[("grad", s1, r, c)]
        assert task[1] == ("update", s0, r, c)                # round 2 starts from round 1's update
        # the rounds split the tile's own positions, interleaved (each round spreads over the tile)
        local0, local1 = g.tasks[("grad", s0, r, c)][3], task[3]
        np.testing.assert_array_equal(np.sort(np.concatenate([local0, local1])), np.arange(t.positions.size))
        np.testing.assert_array_equal(local0, np.arange(0, t.positions.size, 2))
        for name in STRIPS:
            assert any(k[0] == name and k[1] == s1 for k in g.tasks)
    anc = _ancestors(g)
    for r, c in itertools.product(range(3), range(3)):
        assert g.reaches(("update", s0, r, c), ("grad", s1, r, c))
        for r2, c2 in itertools.product(range(3), range(3)):
            # through its own update, each tile's second round has seen the first-round gradient
            # of every tile that shares pixels with it
            if _overlapping(tiling33, (r, c), (r2, c2)):
                assert ("grad", s0, r2, c2) in anc[("grad", s1, r, c)]
            if (r2, c2) != (r, c):                              # but no other tile's state
                assert ("update", s0, r2, c2) not in anc[("grad", s1, r, c)]
    assert g.outputs["states"] == {t.key: ("update", s1, *t.key) for t in tiling33}
    # one cost per iteration: the rounds' sums of the tiles' costs, added in round order
    assert g.outputs["costs"] == [("cost", s0)]
    total = g.tasks[("cost", s0)]
    assert total[0] is sum and [part[1] for part in total[1]] == [
        [("tile-cost", s, *t.key) for t in tiling33] for s in (s0, s1)]
    assert not any(k[0] in ("probe", "probe-sum", "tile-probe") for k in g.tasks)
    assert isinstance(g.outputs["probe"], _Token)               # the input, untouched


def test_refine_probe_tree_reduction(tiling33):
    states, data, probe, ctx = _placeholders(tiling33)
    g = gd_iteration(tiling33, 0, states, data, probe, ctx, rounds=2, refine_probe=True)
    anc = _ancestors(g)
    for s in (0, 1):
        assert ("probe", s) in g.tasks
        sums = [k for k in g.tasks if k[0] == "probe-sum" and k[1] == s]
        assert len(sums) == 9 - 1                                 # a binary tree over 9 tiles
        parts = [("tile-probe", s, *t.key) for t in tiling33]
        for p in parts:
            assert p in anc[("probe", s)]
            assert g.placement[p] == p[-2:]
        # the tree root feeds the probe update; tree nodes take exactly two inputs
        assert all(len(g.dependencies()[k]) == 2 for k in sums)
        # every tile's probe gradient part comes from its own gradient task
        for t in tiling33:
            assert g.tasks[("tile-probe", s, *t.key)][1:] == (("grad", s, *t.key),)
            assert g.tasks[("grad", s, *t.key)][7] is True          # refine_probe reaches the task
        # the object updates do not wait on the probe reduction
        for t in tiling33:
            assert ("probe", s) not in anc[("update", s, *t.key)]
    # round 1's gradients use round 0's new probe; round 0's the input probe
    for t in tiling33:
        assert g.tasks[("grad", 1, *t.key)][4] == ("probe", 0)
        assert g.tasks[("grad", 0, *t.key)][4] is probe
    assert g.tasks[("probe", 0)][1] is probe and g.tasks[("probe", 1)][1] == ("probe", 0)
    assert g.tasks[("probe", 0)][3] is ctx
    assert g.outputs["probe"] == ("probe", 1)


def test_gd_iteration_wiring_executes_to_the_all_reduce(tiling33, monkeypatch):
    """Stand-in tile tasks: the gradient buffer is the state, the update returns the
    accumulated buffer. Every tile must end with the sum over all tiles of its region."""
    rng = np.random.default_rng(5)
    bufs = _random_buffers(rng, tiling33, 2)

    def fake_gradient(state, data, local, probe, ctx, tile, refine_probe, local_updates):
        assert tile == data                     # each tile's task gets its own data
        return {**state, "cost": float(len(local))}

    monkeypatch.setattr(tt, "tile_gradient", fake_gradient)
    monkeypatch.setattr(tt, "tile_update", lambda state, grad, buf, strips, patches, ctx, n: tt.apply_patches(buf, strips, patches))
    g = gd_iteration(tiling33, 0, bufs, {t.key: t.key for t in tiling33}, None, None)
    keys = list(g.outputs["states"].values()) + g.outputs["costs"]
    *out, cost = dask.get(g.tasks, keys)
    got = dict(zip(g.outputs["states"], out))
    _assert_buffers_match(tiling33, got, _reference_sums(tiling33, bufs))
    assert cost == sum(t.positions.size for t in tiling33)


# --------------------------------------------------------------------------- 4. only strips travel


def test_strips_are_exactly_the_overlaps(tiling33):
    buffers = _random_buffers(np.random.default_rng(2), tiling33, 2)
    graph, final = accumulate_passes(tiling33, 0, buffers)
    strips = [k for k in graph.tasks if k[0].endswith("-strip")]
    assert len(strips) == 4 * 3 * 2
    out = dict(zip(strips, dask.get(graph.tasks, strips)))
    for k, strip in out.items():
        name = k[0][: -len("-strip")]
        src = tuple(k[2:])
        dy, dx = STRIP_DEST[name]
        dst = (src[0] + dy, src[1] + dx)
        ov = intersect(tiling33[src].extended, tiling33[dst].extended)
        assert ov is not None and ov == tiling33.overlap(src, dst)
        shape = (2, ov[1] - ov[0], ov[3] - ov[2])
        assert strip["object"].shape == shape and strip["illumination"].shape == shape, k
        assert strip["object"].dtype == np.complex64 and strip["illumination"].dtype == np.float32
        for t in (tiling33[src], tiling33[dst]):
            assert shape[1] * shape[2] < t.shape[0] * t.shape[1]
            assert shape[1] <= t.shape[0] and shape[2] <= t.shape[1]
        # the receiver applies it on the same global pixels: added forward, pasted backward
        i = final[dst].strips.index(k)
        assert final[dst].patches[i] == ("add" if name.endswith("fwd") else "replace", tiling33[dst].local(ov))
        # a strip is a copy, not a view into the sender's buffer
        for n in ("object", "illumination"):
            assert strip[n].base is None or not np.shares_memory(strip[n], buffers[src][n])
    # a vertical strip keeps the full tile width, a horizontal one the full tile height
    v = out[("vfwd-strip", 0, 0, 1)]["object"]
    h = out[("hfwd-strip", 0, 1, 0)]["object"]
    assert v.shape[2] == tiling33[0, 1].shape[1] and v.shape[1] < tiling33[0, 1].shape[0]
    assert h.shape[1] == tiling33[1, 0].shape[0] and h.shape[2] < tiling33[1, 0].shape[1]


def test_passes_on_a_hand_made_grid():
    """An ObjectGrid made by hand (no object_grid) works the same way."""
    grid = ObjectGrid((0.0, 0.0), (31, 23), 1.0)
    window = (5, 4)
    corners = np.array([(y, x) for y in range(0, 27, 2) for x in range(0, 20, 3)])
    tiling = make_tiling(grid, corners, window, (4, 3), halo_px=(9, 2))
    buffers = _random_buffers(np.random.default_rng(11), tiling, 1)
    _, got = _run_passes(tiling, buffers)
    _assert_buffers_match(tiling, got, _reference_sums(tiling, buffers))


@settings(max_examples=40, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5))
def test_a_strip_cut_from_received_strips_equals_the_cut_of_the_materialised_buffer(seed, n):
    """apply_patches on a region gives bit for bit the pixels of adding and pasting each
    strip into a full copy in turn (what a pass task that materialises its buffer does)."""
    rng = np.random.default_rng(seed)
    S, h, w = 2, 13, 11
    buf = {"object": (rng.standard_normal((S, h, w)) + 1j * rng.standard_normal((S, h, w))).astype(np.complex64),
           "illumination": rng.uniform(0, 2, (S, h, w)).astype(np.float32), "cost": 1.0}
    before = {k: np.copy(v) for k, v in buf.items()}

    def region():
        y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
        return slice(int(y0), int(rng.integers(y0 + 1, h + 1))), slice(int(x0), int(rng.integers(x0 + 1, w + 1)))

    patches, strips = [], []
    for _ in range(n):
        where = region()
        shape = (S, where[0].stop - where[0].start, where[1].stop - where[1].start)
        strips.append({"object": (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64),
                       "illumination": rng.uniform(0, 2, shape).astype(np.float32)})
        patches.append((str(rng.choice(["add", "replace"])), where))
    full = {k: buf[k].copy() for k in ("object", "illumination")}
    for strip, (op, (sy, sx)) in zip(strips, patches):
        for k in full:
            if op == "add":
                full[k][..., sy, sx] += strip[k]
            else:
                full[k][..., sy, sx] = strip[k]
    whole = tt.apply_patches(buf, strips, patches)
    want = region()
    cut = tt.cut_strip(buf, strips, patches, want)
    for k in full:
        np.testing.assert_array_equal(whole[k], full[k])
        np.testing.assert_array_equal(cut[k], full[k][..., want[0], want[1]])
        assert not np.shares_memory(cut[k], buf[k]) and cut[k].dtype == buf[k].dtype
        np.testing.assert_array_equal(buf[k], before[k])          # the gradient buffer is never changed
    with pytest.raises(ValueError, match="unknown patch operation"):
        tt.apply_patches(buf, strips[:1], [("multiply", patches[0][1])])


def test_the_update_steps_in_its_own_copy_with_the_same_bits():
    from daskptycho.tasks.updates import object_step, object_step_consuming

    rng = np.random.default_rng(4)
    shape = (3, 17, 19)
    obj = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    grad = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    ill = rng.uniform(0, 3, shape).astype(np.float32)
    # the step written out (a real factor times the gradient), shared among the 3 slices
    want = obj - grad * ((0.7 / 3 / 2) / (ill + 1e-3))
    g, i = grad.copy(), ill.copy()
    got = object_step_consuming(obj, g, i, 0.7, 1e-3)
    assert got.dtype == np.complex64
    np.testing.assert_array_equal(got, want)
    # and the diagonal Gauss-Newton step it is, to float32 rounding
    exact = obj.astype(np.complex128) - 0.7 / 3 * grad.astype(np.complex128) / (2 * (ill.astype(np.float64) + 1e-3))
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
    np.testing.assert_array_equal(object_step(obj, grad, ill, 0.7, 1e-3), want)
    assert not np.array_equal(g, grad)                          # it worked in the copies it was given
    # a part of the slices with the whole object's count: the same pixels
    np.testing.assert_array_equal(object_step_consuming(obj[1:2], grad[1:2].copy(), ill[1:2].copy(), 0.7, 1e-3, slices=3), want[1:2])


def test_the_update_applies_the_strips_slice_by_slice_with_the_same_bits():
    from daskptycho.tasks.updates import object_step

    rng = np.random.default_rng(8)
    S, h, w = 3, 12, 10
    state = (rng.standard_normal((S, h, w)) + 1j * rng.standard_normal((S, h, w))).astype(np.complex64)
    buf = {"object": (rng.standard_normal((S, h, w)) + 1j * rng.standard_normal((S, h, w))).astype(np.complex64),
           "illumination": rng.uniform(0, 2, (S, h, w)).astype(np.float32), "cost": 2.0}
    patches = [("add", (slice(0, 4), slice(0, w))), ("replace", (slice(0, 4), slice(0, w))), ("add", (slice(0, h), slice(7, 10)))]
    strips = [{"object": (rng.standard_normal((S, ry.stop - ry.start, rx.stop - rx.start))).astype(np.complex64),
               "illumination": rng.uniform(0, 2, (S, ry.stop - ry.start, rx.stop - rx.start)).astype(np.float32)}
              for _, (ry, rx) in patches]

    class Ctx:
        step, eps_per_position, amplitude_max = 0.8, 1e-4, None

    got = tt.tile_update(state, None, buf, strips, patches, Ctx, 5)
    full = tt.apply_patches(buf, strips, patches)
    np.testing.assert_array_equal(got, object_step(state, full["object"], full["illumination"], 0.8, 5e-4))

    class Clipped(Ctx):
        amplitude_max = 1.0

    got = tt.tile_update(state, None, buf, strips, patches, Clipped, 5)
    np.testing.assert_array_equal(got, object_step(state, full["object"], full["illumination"], 0.8, 5e-4, amplitude_max=1.0))
    assert np.abs(got).max() <= 1 + 1e-6
    # no strips (one tile): the gradient buffer as it is
    np.testing.assert_array_equal(tt.tile_update(state, None, buf, [], (), Ctx, 5),
                                  object_step(state, buf["object"], buf["illumination"], 0.8, 5e-4))


def test_probe_homes_step_the_same_probe_on_every_worker(tiling33, monkeypatch):
    # rows 0-1 on the first tile's worker, row 2 on another: that worker's tiles read the
    # copy of the probe step on (2, 0), made from the same two halves of the sum in the
    # same order as the first tile's, so both copies are the same bits
    homes = {t.key: (2, 0) if t.row == 2 else (0, 0) for t in tiling33}
    states, data, probe, ctx = _placeholders(tiling33)
    g = gd_iteration(tiling33, 0, states, data, probe, ctx, rounds=2, refine_probe=True, probe_homes=homes)
    for s in (0, 1):
        top = g.dependencies()[("probe", s)] - {("probe", s - 1)}
        (root_sum,) = [k for k in top if k[0] == "probe-sum"]
        copy = ("probe", s, 2, 0)
        (copy_sum,) = [k for k in g.dependencies()[copy] if k[0] == "probe-sum"]
        assert g.tasks[copy_sum] == g.tasks[root_sum] and copy_sum != root_sum
        assert g.placement[copy_sum] == g.placement[copy] == (2, 0) and g.placement[("probe", s)] == (0, 0)
    for t in tiling33:  # round 1 reads its worker's copy of round 0's step
        assert g.tasks[("grad", 1, *t.key)][4] == (("probe", 0, 2, 0) if t.row == 2 else ("probe", 0))
    assert g.tasks[("probe", 1, 2, 0)][1] == ("probe", 0, 2, 0) and g.outputs["probe"] == ("probe", 1)

    a, b = _computed_probes(monkeypatch, tiling33, homes, [("probe", 1), ("probe", 1, 2, 0)])
    np.testing.assert_array_equal(a, b)


def _computed_probes(monkeypatch, tiling, homes, keys):
    """The values of ``keys`` of a two-round iteration with probe refinement, computed
    with a gradient whose probe parts are random numbers plus the probe it read."""
    states, _, probe, ctx = _placeholders(tiling)
    rng = np.random.default_rng(11)
    parts = {t.key: rng.standard_normal(5).astype(np.float32) for t in tiling}

    def fake_gradient(state, data, local, probe, ctx, tile, refine_probe, local_updates):
        return {"cost": 1.0, "probe": parts[tile] + (0 if isinstance(probe, _Token) else probe), "probe_illumination": parts[tile]}

    monkeypatch.setattr(tt, "tile_gradient", fake_gradient)
    monkeypatch.setattr(tt, "tile_update", lambda *a: None)
    monkeypatch.setattr(tt, "cut_strip", lambda *a: None)
    monkeypatch.setattr(tt, "probe_update", lambda p, total, ctx: total["probe"] * np.float32(0.37) + total["probe_illumination"])
    g = gd_iteration(tiling, 0, states, {t.key: t.key for t in tiling}, probe, ctx, rounds=2, refine_probe=True, probe_homes=homes)
    return dask.get(g.tasks, keys)


def test_the_stepped_probe_reaches_many_workers_down_a_tree(monkeypatch):
    # 36 tiles, each on a worker of its own: the halves of the probe-gradient sum go to the
    # first PROBE_STEPPERS homes only, every other home gets the stepped probe from one home
    # that has it, none sends it to more than two, and every copy is the same bits
    tiling = _lattice_tiling(shape=(6, 6), scan=(18, 18))
    homes = {t.key: t.key for t in tiling}
    states, data, probe, ctx = _placeholders(tiling)
    g = gd_iteration(tiling, 0, states, data, probe, ctx, rounds=2, refine_probe=True, probe_homes=homes)
    deps = g.dependencies()
    root = tiling.tiles[0].key

    def copy_of(s, t):
        return ("probe", s) if t == root else ("probe", s, *t)

    for s in (0, 1):
        copies = {t.key: copy_of(s, t.key) for t in tiling}
        (top,) = [k for k in deps[("probe", s)] if k[0] == "probe-sum"]
        halves = deps[top]
        readers = {k for k in g.tasks if deps[k] & halves and k[0] == "probe-sum"}
        assert len(readers) == PROBE_STEPPERS and {g.placement[k] for k in readers} == {t.key for t in tiling.tiles[:PROBE_STEPPERS]}
        for key in copies.values():  # each copy is read by the tiles of its worker and at most two other workers
            relays = [k for k in g.tasks if key in deps[k] and k[0] == "probe" and g.tasks[k][0] is tt.relay]
            assert len(relays) <= 2, (key, relays)
        longest = 0
        for key in copies.values():  # relays in a row from a home that stepped it
            hops = 0
            while g.tasks[key][0] is tt.relay:
                (key,) = deps[key]
                hops += 1
            longest = max(longest, hops)
        assert 0 < longest <= int(np.ceil(np.log2(len(tiling.tiles) / PROBE_STEPPERS)))
    for t in tiling:  # round 1 reads its worker's copy of round 0's probe
        assert g.tasks[("grad", 1, *t.key)][4] == copy_of(0, t.key)
    # the next iteration, given this one's copies, goes on reading them
    g2 = gd_iteration(tiling, 1, g.outputs["states"], data, g.outputs["probes"], ctx, rounds=2, refine_probe=True,
                      probe_homes=homes)
    for t in tiling:
        assert g2.tasks[("grad", 2, *t.key)][4] == copy_of(1, t.key)

    got = _computed_probes(monkeypatch, tiling, homes, [copy_of(1, t.key) for t in tiling])
    for a in got[1:]:
        np.testing.assert_array_equal(a, got[0])


@pytest.mark.parametrize("pads", [(3, 0, 2, 5), (0, 0, 0, 0), (4, 4, 0, 0), (1, 2, 3, 4)])
def test_a_tiles_edge_padding_is_numpys(pads):
    a = (np.arange(2 * 5 * 7) * (1 + 0.5j)).reshape(2, 5, 7).astype(np.complex64)
    top, bottom, left, right = pads
    np.testing.assert_array_equal(tt._pad_edge(np, a, *pads), np.pad(a, ((0, 0), (top, bottom), (left, right)), mode="edge"))


@pytest.mark.parametrize("n_slices, amplitude_max", [(1, None), (3, 1.0)])
def test_the_compiled_tile_step_is_the_numpy_passes_bit_for_bit(n_slices, amplitude_max):
    # tile_update's one-pass kernel (strips applied on the way) against apply_patches then
    # object_step_consuming: added and pasted strips, overlapping one another and the tile's edge
    pytest.importorskip("numba")
    rng = np.random.default_rng(7)
    h, w = 40, 36

    def cplx(*shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)

    def strip(rows, cols):
        shape = (n_slices, rows.stop - rows.start, cols.stop - cols.start)
        return {"object": cplx(*shape), "illumination": rng.uniform(0.5, 2, shape).astype(np.float32)}

    base = cplx(n_slices, h, w)
    buf = {"object": cplx(n_slices, h, w), "illumination": rng.uniform(0, 3, (n_slices, h, w)).astype(np.float32)}
    regions = [(slice(0, 9), slice(0, 36)), (slice(5, 40), slice(30, 36)), (slice(3, 12), slice(2, 20)), (slice(0, 40), slice(0, 4))]
    ops = ["add", "replace", "add", "add"]
    strips = [strip(*r) for r in regions]
    patches = list(zip(ops, regions))

    class Ctx:
        eps_per_position, step = 1e-3, 0.9

    Ctx.amplitude_max = amplitude_max
    before = {k: v.copy() for k, v in buf.items()}, [{k: v.copy() for k, v in s.items()} for s in strips], base.copy()
    with dask.config.set({"daskptycho.kernels": "numpy"}):
        ref = tt.tile_update(base, None, buf, strips, patches, Ctx, 17)
    with dask.config.set({"daskptycho.kernels": "numba"}):
        got = tt.tile_update(base, None, buf, strips, patches, Ctx, 17)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    # and the inputs are left as they were (the buffer and the strips are read, not changed)
    assert all(np.array_equal(buf[k], before[0][k]) for k in buf)
    assert all(np.array_equal(s[k], b[k]) for s, b in zip(strips, before[1]) for k in s)
    assert np.array_equal(base, before[2])
