"""The ``/daskptycho`` page of the Dask dashboard: the live reconstruction.

Three parts:

* the scheduler-side store, :class:`LiveState` (a scheduler plugin named
  ``daskptycho-live``): the driver sends it, after every iteration, the engine, the
  iteration, the cost and a small downsampled phase image of the current object
  (:func:`receive`, through ``Client.run_on_scheduler``); it watches the tiles'
  update tasks finish on its own (its ``transition`` hook), which gives the
  per-tile progress between two messages;
* the task functions that cut each tile's share of that image on the tile's own
  worker (:func:`phase_preview`) and put the shares together on the driver
  (:func:`stitch_preview`): a few KiB per tile, never the tile;
* the Bokeh app (:func:`daskptycho_doc`): phase image with a colour bar, cost
  curve on a log axis, a grid of tiles coloured by the last iteration each one
  finished, and a title with the engine and the iteration; it reads the store
  every 500 ms.

Importing this module adds the page to the dashboard of every scheduler started
afterwards in this process (the embedded cluster: the driver imports it before it
starts one). For a scheduler started elsewhere, preload it::

    dask scheduler --preload daskptycho.dashboard

Without Bokeh (an optional dependency of the dashboard) the import does nothing
more than define the store: the reconstruction runs the same, without the page.
"""

from __future__ import annotations

import time

import numpy as np

from . import keys

try:
    from distributed.diagnostics.plugin import SchedulerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    SchedulerPlugin = object

PLUGIN_NAME = "daskptycho-live"
ROUTE = "/daskptycho"


def preview_every_s():
    """Least seconds between two live phase images: ``daskptycho.dashboard.preview_every_s`` (1.0; 0: every iteration)."""
    import dask.config

    from .errors import OptionsError

    raw = dask.config.get("daskptycho.dashboard.preview_every_s", default=1.0)
    try:
        v = float(raw)
    except (TypeError, ValueError):
        v = -1.0
    if not v >= 0:
        raise OptionsError("daskptycho.dashboard.preview_every_s", f"got {raw!r}; expected seconds >= 0 (0: an image every iteration)")
    return v


def preview_px():
    """Longest side (pixels) of the live phase image: ``daskptycho.dashboard.preview_px`` (256)."""
    import dask.config

    return int(dask.config.get("daskptycho.dashboard.preview_px", default=256))


