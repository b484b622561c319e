"""A toy update rule, a toy target construction and a toy way of sharing the residual,
each added in this one file with one registration call, as CONTRIBUTING.md "Add an
algorithm" and "Add a target construction" describe (used by test_architecture.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from easyedit_replay.algorithms import register_algorithm
from easyedit_replay.algorithms.memit import MEMIT, MEMITHyperParams
from easyedit_replay.targets import FIRST, LAST, Construction, Share, register_construction


@dataclass(kw_only=True)
class HalfMEMITHyperParams(MEMITHyperParams):
    """MEMIT's fields; loads ``HalfMEMIT_*`` names."""


class HalfMEMIT(MEMIT):
    """MEMIT's update, halved: ``dW = 0.5 R K^T (lambda C + K K^T)^-1``."""

    name = "HalfMEMIT"
    hparams_class = HalfMEMITHyperParams

    def update(self, inp):
        return 0.5 * super().update(inp)


# BLUE's layers and anchors with the stock share: l_1 takes half of its residual.
ENDS_DIVIDED = Construction("ends_divided", (FIRST, LAST), "ends", "own", "divide", False,
                            "toy: BLUE with the residual divided over the two layers")


@dataclass(frozen=True)
class Halves(Share):
    """Every edited layer but the last takes half of its local residual, the last all of it."""

    name: ClassVar[str] = "halves"

    def prepare(self, ctx):
        ctx.targets.info["halves_layers"] = len(ctx.targets.edit_layers)

    def divisor(self, targets, step, site=None):
        return 1.0 if step == len(targets.edit_layers) - 1 else 2.0


# replay's anchor and targets with the new share.
REPLAY_HALVES = Construction("replay_halves", (FIRST,), "all", "own", Halves(), True,
                             "toy: replayed targets, every layer but the last takes half of its residual")


def register():
    register_algorithm(HalfMEMIT())
    register_construction(ENDS_DIVIDED)
    register_construction(REPLAY_HALVES)
