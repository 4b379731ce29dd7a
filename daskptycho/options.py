"""Option dataclasses: built from dicts and keywords, rejecting unknown keys."""

from __future__ import annotations

import dataclasses
import difflib

from .errors import OptionsError


def merged(options, overrides, cls):
    """``options`` (an instance of the dataclass ``cls`` or of one of its kind, a dict or
    None) as a dict, updated with ``overrides``."""
    if dataclasses.is_dataclass(options) and isinstance(options, cls):
        base = dataclasses.asdict(options)
    elif options is None:
        base = {}
    elif isinstance(options, dict):
        base = dict(options)
    else:
        raise OptionsError("options", f"expected a dict or {cls.__name__}, got {type(options).__name__}")
    base.update(overrides or {})
    return base


def unknown_option(key, known):
    """The :class:`OptionsError` for a key none of ``known`` is: it names the closest one."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(sorted(known))}"
    return OptionsError(str(key), f"unknown option{hint}")


def check_options(cls, options=None, overrides=None):
    """Build ``cls`` (a dataclass) from ``options`` (instance, dict or None) and overrides.

    Unknown keys raise :class:`OptionsError` naming the key and the closest known one.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    base = merged(options, overrides, cls)
    for key in base:
        if not isinstance(key, str) or key not in known:
            raise unknown_option(key, known)
    return cls(**base)
