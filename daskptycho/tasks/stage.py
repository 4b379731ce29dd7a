"""Running a fused stage: several tile tasks of one worker as one task
(:func:`daskptycho.schedule.fuse.fuse_by_worker` builds them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Slot", "StageSpec", "evaluate", "run_stage", "pick", "take"]


@dataclass(frozen=True)
class Slot:
    """An argument of a task inside a stage: the stage task's input ``index`` (or, with
    ``index`` None, a value computed earlier in the stage), and ``name``: the entry of
    that input to take (None: the input itself)."""

    index: int | None
    name: object = None


@dataclass(frozen=True)
class StageSpec:
    """The tasks of a stage in the order they run, ``((key, task), ...)`` in Dask's
    tuple format with :class:`Slot` for their inputs; ``exports``: the keys whose values
    the stage returns; ``release``: for each task, the keys no later task of the stage
    reads and no one outside needs (dropped as soon as it has run)."""

    tasks: tuple
    exports: tuple
    release: tuple = ()


def evaluate(arg, inputs, cache, receive=None):
    """The value of one argument of a task inside a stage: a :class:`Slot` is looked up
    in ``inputs`` (the stage task's arguments) or ``cache`` (values computed earlier in
    the stage), a task tuple is called, a list evaluated element by element; any other
    object that ``receive`` knows (a peer message, :mod:`~daskptycho.tasks.peer`) is
    what it returns, and the rest is literal data."""
    if isinstance(arg, Slot):
        if arg.index is None:
            return cache[arg.name]
        v = inputs[arg.index]
        return v if arg.name is None else v[arg.name]
    if isinstance(arg, tuple) and arg and callable(arg[0]):
        return arg[0](*[evaluate(a, inputs, cache, receive) for a in arg[1:]])
    if isinstance(arg, list):
        return [evaluate(a, inputs, cache, receive) for a in arg]
    if receive is not None:
        return receive(arg)
    return arg


def run_stage(spec: StageSpec, *inputs):
    """Run the tasks of ``spec`` in order on this worker; returns ``{key: value}`` of its
    exports. Each task sees its inputs exactly as it would as a task of its own."""
    cache = {}
    for i, (key, task) in enumerate(spec.tasks):
        cache[key] = evaluate(task, inputs, cache)
        for k in spec.release[i] if spec.release else ():
            cache.pop(k, None)
    return {k: cache[k] for k in spec.exports}


def pick(result, names):
    """The entries ``names`` of a stage's result: what one message carries."""
    return {k: result[k] for k in names}


def take(result, name):
    """One value of a stage's result (on the worker holding it)."""
    return result[name]
