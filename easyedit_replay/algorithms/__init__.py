"""Registry of the plugin's algorithms: ``alg_name -> (update rule, mode)``.

``X_REPLAY`` runs X with forward replay; ``X_SPREAD`` runs X with stock backward
spreading through the same machinery (for side-by-side comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from ..errors import HyperParamsError
from .base import Algorithm
from .alphaedit import AlphaEdit
from .emmet import EMMET
from .memit import MEMIT
from .pmet import PMET

RULES: Dict[str, Algorithm] = {"MEMIT": MEMIT(), "PMET": PMET(), "EMMET": EMMET(), "AlphaEdit": AlphaEdit()}
PLANNED: tuple = ()


@dataclass(frozen=True)
class Registered:
    alg_name: str
    base: str
    mode: str
    rule: Algorithm

    @property
    def hparams_class(self):
        return self.rule.hparams_class


def algorithm_names():
    """Every registered ``alg_name`` (``MEMIT_REPLAY``, ``MEMIT_SPREAD``, ...)."""
    return [f"{base}_{suffix}" for base in RULES for suffix in ("REPLAY", "SPREAD")]


def split_name(alg_name: str):
    """``"MEMIT_REPLAY" -> ("MEMIT", "replay")``; None for names without our suffix."""
    for suffix, mode in (("_REPLAY", "replay"), ("_SPREAD", "spread")):
        if str(alg_name).endswith(suffix):
            return str(alg_name)[: -len(suffix)], mode
    return None


def get_algorithm(alg_name: str) -> Registered:
    """Look up ``alg_name``.

    Raises:
        HyperParamsError: unknown name, or a base the plugin does not implement yet.
    """
    parts = split_name(alg_name)
    if parts is None or parts[0] not in RULES:
        if parts is not None and parts[0] in PLANNED:
            raise HyperParamsError(
                f"hparams.alg_name = {alg_name!r}: {parts[0]} with replay is not implemented in this "
                f"version of easyedit-replay; available: {algorithm_names()}"
            )
        raise HyperParamsError(f"hparams.alg_name = {alg_name!r} is not an easyedit-replay algorithm; use one of {algorithm_names()}")
    base, mode = parts
    return Registered(alg_name, base, mode, RULES[base])
