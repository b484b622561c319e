"""The ``apply_<alg_name>_to_model`` functions EasyEdit calls (its ``ALG_DICT`` values).

Imported downward by the package ``__init__`` (its ``apply_*_to_model`` attributes) and by
:mod:`easyedit_replay.easyedit` (the entries it puts into EasyEdit's ``ALG_DICT``);
it imports :mod:`easyedit_replay.editor` only when an entry point is called, so that
``import easyedit_replay`` stays free of torch.
"""

from __future__ import annotations


def entry_point_name(alg_name: str) -> str:
    """``"MEMIT_REPLAY" -> "apply_memit_replay_to_model"`` (EasyEdit's naming)."""
    return f"apply_{alg_name.lower()}_to_model"


def make_entry(alg_name: str):
    """A new EasyEdit entry point of ``alg_name``: ``apply(model, tok, requests, hparams,
    copy=False, return_orig_weights=False, cache_template=None, keep_original_weight=False,
    **kwargs) -> (model, weights_copy)``, which relabels ``hparams`` of another plugin
    ``alg_name`` and calls :func:`easyedit_replay.editor.apply_edit`."""

    def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False, cache_template=None,
              keep_original_weight=False, **kwargs):
        from .editor import apply_edit

        if hparams.alg_name != alg_name:
            hparams = hparams.replace(alg_name=alg_name)
        return apply_edit(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                          cache_template=cache_template, keep_original_weight=keep_original_weight, **kwargs)

    apply.__name__ = entry_point_name(alg_name)
    apply.__qualname__ = apply.__name__
    apply.__doc__ = f"""EasyEdit entry point of ``{alg_name}``.

    ``apply(model, tok, requests, hparams, copy=False, return_orig_weights=False,
    cache_template=None, keep_original_weight=False, **kwargs) -> (model, weights_copy)``;
    see :func:`easyedit_replay.editor.apply_edit` (``weights_copy.plan`` is the applied
    plan). ``hparams`` of another plugin ``alg_name`` are re-labelled ``{alg_name}``."""
    return apply
