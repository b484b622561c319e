"""easyedit-replay: forward replay target construction for MEMIT-family editors.

Public API: the ``apply_*_to_model`` entry points (EasyEdit's signature),
:func:`load_hparams`, :func:`load_model`, :func:`compute_edit`, :func:`register`.
Importing this package does not import EasyEdit.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    HyperParamsError, ModelLoadError, NumericalError, ReplayError, RequestError, StatisticsError,
)


def _entry(alg_name):
    def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False, cache_template=None,
              keep_original_weight=False, **kwargs):
        from .editor import apply_edit

        if hparams.alg_name != alg_name:
            hparams = type(hparams).from_dict({**hparams.to_dict(), "alg_name": alg_name})
        return apply_edit(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                          cache_template=cache_template, keep_original_weight=keep_original_weight, **kwargs)

    apply.__name__ = f"apply_{alg_name.lower()}_to_model"
    apply.__qualname__ = apply.__name__
    apply.__doc__ = f"""EasyEdit entry point of ``{alg_name}``.

    ``apply(model, tok, requests, hparams, copy=False, return_orig_weights=False,
    cache_template=None, keep_original_weight=False, **kwargs) -> (model, weights_copy)``;
    see :func:`easyedit_replay.editor.apply_edit`. ``hparams`` of another plugin
    ``alg_name`` are re-labelled ``{alg_name}``."""
    return apply


apply_memit_replay_to_model = _entry("MEMIT_REPLAY")
apply_memit_spread_to_model = _entry("MEMIT_SPREAD")
apply_pmet_replay_to_model = _entry("PMET_REPLAY")
apply_pmet_spread_to_model = _entry("PMET_SPREAD")
apply_emmet_replay_to_model = _entry("EMMET_REPLAY")
apply_emmet_spread_to_model = _entry("EMMET_SPREAD")
apply_alphaedit_replay_to_model = _entry("AlphaEdit_REPLAY")
apply_alphaedit_spread_to_model = _entry("AlphaEdit_SPREAD")


def reset_alphaedit_cache(model=None):
    """Forget AlphaEdit's sequential-edit key cache of ``model`` (of every model when None);
    see :mod:`easyedit_replay.algorithms.alphaedit`."""
    from .algorithms.alphaedit import reset_alphaedit_cache as _reset

    _reset(model)


def load_hparams(path_or_dict, **overrides):
    """Load a plugin YAML; see :func:`easyedit_replay.hparams.load_hparams`."""
    from .hparams import load_hparams as _load

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
