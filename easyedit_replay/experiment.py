"""``compare``'s former module, kept importable: the code is in
:mod:`easyedit_replay.experiments` (:mod:`~easyedit_replay.experiments.runner`,
:mod:`~easyedit_replay.experiments.report`, :mod:`~easyedit_replay.experiments.statistics`)."""

from .experiments.report import render_report, write_outputs  # noqa: F401
from .experiments.runner import (  # noqa: F401
    CompareConfig, edit_batch, fluency_scores, mode_hparams, run_comparison, run_mode, score_rows, shared_anchors,
    unedited_block,
)
from .experiments.statistics import bootstrap, summarize_analyses, summarize_ci  # noqa: F401
from .experiments.tables import render_markdown, render_text  # noqa: F401
