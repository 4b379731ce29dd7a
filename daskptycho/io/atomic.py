"""Writing one file atomically: a temporary sibling renamed into place.

A reader (or a later run) never sees a half-written file at the final path: a
killed writer leaves only the hidden temporary ``.NAME.tmp-XXXXXXXX``. Stores
(directories) have their own swap in :mod:`daskptycho.io.store`.
"""

from __future__ import annotations

import contextlib
import os
import uuid

from ..errors import OutputExistsError


def temporary_sibling(path, overwrite=False):
    """Refuse an existing ``path`` unless ``overwrite``; return ``(path, tmp)`` with
    ``tmp`` a fresh hidden name in the same directory (so a rename is atomic).

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False (nothing has been written).
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists: pass overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return path, os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path, overwrite=False):
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``.

    Parameters
    ----------
    path : str or path-like
        The final file.
    overwrite : bool
        Replace an existing ``path``; without it, an existing file raises
        :class:`~daskptycho.errors.OutputExistsError` before anything is written.
    """
    path, tmp = temporary_sibling(path, overwrite)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
