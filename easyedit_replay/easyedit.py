"""Host adapter: make EasyEdit accept the plugin's ``alg_name`` values.

:func:`register` patches a loaded EasyEdit (package ``easyeditor``) in place:

1. ``easyeditor.util.alg_dict.ALG_DICT`` gets one entry per plugin name
   (``MEMIT_REPLAY``, ``MEMIT_SPREAD``, ``MEMIT_BLUE``, ... for MEMIT, PMET,
   EMMET and AlphaEdit and every target construction). ``editor.py`` star-imports that module, so the
   same dict object is mutated, never replaced.
2. The stock hyperparameter class of each base (``MEMITHyperParams``, ...) gets a
   ``from_hparams`` that, for a YAML whose ``alg_name`` is one of *its* plugin
   names, returns the plugin's hyperparameters; any other YAML goes to the stock
   ``from_hparams`` unchanged (stock names keep stock behaviour).
3. ``BatchEditor.is_batchable_method`` answers for a plugin name what it answers
   for the base name.
4. ``BaseEditor.__init__`` runs with ``hparams.alg_name`` temporarily set to the
   base name, so every name-based branch in it (tokenizer padding side, dtype,
   quantization) is the base's; afterwards ``alg_name`` and ``apply_algo`` are the
   plugin's. The other ``alg_name`` comparisons in EasyEdit's editing path
   (``IKE``, ``ICE``, ``LoRA``, ``QLoRA``, ``DPO``, ``WISE``, ``GRACE``, ``KN``,
   ``DEFER``, ``MELO`` in ``editor.py``, ``editors/utils.py`` and
   ``evaluate/evaluate.py``) are false for MEMIT, PMET, EMMET and AlphaEdit and
   for their plugin names alike.

Names are read from the registry of :mod:`easyedit_replay.algorithms` at
registration time, so an algorithm or a target construction added there
registers without changing this module.

:func:`easyedit_replay._autoload.install` (called from the ``.pth`` file installed with the
package, see :mod:`easyedit_replay._autoload`) runs :func:`register` right after
``import easyeditor`` finishes, without importing anything heavy at start-up.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .entry_points import make_entry

log = logging.getLogger(__name__)

HOST_PACKAGE = "easyeditor"
# easyedit_replay._autoload.ENV (not imported: the hook imports this module, not the reverse;
# tests/test_easyedit.py checks that the two agree)
AUTOLOAD_ENV = "EASYEDIT_REPLAY_AUTOLOAD"
_MARK = "_easyedit_replay_original"
_lock = threading.RLock()
_warned: set = set()


@dataclass
class Registration:
    """What :func:`register` did: ``patched`` symbols, ``names`` added, ``missing``
    EasyEdit symbols it could not find, and ``message`` when nothing was done."""

    names: List[str] = field(default_factory=list)
    patched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    message: str = ""

    @property
    def ok(self) -> bool:
        """Every plugin name is in EasyEdit's ``ALG_DICT`` and no symbol was missing."""
        return not self.missing and not self.message and registered()


# ----------------------------------------------------------------------------- names
def seed_stock_caches(stock_main, model, tok, hparams, templates) -> dict:
    """Give a stock EasyEdit editor module our statistics and context templates, so that
    its code and ours edit from the same inputs (the stock-equivalence checks): fills
    ``stock_main.COV_CACHE[(model name, module)]`` with :func:`~easyedit_replay.stats.second_moments`
    of every rewritten module of ``hparams`` and sets ``stock_main.CONTEXT_TEMPLATES_CACHE``.

    Args:
        stock_main: an imported EasyEdit module with those two globals
            (``easyeditor.models.memit.memit_main``, ``...emmet.emmet_main``,
            ``...alphaedit.AlphaEdit_main``).

    Returns:
        ``{module: [d_in, d_in] second moment}``.
    """
    from .stats import second_moments

    modules = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
    covs = second_moments(model, tok, hparams, modules, progress=False)
    name = model.config._name_or_path.replace("/", "_")
    for m in modules:
        stock_main.COV_CACHE[(name, m)] = covs[m]
    stock_main.CONTEXT_TEMPLATES_CACHE = templates
    return covs


def plugin_bases() -> List[str]:
    """Bases with plugin names (the algorithm registry)."""
    from .algorithms import RULES

    return list(RULES)


def host_hparams_name(base: str) -> str:
    """EasyEdit's hyperparameter class name of ``base`` (from its registration record)."""
    from .algorithms import RULES

    return RULES[base].host_hparams_name


def plugin_names() -> Dict[str, str]:
    """``{plugin alg_name: base}`` for every registered algorithm and target construction."""
    from .algorithms import name_table

    return {name: reg.base for name, reg in name_table().items()}


