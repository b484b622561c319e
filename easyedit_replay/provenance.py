"""What made a result: the package version and, when the package runs from a git
checkout, the commit (``scale`` and ``tune`` cells record it, :func:`provenance`).

    provenance()   # {"version": "0.1.0", "commit": "4d9de0e+dirty"}; commit None outside git

``__version__`` lives here (the package and ``setup.cfg`` read it from this module) so
that the ground floor can name it without importing the package.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Optional

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> Optional[str]:
    """``git args`` run on the package's folder (no optional locks: never blocks a commit in
    progress; the checkout the package would sit at the top of marked safe, so that git
    reads a checkout owned by another user instead of refusing its "dubious ownership");
    its output stripped, or None when git is missing or fails."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-c", f"safe.directory={PACKAGE_DIR.parent}",
                               "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def source_commit() -> Optional[str]:
    """The short hash of the checkout's HEAD, with ``+dirty`` when tracked files under
    ``easyedit_replay/`` differ from it (staged or not; untracked files do not count);
    None when the package does not run from the top of a git checkout (an installed
    copy, even inside another repository's tree, or no git). Computed once per process:
    the code a process runs is the code it imported, whatever is committed later."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE_DIR.parent:
        return None
    head = _git("rev-parse", "--short", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".")  # run in the package folder
    if head is None or changes is None:
        return None
    return head + ("+dirty" if changes else "")


def provenance() -> dict:
    """``{"version": the package version, "commit": :func:`source_commit`}``: what a cell
    records about the code that made it. No reader uses it; a file without it loads
    the same."""
    return {"version": __version__, "commit": source_commit()}
