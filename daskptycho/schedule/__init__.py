"""Pure builders of task graphs: they return dicts of tasks and never touch a client."""

from .graph import IterationGraph
from .hve import hve_iteration
from .passes import accumulate_passes, gd_iteration

__all__ = ["IterationGraph", "accumulate_passes", "gd_iteration", "hve_iteration"]
