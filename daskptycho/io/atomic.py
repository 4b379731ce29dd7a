"""Writing one file atomically: a temporary sibling renamed into place.

A reader (or a later run) never sees a half-written file at the final path: a
killed writer leaves only the hidden temporary ``.NAME.tmp-XXXXXXXX``. Stores
(directories) have their own swap in :mod:`daskptycho.io.store`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid

from ..errors import OutputExistsError

# renameat2(2) flags: refuse to replace / swap two paths atomically (Linux >= 3.15)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src, dst, flags):
    """``renameat2(src, dst, flags)``; False where the call does not exist (not Linux,
    old glibc, a filesystem without the flag), so the caller falls back to plain renames."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


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
