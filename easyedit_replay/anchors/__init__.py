"""Anchors: the hidden states an edit drives its anchor layer's output to.

- :mod:`.objective`: what one anchor minimizes (:class:`Objective`, EasyEdit's
  ``compute_z`` / ``compute_zs``), the prompts as token rows, the read-out and the losses;
- :mod:`.loop`: :func:`optimize_anchors`, the batched Adam loop, its bookkeeping and chunks;
- :mod:`.forward`: the forward pass with deltas (the whole model, or from the anchor
  layer on) and the step-0 check between the two;
- :mod:`.store`: the cache (one key per request; an in-process layer in front of a
  disk store);
- :mod:`.bank`: ``easyedit-replay anchors info | bank`` (anchor banks: cache folders
  kept on purpose).
"""

from .loop import AnchorResult, cache_keys, frozen_parameters, optimize_anchors  # noqa: F401
from .objective import Objective, target_nll  # noqa: F401
from .store import in_process, recorded_as  # noqa: F401
