"""What every benchmark does with its lines: append them to its results file."""

from __future__ import annotations

from typing import Optional, Sequence


def append_results(path: Optional[str], lines: Sequence[str]) -> None:
    """Append ``lines`` (one block, newline-terminated) to ``path``; nothing when
    ``path`` is empty or None (``--out ""``)."""
    if path:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
