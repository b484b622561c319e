"""Where the plugin keeps its caches: one root, ``$EASYEDIT_REPLAY_CACHE`` or
``~/.cache/easyedit_replay``, holding ``models/`` and ``gguf/`` (:mod:`.models`),
``stats/`` (the bundled YAMLs' second moments) and ``anchors/`` (:mod:`.anchors.store`).

    cache_root() / "stats"      # e.g. ~/.cache/easyedit_replay/stats
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of every cache of the plugin: ``$EASYEDIT_REPLAY_CACHE`` or ``~/.cache/easyedit_replay``."""
    env = os.environ.get("EASYEDIT_REPLAY_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "easyedit_replay"
