"""Registry of the plugin's algorithms: one record per update rule, every name derived.

An algorithm is ONE :class:`~easyedit_replay.algorithms.base.Algorithm` subclass
(its ``name``, ``hparams_class``, ``host_hparams`` and ``sites``), registered with
:func:`register_algorithm`. From the registry and the target constructions of
:mod:`easyedit_replay.targets` come every ``alg_name`` (``f"{name}_{MODE}"``:
``MEMIT_REPLAY``, ``MEMIT_SPREAD``, ``MEMIT_BLUE``, ...), the ``apply_*_to_model``
entry points, EasyEdit's hyperparameter mapping and the rewritten weight names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Union

from ..errors import HyperParamsError
from ..hparams import read_yaml
from ..targets import CONSTRUCTIONS, Construction
from .base import Algorithm

RULES: Dict[str, Algorithm] = {}


def register_algorithm(rule: Algorithm) -> Algorithm:
    """Add ``rule`` (an :class:`Algorithm` instance with ``name`` and ``hparams_class``)
    to the registry; returns it. Registering a name twice replaces the earlier rule.

    Raises:
        ValueError: ``rule.name`` empty or ``rule.hparams_class`` missing.
    """
    if not rule.name or rule.hparams_class is None:
        raise ValueError(f"{type(rule).__name__}: set `name` and `hparams_class` before registering")
    RULES[rule.name] = rule
    rule.hparams_class.ALGORITHM = rule.name
    return rule


@dataclass(frozen=True)
class Registered:
    """What an ``alg_name`` resolves to: base algorithm, target construction, rule."""

    alg_name: str
    base: str
    construction: Construction
    rule: Algorithm

    @property
    def mode(self) -> str:
        """The target construction's name (``"replay"``, ``"spread"``, ``"blue"``, ...)."""
        return self.construction.name

    @property
    def hparams_class(self):
        """The rule's hyperparameter dataclass (e.g. ``MEMITHyperParams``)."""
        return self.rule.hparams_class


def alg_name_of(base: str, mode) -> str:
    """``("MEMIT", "blue") -> "MEMIT_BLUE"``."""
    from ..targets import get_construction

    return f"{base}_{get_construction(mode).suffix}"


def name_table() -> Dict[str, Registered]:
    """``{alg_name: Registered}`` for every registered algorithm and construction."""
    return {f"{base}_{c.suffix}": Registered(f"{base}_{c.suffix}", base, c, rule)
            for base, rule in RULES.items() for c in CONSTRUCTIONS.values()}


def algorithm_names() -> List[str]:
    """Every registered ``alg_name`` (``MEMIT_REPLAY``, ``MEMIT_SPREAD``, ...)."""
    return list(name_table())


def get_algorithm(alg_name: str) -> Registered:
    """Look up ``alg_name``.

    Raises:
        HyperParamsError: an unknown name (the message lists the known ones, and names
            the plugin's spelling of a stock EasyEdit name or of a misspelled one).
    """
    found = name_table().get(str(alg_name))
    if found is None:
        raise HyperParamsError(f"hparams.alg_name = {alg_name!r} is not an easyedit-replay algorithm; "
                               f"{_alg_name_hint(str(alg_name))}use one of {algorithm_names()}")
    return found


def _alg_name_hint(alg_name: str) -> str:
    """The fix for an unknown ``alg_name``: a stock EasyEdit name (``MEMIT``, ``MEMIT-FE``)
    takes a construction suffix; a name in another casing or misspelled, the closest one of
    its algorithm; another algorithm (``ROME``), the plugin's four."""
    import difflib
    import re

    head, *tail = re.split(r"[-_]", alg_name, maxsplit=1)
    base = {b.lower(): b for b in RULES}.get(head.lower())
    if base is None:
        close = difflib.get_close_matches(head, list(RULES), n=1, cutoff=0.8)
        if not close:
            return f"{head!r} is not an algorithm of the plugin ({', '.join(RULES)}); "
        base = close[0]
    if not tail:
        return (f"{alg_name!r} is stock EasyEdit's {base}; set alg_name: {base}_REPLAY (forward replay) or "
                f"{base}_SPREAD (the stock construction); ")
    if tail[0].upper() == "FE":
        return f"EasyEdit's {alg_name} is forward estimation, this plugin's {base}_REPLAY; set alg_name: {base}_REPLAY; "
    names = [n for n in algorithm_names() if n.startswith(f"{base}_")]
    close = [n for n in names if n.lower() == alg_name.lower()] or difflib.get_close_matches(
        f"{base}_{tail[0].upper()}", names, n=1, cutoff=0.85)
    return f"did you mean {close[0]!r}? Or " if close else ""


def hparams_class_for(alg_name: str):
    """The dataclass that loads ``alg_name`` (e.g. ``MEMIT_REPLAY``)."""
    return get_algorithm(alg_name).hparams_class


def load_hparams(path_or_dict: Union[str, Path, Dict[str, Any]], **overrides):
    """Load any plugin YAML (or mapping); the class is chosen by ``alg_name``.

    ``overrides`` replace fields before validation (e.g. ``alg_name="MEMIT_SPREAD"``).

    Raises:
        HyperParamsError: a missing file or field, an unknown ``alg_name``, or any value
            :meth:`~easyedit_replay.hparams.ReplayHyperParams.from_dict` rejects.
    """
    if isinstance(path_or_dict, dict):
        config, source = dict(path_or_dict), "hparams"
    else:
        config, source = read_yaml(path_or_dict)
    config.update(overrides)
    if "alg_name" not in config:
        raise HyperParamsError(f"{source}: missing field 'alg_name'; set it to e.g. MEMIT_REPLAY")
    return hparams_class_for(str(config["alg_name"])).from_dict(config, source=source)


def rewrite_modules(hp) -> List[str]:
    """Rewritten module names of ``hp`` for every edit layer, in edit order (the rule's sites)."""
    rule = get_algorithm(hp.alg_name).rule
    return [s.rewrite_template.format(l) for l in hp.layers for s in rule.sites(hp)]


def weight_names(hp) -> List[str]:
    """Rewritten parameter names of ``hp`` for every edit layer, in edit order."""
    return [f"{m}.weight" for m in rewrite_modules(hp)]


from .memit import MEMIT  # noqa: E402  (each module registers its rule)
from .pmet import PMET  # noqa: E402
from .emmet import EMMET  # noqa: E402
from .alphaedit import AlphaEdit  # noqa: E402

for _rule in (MEMIT(), PMET(), EMMET(), AlphaEdit()):
    register_algorithm(_rule)