def base_name(alg_name) -> Optional[str]:
    """``"MEMIT_REPLAY" -> "MEMIT"``; None for any name that is not a plugin name."""
    return plugin_names().get(str(alg_name)) if alg_name is not None else None


# ----------------------------------------------------------------------------- model names
# ``BaseEditor.__init__`` picks its loader by the first of these substrings found in
# the lower-cased ``model_name`` (whole path); no match raises NotImplementedError.
# Observed in EasyEdit's editors/editor.py (July 2026); kept in its order.
HOST_LOADER_ORDER = ("t5", "chatglm-api", "gpt-3.5", "gpt", "llama", "baichuan", "chatglm", "internlm",
                     "qwen2", "qwen3", "qwen", "mistral")


def host_loader_branch(model_name: str) -> Optional[str]:
    """The substring EasyEdit's ``BaseEditor`` dispatches ``model_name`` on, or None.

    A SmolLM2 export must land on ``"llama"`` (Llama architecture: AutoModel and
    AutoTokenizer, pad token = EOS, right padding for MEMIT-family editors); a path
    that also contains e.g. ``gpt`` or ``t5`` anywhere earlier in this order would be
    loaded with the wrong tokenizer class.
    """
    lowered = str(model_name).lower()
    for key in HOST_LOADER_ORDER:
        if key in lowered:
            return key
    return None


# ----------------------------------------------------------------------------- patches
def _warn_missing(symbol: str, report: Registration) -> None:
    report.missing.append(symbol)
    if symbol not in _warned:
        _warned.add(symbol)
        warnings.warn(
            f"easyedit-replay: EasyEdit symbol {symbol} not found; this EasyEdit layout is not the one "
            f"the plugin expects, so that part of the registration was skipped "
            f"(set {AUTOLOAD_ENV}=0 to silence automatic registration)",
            RuntimeWarning,
            stacklevel=3,
        )


def _patch_alg_dict(alg_dict_module, names: Dict[str, str], report: Registration) -> None:
    table = getattr(alg_dict_module, "ALG_DICT", None)
    if not isinstance(table, dict):
        _warn_missing(f"{HOST_PACKAGE}.util.alg_dict.ALG_DICT", report)
        return
    for name in names:
        current = table.get(name)
        if current is not None and getattr(current, _MARK, False):
            continue
        fn = make_entry(name)
        setattr(fn, _MARK, True)
        table[name] = fn
        report.names.append(name)
    if report.names:
        report.patched.append(f"{HOST_PACKAGE}.util.alg_dict.ALG_DICT (+{', '.join(report.names)})")


def _accepting_from_hparams(original, base: str):
    """Wrap the stock ``from_hparams`` classmethod ``original`` of ``base``'s class."""
    stock = original.__func__

    def from_hparams(cls, hparams_name_or_path, *args, **kwargs):
        from .algorithms import load_hparams
        from .errors import HyperParamsError
        from .hparams import read_yaml

        try:
            config, _ = read_yaml(hparams_name_or_path)
        except HyperParamsError:
            config = {}
        if base_name(config.get("alg_name")) == base:
            return load_hparams(hparams_name_or_path)
        return stock(cls, hparams_name_or_path, *args, **kwargs)

    from_hparams.__doc__ = (
        f"EasyEdit's ``from_hparams``, and (easyedit-replay) plugin YAMLs whose ``alg_name`` is "
        f"one of the plugin's {base}_* names ({base}_REPLAY, {base}_SPREAD, ...), which return the "
        f"plugin's hyperparameters.\n\nRaises:\n    HyperParamsError: a plugin YAML that is invalid."
    )
    from_hparams.__wrapped__ = stock
    wrapped = classmethod(from_hparams)
    return wrapped


def _patch_hparams_classes(alg_dict_module, root, report: Registration) -> None:
    for base in plugin_bases():
        cls_name = host_hparams_name(base)
        cls = getattr(alg_dict_module, cls_name, None) or getattr(root, cls_name, None)
        if cls is None:
            _warn_missing(f"{HOST_PACKAGE}.{cls_name}", report)
            continue
        original = cls.__dict__.get("from_hparams")
        if isinstance(original, classmethod) and getattr(original.__func__, "__wrapped__", None) is not None \
                and getattr(cls, _MARK, None) is not None:
            continue  # already patched
        if not isinstance(original, classmethod):
            _warn_missing(f"{HOST_PACKAGE}.{cls_name}.from_hparams", report)
            continue
        setattr(cls, _MARK, original)
        cls.from_hparams = _accepting_from_hparams(original, base)
        report.patched.append(f"{cls.__module__}.{cls_name}.from_hparams (+{base}_* plugin names)")


