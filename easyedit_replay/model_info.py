"""What a model's config says about its shape (context length, hidden size, depth), and
what its ``forward`` accepts.

Hugging Face configs name these differently per architecture (GPT-2's
``n_positions``/``n_embd``/``n_layer``, Llama's ``max_position_embeddings``/
``hidden_size``/``num_hidden_layers``, ...); each probe here tries the known names in
a fixed order and takes the first integer it finds. One implementation each, so
every caller agrees.
"""

from __future__ import annotations

import inspect
from typing import Optional

# Tried in this order; the first attribute holding an int wins.
POSITION_ATTRS = ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length")
HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model")
LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")


def _first_int(config, attrs) -> Optional[int]:
    for attr in attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def max_positions(model) -> Optional[int]:
    """The context length in tokens from ``model.config`` (``n_positions``,
    ``max_sequence_length``, ``max_position_embeddings`` or ``seq_length``), or None
    when the config names none.

    Raises:
        AttributeError: ``model`` has no ``config``.
    """
    return _first_int(model.config, POSITION_ATTRS)


def hidden_size(model) -> int:
    """The residual-stream width ``d`` (``hidden_size``, ``n_embd`` or ``d_model`` in
    ``model.config``; else the input embeddings' ``weight.shape[1]``).

    Raises:
        AttributeError: ``model`` has no ``config``, or neither a width in it nor
            input embeddings.
    """
    value = _first_int(model.config, HIDDEN_ATTRS)
    if value is not None:
        return value
    return model.get_input_embeddings().weight.shape[1]


def num_layers(model) -> Optional[int]:
    """The number of decoder layers (``num_hidden_layers``, ``n_layer`` or
    ``num_layers`` in ``model.config``), or None when unknown, also for a model
    without a ``config``. Never raises."""
    return _first_int(getattr(model, "config", None), LAYER_ATTRS)


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers >= 4.50: the
    unembedding then runs only at the positions asked for). Never raises."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
