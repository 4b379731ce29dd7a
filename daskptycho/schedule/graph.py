"""A task graph with a tile for each task: what the driver submits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IterationGraph:
    """Tasks of one iteration (or any unit of work) and where they run.

    Attributes
    ----------
    tasks : dict
        Dask task dict ``{key: (func, *args)}``; arguments may be keys of this
        dict, or already computed values and futures from earlier iterations.
    placement : dict
        ``{key: (row, col)}``: the tile whose worker runs the task. Keys without a
        placement may run anywhere (small reductions).
    outputs : dict
        Named keys the driver needs (``"state"``, ``"cost"``, ``"probe"`` ...).
    """

    tasks: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    def add(self, key, task, tile=None):
        self.tasks[key] = task
        if tile is not None:
            self.placement[key] = tile
        return key

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
