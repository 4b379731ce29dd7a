"""Pure builders of task graphs: they return dicts of tasks and never touch a client."""

from .graph import IterationGraph
from .hve import hve_iteration
from .passes import Buffer, accumulate_passes, gd_iteration, materialise

__all__ = ["Buffer", "IterationGraph", "accumulate_passes", "gd_iteration", "hve_iteration", "materialise"]
