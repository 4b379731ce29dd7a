"""Pictures of task graphs and task timelines (matplotlib; no graphviz needed)."""

from __future__ import annotations

import os

from .. import keys


def drawn_as(key):
    """The colour class of a task key (:attr:`daskptycho.keys.Kind.drawn_as`):
    ``("vfwd-strip", ...)`` -> ``"vfwd"``; keys of no known kind are ``"tile"``."""
    k = keys.kind_of(key)
    return k.drawn_as if k else "tile"


def _levels(deps):
    level = {}

    def depth(k):
        if k not in level:
            level[k] = 1 + max((depth(d) for d in deps[k]), default=-1)
        return level[k]

    for k in deps:
        depth(k)
    return level


def draw_graph(graph, tiling, path):
    """Draw an :class:`IterationGraph`: one row per tile, columns by dependency depth,
    colours by phase. Written atomically to ``path`` (SVG or PNG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deps = graph.dependencies()
    level = _levels(deps)
    n_tiles = tiling.rows * tiling.cols
    ypos = {}
    for k in graph.tasks:
        tile = graph.placement.get(k)
        ypos[k] = tile[0] * tiling.cols + tile[1] if tile is not None else n_tiles + 0.5
    width = max(level.values()) + 1
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * width), 0.6 * (n_tiles + 2) + 1.5))
    for k, ds in deps.items():
        for d in ds:
            ax.annotate("", xy=(level[k], ypos[k]), xytext=(level[d], ypos[d]),
                        arrowprops=dict(arrowstyle="->", lw=0.5, color="#999999", shrinkA=4, shrinkB=4))
    for kind, colour in keys.COLOURS.items():
        ks = [k for k in graph.tasks if drawn_as(k) == kind]
        if ks:
            ax.scatter([level[k] for k in ks], [ypos[k] for k in ks], s=60, c=colour, label=kind, zorder=3,
                       marker="s" if isinstance(ks[0], tuple) and ks[0][0].endswith("strip") else "o", edgecolors="k", linewidths=0.3)
    ax.set_yticks(list(range(n_tiles)) + [n_tiles + 0.5])
    ax.set_yticklabels([f"tile ({r},{c})" for r in range(tiling.rows) for c in range(tiling.cols)] + ["reductions"])
    ax.invert_yaxis()
    ax.set_xlabel("dependency depth (tasks in one column can run at the same time)")
    ax.set_title(f"one iteration, {tiling.rows}x{tiling.cols} tiles: {len(graph.tasks)} tasks")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return path


#: Phases of the timeline (the paper's Fig. 5), their colours and legend names.
#: The timeline's classes (:func:`daskptycho.keys.Kind.drawn_as`) and their legend; the others are "other".
TIMELINE_PHASES = {
    name: (keys.COLOURS[name], label) for name, label in (
        ("grad", "gradient (grad)"),
        ("vfwd", "vertical forward pass (vfwd)"),
        ("vbwd", "vertical backward pass (vbwd)"),
        ("hfwd", "horizontal forward pass (hfwd)"),
        ("hbwd", "horizontal backward pass (hbwd)"),
        ("update", "tile update (update)"),
    )
}
TIMELINE_PHASES["other"] = (keys.COLOURS["tile"], "other (load, cost, preview)")


#: Narrowest bar drawn, as a fraction of the time axis: a strip pass takes well under a
#: millisecond next to gradients of tens of milliseconds, and would not show at all.
MIN_WIDTH = 0.004


def timeline_phase(key):
    """Phase of a task-stream key for the timeline: ``("vbwd-strip", ...)`` -> ``"vbwd"``."""
    k = keys.kind_of(key)
    return k.drawn_as if k and k.drawn_as in TIMELINE_PHASES else "other"


def _tile_and_round(key):
    """``(round, (r, c))`` of a per-tile task key ``(name, s, r, c, ...)``, else None."""
    if isinstance(key, tuple) and len(key) >= 4 and all(isinstance(v, int) for v in key[1:4]):
        return key[1], (key[2], key[3])
    return None


def draw_timeline(stream, tile_workers, path, title="task stream", zoom_round=None):
    """Draw a task stream (``Client.get_task_stream`` records) like the paper's Fig. 5.

    Two panels: the whole run, one lane per worker (what each worker's thread did,
    coloured by phase); and one pass round zoomed in, one lane per tile (the tile's
    worker ran the task: a pass task sits in the lane of the tile it works on),
    with the cross-direction pipelining marked: the bottom row's first horizontal
    pass task starting before the last vertical backward pass task ends.

    Parameters
    ----------
    stream : list of task-stream records (``key``, ``worker``, ``startstops``)
    tile_workers : dict ``{(r, c): worker address}``
    path : str, written atomically (SVG or PNG by extension)
    zoom_round : int, optional: the round to zoom into (default: the middle one)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    recs = []
    for r in stream:
        comp = [s for s in r["startstops"] if s["action"] == "compute"]
        if comp:
            recs.append((_key(r["key"]), r["worker"], comp))
    t0 = min(s["start"] for _, _, comp in recs for s in comp)
    workers = sorted({w for _, w, _ in recs})
    tiles = sorted(tile_workers)
    rounds = sorted({tr[0] for k, _, _ in recs if (tr := _tile_and_round(k))})
    if zoom_round is None and rounds:
        zoom_round = rounds[len(rounds) // 2]
    fig, (ax, az) = plt.subplots(2, 1, figsize=(12, 2.2 + 0.75 * len(workers) + 0.38 * len(tiles)),
                                 gridspec_kw={"height_ratios": [len(workers) + 1, len(tiles) * 0.55 + 1]})
    # "other" first, so the phases are drawn over it
    recs.sort(key=lambda rec: timeline_phase(rec[0]) != "other")
    span = max(s["stop"] for _, _, comp in recs for s in comp) - t0
    min_w = MIN_WIDTH * span
    for key, w, comp in recs:
        colour = TIMELINE_PHASES[timeline_phase(key)][0]
        ax.broken_barh([(s["start"] - t0, max(min_w, s["stop"] - s["start"])) for s in comp], (workers.index(w) - 0.35, 0.7),
                       facecolors=colour, edgecolors="none")
    ax.set_yticks(range(len(workers)))
    ax.set_yticklabels([f"worker {i}: tiles " + " ".join(f"({r},{c})" for (r, c), tw in tile_workers.items() if tw == wk)
                        for i, wk in enumerate(workers)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds since the first task (tasks shorter than {min_w * 1e3:.2g} ms drawn that wide)")
    ax.set_title(title, fontsize=10)
    # the zoomed round: one lane per tile
    lane = {t: i for i, t in enumerate(tiles)}
    zs = [(k, comp) for k, _, comp in recs if (tr := _tile_and_round(k)) and tr[0] == zoom_round and tr[1] in lane]
    if zs:
        z0 = min(s["start"] for _, comp in zs for s in comp)
        zmin = MIN_WIDTH * 1e3 * (max(s["stop"] for _, comp in zs for s in comp) - z0)
        for key, comp in zs:
            colour = TIMELINE_PHASES[timeline_phase(key)][0]
            az.broken_barh([(1e3 * (s["start"] - z0), max(zmin, 1e3 * (s["stop"] - s["start"]))) for s in comp],
                           (lane[_tile_and_round(key)[1]] - 0.38, 0.76), facecolors=colour, edgecolors="none")
        rows = 1 + max(r for r, _ in tiles)
        pipe = pipelining([{"key": k, "startstops": comp} for k, comp in zs], rows).get(zoom_round)
        if pipe is not None:
            h, v = 1e3 * (pipe["bottom_h_start"] - z0), 1e3 * (pipe["last_vbwd_end"] - z0)
            for x, txt, col in ((h, "bottom row: first horizontal pass task", "#9467bd"), (v, "last vertical backward pass task ends", "#d62728")):
                az.axvline(x, color=col, lw=1.0, ls="--")
                az.annotate(txt, (x, -0.9), fontsize=7, color=col, ha="right" if x == min(h, v) else "left",
                            xytext=(-3 if x == min(h, v) else 3, 0), textcoords="offset points", annotation_clip=False)
            if pipe["pipelined"]:
                az.annotate("", xy=(h, -0.6), xytext=(v, -0.6), annotation_clip=False,
                            arrowprops=dict(arrowstyle="<->", color="#d62728", lw=1.2))
        az.set_yticks(range(len(tiles)))
        az.set_yticklabels([f"tile ({r},{c}), worker {workers.index(tile_workers[(r, c)]) if tile_workers[(r, c)] in workers else '?'}"
                            for r, c in tiles], fontsize=7)
        az.set_ylim(len(tiles) - 0.5, -1.3)
        az.set_xlabel(f"milliseconds since round {zoom_round}'s first task (one lane per tile: the tile's worker ran it; "
                      f"tasks shorter than {zmin:.2g} ms drawn that wide)")
        az.set_title(f"round {zoom_round} zoomed in: gradients, the four passes, updates", fontsize=9)
    else:
        az.set_visible(False)
    handles = [Patch(facecolor=c, edgecolor="k", linewidth=0.3, label=name) for c, name in TIMELINE_PHASES.values()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return path


def _key(k):
    """Task-stream keys may come back as strings of tuples; turn them back."""
    if isinstance(k, str) and k.startswith("("):
        import ast

        try:
            return ast.literal_eval(k)
        except (ValueError, SyntaxError):
            return k
    return k


def _savefig(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ext = os.path.splitext(path)[1]
    tmp = f"{path}.tmp{ext}"
    fig.savefig(tmp)
    os.replace(tmp, path)


def pipelining(stream, rows):
    """Cross-direction pipelining per pass round, from a task stream.

    For each round ``s``: when the first horizontal task (``hfwd``/``hfwd-strip``)
    of the bottom tile row started, and when the last vertical backward task
    (``vbwd``/``vbwd-strip``) of any row ended. Pipelining happened in that round
    when the first is earlier than the second.

    Returns
    -------
    dict ``{s: {"bottom_h_start": t, "last_vbwd_end": t, "overlap_s": t2 - t1, "pipelined": bool}}``
    """
    first_h, last_v = {}, {}
    for r in stream:
        key = _key(r["key"])
        if not isinstance(key, tuple) or len(key) < 4:
            continue
        comp = [s for s in r["startstops"] if s["action"] == "compute"]
        if not comp:
            continue
        name, s, row = key[0], key[1], key[2]
        if name in ("hfwd", "hfwd-strip") and row == rows - 1:
            first_h[s] = min(first_h.get(s, float("inf")), comp[0]["start"])
        if name in ("vbwd", "vbwd-strip"):
            last_v[s] = max(last_v.get(s, 0.0), comp[-1]["stop"])
    out = {}
    for s in sorted(set(first_h) & set(last_v)):
        out[s] = {"bottom_h_start": first_h[s], "last_vbwd_end": last_v[s],
                  "overlap_s": last_v[s] - first_h[s], "pipelined": first_h[s] < last_v[s]}
    return out
