"""``scale``'s former module, kept importable: the code is in
:mod:`easyedit_replay.experiments` (:mod:`~easyedit_replay.experiments.scale`,
:mod:`~easyedit_replay.experiments.cells`, :mod:`~easyedit_replay.experiments.report`)."""

from .experiments.cells import (  # noqa: F401
    collect_cells, hparams_settings, missing_cells, planned_cells, read_cell, records_digest, write_cell,
)
from .experiments.report import write_scale_report  # noqa: F401
from .experiments.scale import ScaleConfig, alphaedit_cache_ranks, record_plan, run_scale  # noqa: F401
from .experiments.statistics import paired_difference  # noqa: F401
from .experiments.tables import (  # noqa: F401
    clear_differences, retention_table, sequential_paired_table, sequential_per_edit, update_norm_table,
)