# ---------------------------------------------------------------------------- worker side
def phase_preview(state, region, origin=(0, 0), stride=None, size=256, name=None):
    """One tile's share of the live image: the phase of its core, every ``stride``-th pixel.

    Runs on the tile's worker. The samples sit on the global grid ``origin + k *
    stride`` so that the tiles' shares fit together without seams.

    Parameters
    ----------
    state : array (S, h, w) complex, or a dict with ``"object"`` (the ml state); with
        ``name``, a peer stage's result holding it under that name
    region : (slice y, slice x): the core inside ``state`` (or (slice, slice y, slice x)
        picking the object modes too)
    origin : (y0, x0): the core's first pixel in the whole object (pixels)
    stride : int, pixels of the object per pixel of the image; None: fit this
        one share into ``size`` pixels (a whole object in one task)
    size : int, the longest side of the image when ``stride`` is None
    name : optional, the state's name in a stage's result ``state`` (read in place: no
        task of its own takes it out first)

    Returns
    -------
    ((row, col), float32 array, stride): where the share starts in the image, the
    phase (radians, summed over slices: the phase of the projected object) at the
    samples, and the stride used.
    """
    from .backend import get_array_module

    if name is not None:
        state = state[name]
    obj = state["object"] if isinstance(state, dict) else state
    core = obj[tuple(region)] if len(region) == 3 else obj[..., region[0], region[1]]
    if stride is None:
        stride = max(1, -(-max(core.shape[-2:]) // size))
    oy, ox = (-origin[0]) % stride, (-origin[1]) % stride
    sample = core[..., oy::stride, ox::stride]
    phase = get_array_module(sample).angle(sample)
    if phase.ndim == 3:
        phase = phase.sum(axis=0)
    if hasattr(phase, "get"):  # CuPy: only the small image comes to the host
        phase = phase.get()
    return ((origin[0] + oy) // stride, (origin[1] + ox) // stride), np.asarray(phase, dtype=np.float32), int(stride)


def stitch_preview(pieces, stride, shape):
    """Put the tiles' shares (from :func:`phase_preview`) into one image.

    Parameters
    ----------
    pieces : dict ``{tile: phase_preview result}``
    stride : int or None (then ``pieces`` is one whole object, which chose its own)
    shape : (H, W) of the whole object (pixels), or None with ``stride=None``

    Returns
    -------
    dict with ``image`` (float32 array, at most ``ceil(H / stride) x ceil(W / stride)``)
    and ``stride`` (object pixels per image pixel).
    """
    if stride is None:
        (_, arr, stride), = pieces.values()
        return {"image": arr, "stride": int(stride)}
    h, w = -(-shape[0] // stride), -(-shape[1] // stride)
    out = np.full((h, w), np.nan, np.float32)
    for (r0, c0), arr, _ in pieces.values():
        hh, ww = min(arr.shape[0], h - r0), min(arr.shape[1], w - c0)
        out[r0:r0 + hh, c0:c0 + ww] = arr[:hh, :ww]
    return {"image": out, "stride": int(stride)}


# ---------------------------------------------------------------------------- scheduler side
class LiveState(SchedulerPlugin):
    """The scheduler's record of the current run (what the page draws).

    Attributes
    ----------
    engine : str; iterations : int (planned); iteration : int (last reported, -1 before)
    costs : list of (iteration, cost)
    image : float32 array (h, w) or None: phase (radians) of the current object, downsampled
    tiles : (rows, cols); tile_done : dict ``{(r, c): last iteration whose update finished}``
    version : int, bumped on every change (the page redraws when it moves)
    """

    name = PLUGIN_NAME

    def __init__(self):
        self.reset("", 0, (1, 1), 1)

    def follow_status(self, status):
        """Frames of a scan being followed (:func:`daskptycho.follow`): ``acquired``
        (committed by the writer), ``used`` (by the running round), ``round``,
        ``scan_finished``; None ends it."""
        self.follow = None if status is None else dict(status)
        self.version += 1

    def reset(self, engine, iterations, tiles, rounds):
        self.engine, self.iterations, self.tiles, self.rounds = engine, int(iterations), tuple(tiles), max(1, int(rounds))
        self.iteration, self.costs, self.image, self.stride = -1, [], None, 1
        self.tile_done = {}
        self.follow = None  # a followed scan's frames, told by its round once the run has begun
        self.started = time.time()
        self.version = getattr(self, "version", 0) + 1

    def transition(self, key, start, finish, *args, **kwargs):
        # called for every task: stay cheap and never raise
        if finish != "memory":
            return
        kind = keys.kind_of(key)
        if not (isinstance(key, tuple) and kind is not None and kind.progress):
            return
        if len(key) < 4:
            # ("ml-iteration", it, run tag): the single-task engine is one "tile"
            tile, it = (0, 0), int(key[1])
        else:
            # ("update", s, r, c, run tag): a tile's step of round s
            s, tile = key[1], (key[2], key[3])
            if (s + 1) % self.rounds:
                return  # not the last pass round of its iteration
            it = s // self.rounds
        if it > self.tile_done.get(tile, -1):
            self.tile_done[tile] = it
            self.version += 1

    def update(self, msg):
        self.engine = msg.get("engine", self.engine)
        self.iteration = int(msg["iteration"])
        self.costs.append((self.iteration, float(msg["cost"])))
        if msg.get("tiles_done"):  # the tiles ran inside stages: each finished this iteration
            for r in range(self.tiles[0]):
                for c in range(self.tiles[1]):
                    if self.iteration > self.tile_done.get((r, c), -1):
                        self.tile_done[(r, c)] = self.iteration
        if msg.get("image") is not None:
            self.image = np.asarray(msg["image"], np.float32)
            self.stride = int(msg.get("stride", 1))
        self.version += 1


def live_state(scheduler, create=False):
    """The scheduler's :class:`LiveState` (None before any run unless ``create``)."""
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    if plugin is None and create:
        plugin = LiveState()
        scheduler.add_plugin(plugin, name=PLUGIN_NAME)
    return plugin


def begin_run(engine, iterations, tiles, rounds=1, dask_scheduler=None):
    """Reset the live state for a new run (``Client.run_on_scheduler``).

    Returns whether the scheduler's dashboard serves the page."""
    live_state(dask_scheduler, create=True).reset(engine, iterations, tiles, rounds)
    return ensure_page(dask_scheduler)


def follow_status(status, dask_scheduler=None):
    """Store a followed scan's frames (``Client.run_on_scheduler``; see :meth:`LiveState.follow_status`)."""
    live_state(dask_scheduler, create=True).follow_status(status)
    return True


def receive(msg=None, msgs=(), dask_scheduler=None):
    """Store iterations' messages from the driver (``Client.run_on_scheduler``): ``msg``
    (one) or ``msgs`` (several, in order). Each one's engine, iteration and cost also go to
    the scheduler's event log under the topic ``daskptycho`` (the dashboard's /events page)."""
    state = live_state(dask_scheduler, create=True)
    for m in ([msg] if msg is not None else []) + list(msgs):
        state.update(m)
        dask_scheduler.log_event("daskptycho", {k: m[k] for k in ("engine", "iteration", "cost")})
    return True


# ---------------------------------------------------------------------------- Bokeh app
def daskptycho_doc(scheduler, extra, doc):
    """The Bokeh document of ``/daskptycho`` (the dashboard calls it for every visitor)."""
    from bokeh.layouts import column, row
    from bokeh.models import ColorBar, ColumnDataSource, Div, LinearColorMapper
    from bokeh.palettes import Viridis256
    from bokeh.plotting import figure
    from bokeh.transform import linear_cmap

    img_src = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="phase-source")
    cost_src = ColumnDataSource({"iteration": [], "cost": []}, name="cost-source")
    tile_src = ColumnDataSource({"x": [], "y": [], "done": [], "label": []}, name="tile-source")
    title = Div(text="<h2>daskptycho: waiting for a reconstruction</h2>", name="title", sizing_mode="stretch_width")

    mapper = LinearColorMapper(palette="Greys256", low=-np.pi, high=np.pi)
    fig_img = figure(title="phase of the object (rad, summed over slices)", match_aspect=True, width=460, height=440,
                     tools="pan,wheel_zoom,box_zoom,reset,save", name="phase-figure")
    fig_img.image(image="image", x="x", y="y", dw="dw", dh="dh", source=img_src, color_mapper=mapper, name="phase-image")
    fig_img.add_layout(ColorBar(color_mapper=mapper, title="rad"), "right")
    fig_img.y_range.flipped = True  # rows down, as the object is stored
    fig_img.xaxis.axis_label = "x (object px)"
    fig_img.yaxis.axis_label = "y (object px)"

    fig_cost = figure(title="cost per iteration", y_axis_type="log", width=460, height=440, name="cost-figure",
                      tools="pan,wheel_zoom,box_zoom,reset,save")
    fig_cost.line("iteration", "cost", source=cost_src, line_width=2, name="cost-line")
    fig_cost.scatter("iteration", "cost", source=cost_src, size=4, name="cost-points")
    fig_cost.xaxis.axis_label = "iteration"
    fig_cost.yaxis.axis_label = "cost"

    fig_tiles = figure(title="tiles: last iteration whose update finished", width=460, height=440, name="tile-figure",
                       tools="", toolbar_location=None, match_aspect=True)
    tile_cmap = linear_cmap("done", Viridis256, low=-1, high=1, nan_color="#dddddd", low_color="#440154")
    fig_tiles.rect("x", "y", width=0.95, height=0.95, source=tile_src, fill_color=tile_cmap, line_color="black",
                   name="tile-rects")
    fig_tiles.text("x", "y", text="label", source=tile_src, text_align="center", text_baseline="middle",
                   text_color="white", text_font_size="11pt")
    fig_tiles.y_range.flipped = True
    fig_tiles.axis.visible = False
    fig_tiles.grid.visible = False

    seen = {"version": None, "started": None, "n_costs": 0}

    def update():
        live = scheduler.plugins.get(PLUGIN_NAME)
        if live is None or live.version == seen["version"]:
            return
        if live.started != seen["started"]:  # a new run: start the curves afresh
            seen.update(started=live.started, n_costs=0)
            cost_src.data = {"iteration": [], "cost": []}
        seen["version"] = live.version
        new = live.costs[seen["n_costs"]:]
        if new:
            cost_src.stream({"iteration": [i for i, _ in new], "cost": [max(c, 1e-30) for _, c in new]})
            seen["n_costs"] = len(live.costs)
        if live.image is not None:
            im = live.image
            finite = im[np.isfinite(im)]
            if finite.size:
                lo, hi = float(finite.min()), float(finite.max())
                mapper.update(low=lo, high=hi if hi > lo else lo + 1e-6)
            h, w = im.shape
            img_src.data = {"image": [im], "x": [0], "y": [0], "dw": [w * live.stride], "dh": [h * live.stride]}
        rows, cols = live.tiles
        xs, ys, done, label = [], [], [], []
        for r in range(rows):
            for c in range(cols):
                d = live.tile_done.get((r, c), -1)
                xs.append(c)
                ys.append(r)
                done.append(d)
                label.append(f"({r},{c}): {d + 1}")
        # colours span the last three iterations: a tile that lags shows darker
        front = max(done, default=0)
        tile_cmap["transform"].update(low=front - 2.5, high=max(front, 0) + 0.5)
        tile_src.data = {"x": xs, "y": ys, "done": done, "label": label}
        last = f", cost {live.costs[-1][1]:.4g}" if live.costs else ""
        scan = ""
        if live.follow:  # a scan being followed: its rounds are runs of their own
            f = live.follow
            per = f", cost per frame {live.costs[-1][1] / max(f['used'], 1):.4g}" if live.costs else ""
            state = "scan finished" if f.get("scan_finished") else "scan going on"
            scan = f"<br>round {f['round'] + 1}: {f['used']} of {f['acquired']} frames acquired in use ({state}){per}"
        title.text = (f"<h2>daskptycho: engine <b>{live.engine}</b>, iteration {live.iteration + 1} of "
                      f"{live.iterations} done{last}{scan}</h2>")

    update()
    doc.add_periodic_callback(update, 500)
    doc.title = "Dask: daskptycho"
    doc.add_root(column(title, row(fig_img, fig_cost, fig_tiles), sizing_mode="stretch_width"))
    try:  # the dashboard's own page frame (navigation bar), when this distributed has it
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except ImportError:
        pass


def _register():
    """Add ``/daskptycho`` to the applications every new scheduler dashboard serves."""
    try:
        from distributed.dashboard.scheduler import applications
    except ImportError:  # no Bokeh: no dashboard at all, nothing to add to
        return False
    applications.setdefault(ROUTE, daskptycho_doc)
    return True


REGISTERED = _register()


def ensure_page(scheduler):
    """Serve ``/daskptycho`` on this (running) scheduler's dashboard if it does not yet.

    A scheduler started before this module was imported (a ``Client()`` made in a
    notebook first) has its Bokeh server built already: add a second Bokeh server
    application holding only this page to its HTTP routes, the way
    ``distributed.dashboard.scheduler.connect`` adds the dashboard itself.

    Returns
    -------
    bool: the page is served (False: no dashboard or no Bokeh on this scheduler).
    """
    app = getattr(scheduler, "http_application", None)
    bokeh_apps = [a for a in getattr(app, "applications", []) if hasattr(a, "app_paths")]
    if not bokeh_apps or not REGISTERED:
        return False
    if any(ROUTE in a.app_paths for a in bokeh_apps):
        return True
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    prefix = getattr(bokeh_apps[0], "_prefix", "") or ""
    page = BokehApplication({ROUTE: daskptycho_doc}, scheduler, prefix=prefix, template_variables=template_variables(scheduler))
    app.add_application(page)
    page.initialize(IOLoop.current())
    page.start()
    return True


def dask_setup(scheduler):
    """Scheduler preload hook (``dask scheduler --preload daskptycho.dashboard``):
    importing this module already added the page; make the store exist from the start."""
    live_state(scheduler, create=True)
    ensure_page(scheduler)
