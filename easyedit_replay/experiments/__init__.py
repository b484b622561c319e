"""The experiment layer: ``compare``, ``scale`` and their reports, one concern per module.

- :mod:`.metrics`: the metric registry (``Metric``), run keys (``RunKey``), the order
  of algorithms and modes and their plot styles;
- :mod:`.statistics`: bootstrap means and paired differences;
- :mod:`.tables`: the ``mean [lo, hi]`` formatter and every table's rows;
- :mod:`.runner`: the batch-and-sequence loop and ``compare`` (``run_comparison``);
- :mod:`.cells`: ``scale``'s cell files (paths, settings digests, plan, resume);
- :mod:`.scale`: ``scale`` (``run_scale``);
- :mod:`.plots`: the PNG plots;
- :mod:`.report`: ``compare``'s and ``scale``'s reports and ``report --markdown``;
- :mod:`.points`: ``report --points``, ``scale`` cells side by side across operating points.

Import from the submodules (``from easyedit_replay.experiments.runner import
run_comparison``): the package itself loads only the registry, so that the lower
layers (:mod:`easyedit_replay.evaluate`) can read it.
"""

from .metrics import Metric, RunKey, register_metric  # noqa: F401
