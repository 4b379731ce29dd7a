"""Pictures of task graphs and task timelines (matplotlib; no graphviz needed)."""

from __future__ import annotations

import os

KIND_COLOURS = {
    "grad": "#2ca02c", "update": "#1f77b4", "vfwd": "#ff7f0e", "vbwd": "#d62728",
    "hfwd": "#9467bd", "hbwd": "#8c564b", "cost": "#7f7f7f", "probe": "#17becf",
    "hve": "#bcbd22", "tile": "#c7c7c7", "load": "#e377c2",
}


def kind_of(key):
    """Colour class of a task key: ``("vfwd-strip", ...)`` -> ``"vfwd"``."""
    name = key[0] if isinstance(key, tuple) else str(key)
    base = name.split("-")[0]
    return base if base in KIND_COLOURS else "tile"


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
    for kind, colour in KIND_COLOURS.items():
        ks = [k for k in graph.tasks if kind_of(k) == kind]
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


def draw_timeline(stream, tile_workers, path, title="task stream"):
    """Draw a task stream (``Client.get_task_stream`` records) as one lane per
    worker thread, coloured by phase, like the paper's Fig. 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    recs = [r for r in stream if any(s["action"] == "compute" for s in r["startstops"])]
    t0 = min(s["start"] for r in recs for s in r["startstops"])
    workers = sorted({r["worker"] for r in recs})
    lane = {w: i for i, w in enumerate(workers)}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.8 * len(workers)))
    seen = set()
    for r in recs:
        key = _key(r["key"])
        kind = kind_of(key)
        for s in r["startstops"]:
            if s["action"] != "compute":
                continue
            label = kind if kind not in seen else None
            seen.add(kind)
            ax.barh(lane[r["worker"]], s["stop"] - s["start"], left=s["start"] - t0, height=0.7,
                    color=KIND_COLOURS.get(kind, "#cccccc"), edgecolor="k", linewidth=0.2, label=label)
            if kind in ("hfwd", "vbwd") and isinstance(key, tuple) and len(key) >= 4:
                ax.text(s["start"] - t0, lane[r["worker"]] + 0.45, f"{key[-2]}", fontsize=5)
    ax.set_yticks(range(len(workers)))
    ax.set_yticklabels([f"worker {i}\n" + ", ".join(f"({r},{c})" for (r, c), w in tile_workers.items() if w == wk)
                        for i, wk in enumerate(workers)], fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
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
