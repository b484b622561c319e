"""easyedit-replay: forward replay target construction for MEMIT-family editors.

Public API: the ``apply_*_to_model`` entry points (EasyEdit's signature),
:func:`load_hparams`, :func:`load_model`, :func:`compute_edit`, :func:`register`.
Importing this package does not import EasyEdit.
"""

from .provenance import __version__  # noqa: F401

from .entry_points import entry_point_name, make_entry  # noqa: F401
from .errors import (  # noqa: F401
    HyperParamsError, ModelLoadError, NumericalError, ReplayError, RequestError, StatisticsError,
)

_ENTRIES: dict = {}


def __getattr__(name):
    """``apply_<alg_name>_to_model`` for every registered ``alg_name`` (``MEMIT_REPLAY``,
    ``PMET_SPREAD``, ``AlphaEdit_BLUE``, ...), made on first use from the registry."""
    if name.startswith("apply_") and name.endswith("_to_model"):
        from .algorithms import algorithm_names

        for alg in algorithm_names():
            if entry_point_name(alg) == name:
                return _ENTRIES.setdefault(alg, make_entry(alg))
    raise AttributeError(f"module 'easyedit_replay' has no attribute {name!r}")


def __dir__():
    from .algorithms import algorithm_names

    return sorted(list(globals()) + [entry_point_name(a) for a in algorithm_names()])


def reset_alphaedit_cache(model=None):
    """Forget AlphaEdit's sequential-edit key cache of ``model`` (of every model when None);
    see :mod:`easyedit_replay.algorithms.alphaedit`."""
    from .algorithms.alphaedit import reset_alphaedit_cache as _reset

    _reset(model)


def load_hparams(path_or_dict, **overrides):
    """Load a plugin YAML; see :func:`easyedit_replay.algorithms.load_hparams`."""
    from .algorithms import load_hparams as _load

    return _load(path_or_dict, **overrides)


def load_model(name_or_path="smollm2-135m", device="cpu", dtype=None):
    """Load ``(model, tokenizer)``; see :func:`easyedit_replay.models.load_model`."""
    from .models import load_model as _load

    return _load(name_or_path, device=device, dtype=dtype)


def register(import_host=True):
    """Register the plugin's algorithms with EasyEdit (idempotent); see
    :func:`easyedit_replay.easyedit.register`. Returns a ``Registration`` report."""
    from .easyedit import register as _register

    return _register(import_host=import_host)


def compute_edit(*args, **kwargs):
    """See :func:`easyedit_replay.editor.compute_edit`."""
    from .editor import compute_edit as _compute

    return _compute(*args, **kwargs)
