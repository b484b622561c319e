"""Writing files safely: one atomic writer under one file-lock convention.

Every cache the package writes (second-moment statistics, the self-generated
corpus, AlphaEdit's projections, anchors) goes through :func:`atomic_write`, so a
reader never sees a half-written file and two processes never write one file at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def file_lock(path: PathLike):
    """An inter-process lock for ``path``: a ``filelock.FileLock`` on ``{path}.lock``
    (the lock file stays behind; it is empty). Use as a context manager."""
    from filelock import FileLock

    return FileLock(str(path) + ".lock")


def atomic_write(path: PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """Write ``path`` atomically under :func:`file_lock`.

    ``write(tmp_path)`` fills a temporary file (a ``str`` path in the same folder,
    name ``{path.name}...{suffix}``; some writers, e.g. ``np.savez``, need the right
    ``suffix``), which is then renamed onto ``path`` with ``os.replace``. Missing
    parent folders are created. On any error, ``KeyboardInterrupt`` included, the
    temporary file is removed, ``path`` is left as it was and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=suffix, dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write` of a text file (the platform's default encoding)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
