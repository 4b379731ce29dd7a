"""Option dataclasses: built from dicts and keywords, rejecting unknown keys."""

from __future__ import annotations

import dataclasses
import difflib

from .errors import OptionsError


def check_options(cls, options=None, overrides=None):
    """Build ``cls`` (a dataclass) from ``options`` (instance, dict or None) and overrides.

    Unknown keys raise :class:`OptionsError` naming the key and the closest known one.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    if isinstance(options, cls):
        base = dataclasses.asdict(options)
    elif options is None:
        base = {}
    elif isinstance(options, dict):
        base = dict(options)
    else:
        raise OptionsError("options", f"expected a dict or {cls.__name__}, got {type(options).__name__}")
    base.update({k: v for k, v in (overrides or {}).items()})
    for key in base:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(sorted(known))}"
            raise OptionsError(str(key), f"unknown option{hint}")
    return cls(**base)
