"""A task graph with a tile for each task: what the driver submits."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import keys


@dataclass
class IterationGraph:
    """Tasks of one iteration (or any unit of work) and where they run.

    Attributes
    ----------
    tag : hashable, optional
        Appended to every key :meth:`add` makes: ``("grad", s, r, c)`` becomes
        ``("grad", s, r, c, tag)``. A run gives each attempt its own tag, because a
        scheduler or worker may still know a key of an earlier run (or of an attempt a
        lost worker interrupted) when it comes back with other inputs, and distributed
        does not allow one key for two different computations.
    tasks : dict
        Dask task dict ``{key: (func, *args)}``; arguments may be keys of this
        dict, or already computed values and futures from earlier iterations.
    placement : dict
        ``{key: (row, col)}``: the tile whose worker runs the task. Keys without a
        placement may run anywhere (small reductions).
    outputs : dict
        Named keys the driver needs (``"state"``, ``"cost"``, ``"probe"`` ...).
    """

    tag: object = None
    tasks: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    def add(self, key, task, tile=None):
        """Add ``task`` under ``key`` (a kind of :data:`daskptycho.keys.TASKS` and its
        indices; the graph's tag is appended), on ``tile``'s worker if given.

        Returns
        -------
        The key as it is in the graph (with the tag).
        """
        if keys.kind_of(key) is None:
            raise ValueError(f"task kind {key[0]!r} is not in daskptycho.keys.TASKS: add it there (phase, colour)")
        if self.tag is not None:
            key = (*key, self.tag)
        self.tasks[key] = task
        if tile is not None:
            self.placement[key] = tile
        return key

    def tree_sum(self, name, s, parts, func, tiles=None):
        """Pairwise tree reduction of the keys ``parts`` with ``func(a, b)``; tasks
        ``(name, s, level, i)``. With ``tiles`` (one per part), each sum runs on its first
        part's tile, so the sums of one worker's parts stay on that worker. Returns the
        key of the total."""
        level = 0
        tiles = list(tiles) if tiles is not None else [None] * len(parts)
        while len(parts) > 1:
            nxt, nxt_tiles = [], []
            for i in range(0, len(parts), 2):
                if i + 1 < len(parts):
                    nxt.append(self.add((name, s, level, i // 2), (func, parts[i], parts[i + 1]), tiles[i]))
                else:
                    nxt.append(parts[i])
                nxt_tiles.append(tiles[i])
            parts, tiles = nxt, nxt_tiles
            level += 1
        return parts[0]

    def dependencies(self):
        """``{key: set of keys of this graph it needs}`` (for checks and drawing)."""
        from dask.core import get_dependencies

        return {k: set(get_dependencies(self.tasks, k)) for k in self.tasks}

    def reaches(self, src, dst):
        """Is there a dependency path from task ``src`` to task ``dst``?"""
        deps = self.dependencies()
        dependents = {k: set() for k in deps}
        for k, ds in deps.items():
            for d in ds:
                dependents[d].add(k)
        todo, seen = [src], set()
        while todo:
            k = todo.pop()
            if k == dst:
                return True
            if k in seen:
                continue
            seen.add(k)
            todo.extend(dependents[k])
        return False
