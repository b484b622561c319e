"""Token ids, right padding and the input device: the helpers every batched pass uses.

Sequences are padded on the RIGHT for forward passes (:func:`pad_right`), whatever
the tokenizer's ``padding_side`` says, so positions in the unpadded sequence (lookup
indices, target spans) stay valid in the padded batch; on the LEFT only for
``generate`` (:func:`pad_left`).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def token_ids(tok, text: str) -> List[int]:
    """Token ids of ``text`` as the model sees it (special tokens as the tokenizer adds them).

    Returns a plain ``list`` of ``int`` (length ``T``, unpadded).
    """
    return list(tok(text)["input_ids"])


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ``input_ids [B, T]`` long and ``attention_mask [B, T]``.

    ``B = len(seqs)``, ``T`` the longest sequence; padded slots hold ``pad_id`` and mask
    0. Both tensors are moved to ``device`` (None: stay on the CPU).

    Raises:
        ValueError: ``seqs`` is empty (``max`` of an empty sequence).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation, so that every row continues from its last
    real token: ``input_ids [B, T]`` long and ``attention_mask [B, T]`` on ``device``.

    Raises:
        ValueError: ``seqs`` is empty.
    """
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def pad_id_of(tok) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else UNK, else 0.

    Padded slots are masked out, so any valid id does; never raises.
    """
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    return 0


def input_device(model) -> torch.device:
    """Device of the input embeddings (where token ids must go).

    Falls back to the device of the first parameter when the model has no
    ``get_input_embeddings``; raises ``StopIteration`` for a model without parameters.
    """
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