def _patch_batch_editor(report: Registration) -> None:
    module = sys.modules.get(f"{HOST_PACKAGE}.editors.batch_editor")
    cls = getattr(module, "BatchEditor", None)
    original = getattr(cls, "__dict__", {}).get("is_batchable_method") if cls is not None else None
    if not isinstance(original, staticmethod):
        _warn_missing(f"{HOST_PACKAGE}.editors.batch_editor.BatchEditor.is_batchable_method", report)
        return
    if getattr(original.__func__, _MARK, None) is not None:
        return
    stock = original.__func__

    def is_batchable_method(alg_name):
        return stock(base_name(alg_name) or alg_name)

    setattr(is_batchable_method, _MARK, original)
    is_batchable_method.__doc__ = f"{stock.__doc__ or ''}\n(easyedit-replay: a plugin name answers as its base.)"
    cls.is_batchable_method = staticmethod(is_batchable_method)
    report.patched.append(f"{HOST_PACKAGE}.editors.batch_editor.BatchEditor.is_batchable_method")


def _patch_base_editor(report: Registration) -> None:
    module = sys.modules.get(f"{HOST_PACKAGE}.editors.editor")
    cls = getattr(module, "BaseEditor", None)
    if cls is None or "__init__" not in cls.__dict__:
        _warn_missing(f"{HOST_PACKAGE}.editors.editor.BaseEditor.__init__", report)
        return
    original = cls.__dict__["__init__"]
    if getattr(original, _MARK, None) is not None:
        return
    table = getattr(sys.modules.get(f"{HOST_PACKAGE}.util.alg_dict"), "ALG_DICT", {})

    def __init__(self, hparams, *args, **kwargs):
        name = getattr(hparams, "alg_name", None)
        base = base_name(name)
        if base is None:
            return original(self, hparams, *args, **kwargs)
        # Present the base name to every alg_name branch of the stock __init__.
        hparams.alg_name = base
        try:
            original(self, hparams, *args, **kwargs)
        finally:
            hparams.alg_name = name
        self.alg_name = name
        self.apply_algo = table[name]

    __init__.__doc__ = original.__doc__
    __init__.__wrapped__ = original
    setattr(__init__, _MARK, original)
    cls.__init__ = __init__
    report.patched.append(f"{HOST_PACKAGE}.editors.editor.BaseEditor.__init__ (plugin names behave as their base)")


def register(import_host: bool = True) -> Registration:
    """Register the plugin's algorithms with EasyEdit (idempotent).

    Args:
        import_host: import ``easyeditor`` if it is not imported yet (the import hook
            passes False: it calls this right after the import).

    Returns:
        A :class:`Registration`. Without an importable EasyEdit nothing is patched
        and ``message`` says why (also logged at INFO). Each patch is logged at DEBUG;
        an EasyEdit symbol that is not where expected gives one ``RuntimeWarning``
        naming it, and the rest is still registered.
    """
    with _lock:
        report = Registration()
        root = sys.modules.get(HOST_PACKAGE)
        if root is None and import_host:
            try:
                root = importlib.import_module(HOST_PACKAGE)
            except ImportError as exc:
                report.message = (
                    f"EasyEdit is not importable ({exc}); nothing registered. Put an EasyEdit checkout on "
                    f"sys.path (its examples do sys.path.append('..')) and import easyeditor: the plugin "
                    f"registers itself"
                )
                log.info(report.message)
                return report
        if root is None:
            report.message = "easyeditor is not imported; nothing registered"
            log.info(report.message)
            return report
        alg_dict = sys.modules.get(f"{HOST_PACKAGE}.util.alg_dict")
        if alg_dict is None:
            try:
                alg_dict = importlib.import_module(f"{HOST_PACKAGE}.util.alg_dict")
            except ImportError:
                alg_dict = None
        names = plugin_names()
        if alg_dict is None:
            _warn_missing(f"{HOST_PACKAGE}.util.alg_dict", report)
        else:
            _patch_alg_dict(alg_dict, names, report)
            _patch_hparams_classes(alg_dict, root, report)
        _patch_batch_editor(report)
        _patch_base_editor(report)
        for item in report.patched:
            log.debug("easyedit-replay patched %s", item)
        if not report.patched and not report.missing:
            log.debug("easyedit-replay: already registered with %s", getattr(root, "__file__", HOST_PACKAGE))
        return report


def registered() -> bool:
    """Whether the plugin names are in the loaded EasyEdit's ``ALG_DICT``."""
    table = getattr(sys.modules.get(f"{HOST_PACKAGE}.util.alg_dict"), "ALG_DICT", None)
    return isinstance(table, dict) and all(name in table for name in plugin_names())
