"""``easyedit-replay report --points`` and ``report --models``: the cells of ``scale``
side by side across operating points (``scale --point``) or across models, one
``scale --out`` folder per point or per model.

    easyedit-replay report --points docs/results/scale_cf docs/results/scale_cf_paper
    easyedit-replay report --points docs/results/scale_cf docs/results/scale_cf_paper \\
        --reference bundled --modes spread,replay --out points.md
    easyedit-replay report --models docs/results/scale_cf docs/results/scale_cf_gemma3 \\
        --modes spread,replay,blue --out models.md

A folder's point is its cells' ``operating_point`` (cells made before that field
existed take the one point its ``scale.json`` names, and the report says how many
did); a run is then ``ALG/mode@point``. For every kind of cell finished at more than
one point (one batch of ``n``; a sequential series, at each number of edits made) and
every algorithm finished at more than one point in it (with ``--modes``, a kind that
has a cell of those modes), :func:`points_markdown` writes, after naming the modes of
those algorithms that only one point has evaluated (:func:`single_point_runs`),

a. the ``scale`` metrics (``metrics("scale")``) side by side, mean [95% CI], one row
   per algorithm, mode and point;
b. paired differences on the same edits (:func:`pairs`): ``mode@P - spread@P`` within
   each point, ``mode@P - spread@R`` against spreading at the reference point ``R``
   (``bundled``, the tuned default: each construction against spreading at its best
   point) and ``spread@P - spread@R``; ``*`` marks a 95% interval that excludes 0. Two
   cells are paired only on the same records, model and edit layers
   (:func:`pair_refusal`); a hyperparameter that differs within a pair besides the
   modes' own and, across points, the point's anchor settings (``POINT_FIELDS``) is
   named next to the pair (:func:`hparams_differences`); sequential cells at the
   numbers of edits made that both have evaluated, on all edits made and on each
   batch's edits (retention, :func:`retention_pairs_table`);
c. per-layer mean update norms ``|dW|`` and, where the cells record them, the anchor's
   ``|delta|`` and the targets' ``|t|`` relative to the unedited model's mean norm of
   the module (``|delta| / |h|``), per algorithm, mode and point (:func:`norm_tables`);
d. the pairs that cannot be formed yet (a side not evaluated), the pairs refused
   (records, model or edit layers differ) and the planned cells not finished, per point.

``report --models`` (:func:`models_markdown`) is the same report along the other
:class:`Axis`, :data:`MODELS`: a folder's group is the model of its cells
(``settings["hparams"]["model_name"]``, :func:`read_model`), a run is ``ALG/mode@model``,
the folders hold a kind of cell on the same records (:func:`read_models`), and b. pairs
``mode@M - spread@M`` within each model only: two models' cells are not the same edits
(:func:`pair_refusal`), so there is no reference. c. gives each model a table of its
own layers, and the header says what each model's weights are where its alias records
it (:func:`~easyedit_replay.models.weights_note`: ``gemma3-270m``'s are Q4_K_M,
dequantized).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..bundled import POINT_FIELDS
from ..errors import ReplayError
from ..models import weights_note
from ..tune import grid_scale_folders
from .cells import (
    cell_points, check_modes, collect_cells, describe, edit_cells, folder_points, missing_cells, plan_meta,
    recorded_points,
)
from .metrics import RunKey, metrics, run_order
from .report import update_norms
from .statistics import mean, paired_difference
from .tables import (
    against_spread, fmt, marked, norm_label, norm_order, norm_values, render_markdown, sequential_steps,
    summary_stat,
)

REFERENCE = "bundled"  # the tuned default point (docs/results.md, "At the paper's operating point")
SUMMARY_ONLY = ("n_boot", "seed")
RETENTION_KEY = "efficacy_exact"  # the per-edit value of the retention pairs (efficacy Acc)  # metric settings that change a cell's summary, not its per-edit rows
# hyperparameters two cells must share to be rows of the same edits (pair_refusal), and what they are
SAME_EDITS_HPARAMS = {"model_name": "models", "layers": "edit layers"}


@dataclass(frozen=True)
class Axis:
    """What the folders of a report differ in: each folder is one group of the axis.

    Attributes:
        option: the ``report`` option that reads the folders (``--points``).
        noun: one group in words, and the tables' column naming it (``point``).
        against_reference: pairs also cross groups, against spreading at the first folder's
            group (the reference); False: pairs within each group only.
        norms_per_group: one norm table per group over its own layers; False: one table
            over every group's layers.
    """

    option: str
    noun: str
    against_reference: bool
    norms_per_group: bool


POINTS = Axis("--points", "point", against_reference=True, norms_per_group=False)
MODELS = Axis("--models", "model", against_reference=False, norms_per_group=True)


@dataclass
class GroupCells:
    """One ``scale --out`` folder: one group of an :class:`Axis`.

    Attributes:
        group: the operating point (``bundled``, ``paper``, ``host-fe``; :data:`POINTS`)
            or the model (``smollm2-135m``, ``gemma3-270m``; :data:`MODELS`).
        source: the folder.
        found: its cells (:func:`~easyedit_replay.experiments.cells.collect_cells`).
        from_plan: how many of its edit cells lack ``operating_point`` and take the point
            that ``scale.json`` names (:data:`POINTS`; 0 for a model).
        axis: the axis the folder was read along.
    """

    group: str
    source: Path
    found: dict
    from_plan: int = 0
    axis: Axis = POINTS

    @property
    def point(self) -> str:
        """:attr:`group`, by its :data:`POINTS` name."""
        return self.group


@dataclass
class Pair:
    """One wanted paired difference on the same edits, ``mode@group - spread@against`` of
    algorithm ``alg`` at ``made`` edits made (None: one batch of n); ``group`` and
    ``against`` are :attr:`GroupCells.group` (a point, or the one model of a within-model pair).

    Attributes:
        stats: ``{metric key: (mean, lo, hi)}`` of ``metrics("scale")`` when formed, else None.
        retention: of a formed sequential pair, the paired difference of
            :data:`RETENTION_KEY` on each batch's edits made so far (batch 1 first), as in
            :func:`~easyedit_replay.experiments.tables.retention_paired_table`; else None.
        reason: why it is not formed: a side not evaluated (``missing``) or a
            :func:`pair_refusal`.
        differs: of a formed pair, :func:`hparams_differences` of its two cells: the
            hyperparameters that differ besides the expected ones, ``{field: (value at
            mode@group, value at spread@against)}``.
    """

    alg: str
    mode: str
    group: str
    against: str
    made: Optional[int]
    stats: Optional[Dict[str, tuple]] = None
    reason: Optional[str] = None
    missing: bool = False
    retention: Optional[List[tuple]] = None
    differs: Dict[str, tuple] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The pair as written in tables: ``"{mode}@{group} - spread@{against}"``."""
        return f"{self.mode}@{self.group} - spread@{self.against}"

    @property
    def label(self) -> str:
        """:attr:`text`, naming the hyperparameters of :attr:`differs` after it."""
        if not self.differs:
            return self.text
        return f"{self.text} ({', '.join(self.differs)} also {'differs' if len(self.differs) == 1 else 'differ'})"


# ----------------------------------------------------------------------------- reading


def _scale_folder(source, axis: Axis) -> Tuple[Path, dict]:
    """``(folder, its cells)`` of one ``scale --out`` folder given to ``axis.option``.

    Raises:
        ReplayError: not a folder; a ``tune --out`` folder or a point or window folder of
            one (:func:`~easyedit_replay.tune.grid_scale_folders`; it names one of the
            grid's ``scale`` folders).
    """
    path = Path(source)
    if not path.is_dir():
        raise ReplayError(f"report {axis.option} {source}: not a `scale --out` folder")
    grid = [] if (path / "cells").is_dir() else grid_scale_folders(path)
    if grid:
        raise ReplayError(f"report {axis.option} {source}: is a tune folder; {axis.option} reads scale folders (a "
                          f"tune grid's are its <point>/lambda<L> folders, e.g. {grid[0]})")
    return path, collect_cells(path)


def read_point(source) -> GroupCells:
    """The cells of one ``scale --out`` folder and its one operating point.

    Raises:
        ReplayError: those of :func:`_scale_folder`; its cells name more than one
            ``operating_point`` (they differ from the point ``scale.json`` names for the
            cells without it); or cells without ``operating_point`` (or no cells at all)
            and a ``scale.json`` that does not name exactly one point.
    """
    path, found = _scale_folder(source, POINTS)
    cells = edit_cells(found)
    points, unnamed = cell_points(found)
    named = set(points)
    plan = path / "scale.json"
    planned = recorded_points(path)
    if unnamed or not cells:
        if len(planned) != 1:
            what = f"{unnamed} of its cells lack the field `operating_point`" if cells else "it has no cells"
            plan_says = (f"its scale.json names {'the points ' + ', '.join(planned) if planned else 'none'}"
                         if plan.exists() else "it has no scale.json")
            raise ReplayError(f"report --points {source}: {what}, and {plan_says}; cannot tell its operating point")
        named.add(planned[0])
    if len(named) > 1:
        raise ReplayError(f"report --points {source}: its cells are at more than one operating point "
                          f"(field `operating_point`: {', '.join(sorted(named))}"
                          f"{'; the cells without it take ' + planned[0] + ' from scale.json' if unnamed else ''}); "
                          f"give each point a folder of its own")
    return GroupCells(named.pop(), path, found, unnamed)


def read_points(sources: Sequence, reference: str = REFERENCE) -> List[GroupCells]:
    """:func:`read_point` of every folder, the ``reference`` point first, the others in
    the order given.

    Raises:
        ReplayError: those of :func:`read_point`; two folders at the same point; no
            folder at ``reference`` (it says when that is the default, :data:`REFERENCE`,
            and names a point to pass as ``--reference``).
    """
    points: Dict[str, GroupCells] = {}
    for source in sources:
        p = read_point(source)
        if p.point in points:
            raise ReplayError(f"report --points: {points[p.point].source} and {source} are both at operating point "
                              f"{p.point} (field `operating_point`); give one folder per point")
        points[p.point] = p
    if reference not in points:
        default = " (the default)" if reference == REFERENCE else ""
        raise ReplayError(f"report --points: --reference {reference}{default}: no folder is at that point "
                          f"(points: {', '.join(points)}); pass --reference {next(iter(points))}")
    return [points[reference]] + [p for name, p in points.items() if name != reference]


def _model_of(cell: dict) -> Optional[str]:
    """The model a cell edited: ``settings["hparams"]["model_name"]`` (None when not recorded)."""
    return ((cell.get("settings") or {}).get("hparams") or {}).get("model_name")


def read_model(source) -> GroupCells:
    """The cells of one ``scale --out`` folder and its one model: its cells'
    ``settings["hparams"]["model_name"]`` or, with no cell, the ``model`` its
    ``scale.json`` names (:func:`~easyedit_replay.experiments.cells.plan_meta`).

    Raises:
        ReplayError: those of :func:`_scale_folder`; cells without a model name; cells of
            more than one model; no cell and a ``scale.json`` that names no model.
    """
    path, found = _scale_folder(source, MODELS)
    cells = edit_cells(found)
    unnamed = sum(1 for c in cells if not _model_of(c))
    if unnamed:
        raise ReplayError(f"report --models {source}: {unnamed} of its cells lack settings.hparams.model_name; "
                          f"cannot tell their model (rerun them with `scale`, which records it)")
    planned = plan_meta(path).get("model")
    models = sorted({_model_of(c) for c in cells}) if cells else [planned] if planned else []
    if not models:
        raise ReplayError(f"report --models {source}: it has no cells, and "
                          f"{'its scale.json names no model' if (path / 'scale.json').exists() else 'no scale.json'}; "
                          f"cannot tell its model")
    if len(models) > 1:
        raise ReplayError(f"report --models {source}: its cells are of more than one model "
                          f"(settings.hparams.model_name: {', '.join(models)}); give each model a folder of its own")
    return GroupCells(models[0], path, found, axis=MODELS)


def _kind_records(found: dict, kind: tuple) -> List[str]:
    """The records digests (``settings["records"]``) of the cells of ``kind``, sorted."""
    cells = (found["batch"].get(kind[1], {}).values() if kind[0] == "batch"
             else [c for steps in found["sequential"].get(kind[1], {}).values() for c in steps])
    return sorted({str((c.get("settings") or {}).get("records")) for c in cells})


def read_models(sources: Sequence) -> List[GroupCells]:
    """:func:`read_model` of every folder, in the order given, each folder holding a kind
    of cell (:func:`_kinds`) that the first also holds, and every kind that two folders
    hold on the same records in both (the same ``settings["records"]`` digest; each
    folder is checked against the first folder that holds the kind).

    Raises:
        ReplayError: one folder; those of :func:`read_model`; two folders of one model
            (it points to ``--points`` for one model's operating points); a folder with no
            kind of cell in common with the first (it names each one's kinds) or one on
            other records (it names the kind and the two digests); each says how to fix it.
    """
    if len(sources) < 2:
        raise ReplayError(f"report --models {sources[0] if sources else ''}: one folder; --models sets the scale "
                          f"folders of two or more models side by side (e.g. report --models "
                          f"docs/results/scale_cf docs/results/scale_cf_gemma3); one folder's tables: "
                          f"report DIR --markdown")
    models: Dict[str, GroupCells] = {}
    for source in sources:
        m = read_model(source)
        if m.group in models:
            raise ReplayError(f"report --models: {models[m.group].source} and {source} are both of model {m.group} "
                              f"(settings.hparams.model_name); give one folder per model (one model's operating "
                              f"points: report --points)")
        models[m.group] = m
    groups = list(models.values())
    first = groups[0]
    holders: Dict[tuple, GroupCells] = {k: first for k in _kinds(first.found)}  # the first folder with each kind
    first_kinds = set(holders)
    for g in groups[1:]:
        if not first_kinds.intersection(_kinds(g.found)):
            held = "; ".join(f"{m.group}: {', '.join(_where(k) for k in _kinds(m.found)) or 'no cell'}"
                             for m in (first, g))
            raise ReplayError(f"report --models: {first.source} and {g.source} have no kind of cell in common "
                              f"({held}); run `scale` for {g.group} with the --data, --records and --n (or "
                              f"--batch-size) of {first.source}")
        for k in _kinds(g.found):
            held_by = holders.setdefault(k, g)
            a, b = _kind_records(held_by.found, k), _kind_records(g.found, k)
            if a != b:
                raise ReplayError(f"report --models: {held_by.source} and {g.source} hold {_where(k)} on other "
                                  f"records (settings.records {', '.join(d[:8] for d in a)} vs "
                                  f"{', '.join(d[:8] for d in b)}); run `scale` for {g.group} with the --data "
                                  f"and --records of {held_by.source}")
    return groups


# ----------------------------------------------------------------------------- kinds and steps


def _numbers(cell: dict) -> dict:
    """Where a cell's ``summary`` and ``per_edit`` are: ``run`` of a one-batch cell, the step cell itself."""
    return cell["run"] if cell["kind"] == "batch" else cell


def _kinds(found: dict) -> List[tuple]:
    """``("batch", n)`` and ``("sequential", (b, total))`` of every kind ``found`` holds."""
    return [("batch", n) for n in found["batch"]] + [("sequential", bt) for bt in found["sequential"]]


def _planned_kind(cell: dict) -> tuple:
    return ("batch", cell["n"]) if cell["kind"] == "batch" else ("sequential", (cell["batch_size"], cell["total"]))


def _where(kind: tuple, made: Optional[int] = None) -> str:
    if kind[0] == "batch":
        return f"one batch of {kind[1]} edits"
    b, total = kind[1]
    return f"sequential: {total} edits in batches of {b}" + (f", {made} edits made" if made is not None else "")


def steps_of_kind(found: dict, kind: tuple) -> Dict[Optional[int], Dict[str, dict]]:
    """``{edits made: {"ALG/mode": evaluated cell}}`` of one kind: a sequential series'
    evaluated steps (:func:`~easyedit_replay.experiments.tables.sequential_steps`), or
    the one-batch cells of ``n`` under the key None."""
    if kind[0] == "batch":
        cells = found["batch"].get(kind[1], {})
        return {None: dict(cells)} if cells else {}
    return sequential_steps(found["sequential"].get(kind[1], {}))


def shared_algorithms(points: Sequence[GroupCells], kind: tuple) -> List[str]:
    """The algorithms with evaluated cells of ``kind`` in more than one group (point or
    model), in table order."""
    at: Dict[str, int] = {}
    for p in points:
        for alg in {RunKey.parse(k).alg for cells in steps_of_kind(p.found, kind).values() for k in cells}:
            at[alg] = at.get(alg, 0) + 1
    return sorted((a for a, n in at.items() if n > 1), key=lambda a: run_order(RunKey(a, "spread")))


def _runs_at(points: Sequence[GroupCells], kind: tuple, modes: Optional[Sequence[str]] = None) -> Dict[tuple, list]:
    """``{(alg, mode): [groups]}`` of the evaluated runs of ``kind`` of the
    :func:`shared_algorithms` (only ``modes``, all when None), in table order."""
    algs = shared_algorithms(points, kind)
    at: Dict[tuple, list] = {}
    for p in points:
        for key in dict.fromkeys(k for cells in steps_of_kind(p.found, kind).values() for k in cells):
            run = RunKey.parse(key)
            if run.alg in algs and (not modes or run.mode in modes):
                at.setdefault((run.alg, run.mode), []).append(p.group)
    return dict(sorted(at.items(), key=lambda item: run_order(RunKey(*item[0]))))


def shared_kinds(points: Sequence[GroupCells], modes: Optional[Sequence[str]] = None) -> List[tuple]:
    """The kinds of cell with an algorithm evaluated in more than one group (and, with
    ``modes``, a cell of one of them in one of ``modes``): one batch by n, then the
    sequential series."""
    kinds = dict.fromkeys(k for p in points for k in _kinds(p.found))
    return sorted((k for k in kinds if shared_algorithms(points, k) and (not modes or _runs_at(points, k, modes))),
                  key=lambda k: (k[0] != "batch", k[1]))


def single_point_runs(points: Sequence[GroupCells], kind: tuple,
                      modes: Optional[Sequence[str]] = None) -> List[Tuple[str, str, str]]:
    """``(alg, mode, group)`` of the runs of ``kind`` that the report shows (an algorithm
    of :func:`shared_algorithms`, a mode of ``modes``) but that only one group (point or
    model) has evaluated: nothing of that run to compare across groups, only its pairs
    against spreading. In table order."""
    return [(alg, mode, at[0]) for (alg, mode), at in _runs_at(points, kind, modes).items() if len(at) == 1]


# ----------------------------------------------------------------------------- pairs


def pair_refusal(cell: dict, reference: dict) -> Optional[str]:
    """Why the per-edit rows of two cells are not rows of the same edits, None when they
    are: both carry the records digest (``settings["records"]``) and it is the same, the
    evaluated case ids (``evaluated_cases``, sequential cells) are the same where both
    record them, both carry their hyperparameters (``settings["hparams"]``) and the
    model and edit layers in them (:data:`SAME_EDITS_HPARAMS`) are the same, the rows are
    as many, and the metric options that change a per-edit row (``settings["metrics"]``
    but ``n_boot`` and ``seed``) are the same. Other hyperparameters may differ: those a
    pair expects (the modes', the points' anchor settings) and the others, which
    :func:`hparams_differences` names."""
    sa, sb = cell.get("settings") or {}, reference.get("settings") or {}
    if not sa.get("records") or not sb.get("records"):
        return "a cell has no records digest (settings.records)"
    if sa["records"] != sb["records"]:
        return f"records differ (settings.records {sa['records'][:8]} vs {sb['records'][:8]})"
    ca, cb = cell.get("evaluated_cases"), reference.get("evaluated_cases")
    if ca is not None and cb is not None and ca != cb:
        return "evaluated case ids differ (evaluated_cases)"
    ha, hb = sa.get("hparams"), sb.get("hparams")
    if not ha or not hb:
        return "a cell has no hyperparameters (settings.hparams)"
    for name, what in SAME_EDITS_HPARAMS.items():
        if ha.get(name) != hb.get(name):
            return f"{what} differ (settings.hparams.{name} {ha.get(name)} vs {hb.get(name)})"
    na, nb = len(_numbers(cell)["per_edit"]), len(_numbers(reference)["per_edit"])
    if na != nb:
        return f"{na} and {nb} per-edit rows"
    ma, mb = ({k: v for k, v in (s.get("metrics") or {}).items() if k not in SUMMARY_ONLY} for s in (sa, sb))
    if ma != mb:
        return f"metric options differ ({', '.join(sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)))})"
    return None


def _mode_fields(mode: str) -> set:
    """The hyperparameters a mode spec sets (:func:`~easyedit_replay.targets.parse_mode`:
    ``replay_tau=0.25``'s ``replay_tau``, ``+refresh``'s ``sequential_refresh``, and
    ``+refresh=4``'s ``sequential_refresh_weight`` with it); none for
    a construction not registered in this process."""
    from ..targets import parse_mode

    try:
        return set(parse_mode(mode)[1])
    except ValueError:
        return set()


def hparams_differences(cell: dict, reference: dict, across_points: bool) -> Dict[str, tuple]:
    """The hyperparameters (``settings["hparams"]``) of two cells that differ besides the
    ones a pair expects to differ: ``alg_name`` and the fields of each cell's mode spec
    (:func:`_mode_fields`) and, when the two cells are at two operating points
    (``across_points``), the point's anchor settings
    (:data:`~easyedit_replay.bundled.POINT_FIELDS`). ``{field: (cell's value,
    reference's value)}`` in field order; None for a field one cell does not record (at
    its dataclass default, :func:`~easyedit_replay.experiments.cells.hparams_settings`).
    A lambda (``mom2_update_weight``) that differs between two points is one of them: its
    effect is mixed into the pair's difference."""
    ha, hb = ((c.get("settings") or {}).get("hparams") or {} for c in (cell, reference))
    expected = {"alg_name"} | _mode_fields(cell["mode"]) | _mode_fields(reference["mode"])
    if across_points:
        expected |= set(POINT_FIELDS)
    return {k: (ha.get(k), hb.get(k)) for k in sorted(set(ha) | set(hb))
            if k not in expected and ha.get(k) != hb.get(k)}


def pairs(points: Sequence[GroupCells], kind: tuple, modes: Optional[Sequence[str]] = None,
          n_boot: int = 1000, seed: int = 0) -> List[Pair]:
    """Every wanted paired difference of ``kind`` (``points[0]`` is the reference point R),
    for the algorithms of :func:`shared_algorithms`, at every number of edits made that
    some point has evaluated: ``mode@P - spread@P`` and, for P other than R, ``mode@P -
    spread@R`` for each non-spread mode evaluated at P (only ``modes``, all when None),
    and ``spread@P - spread@R`` where P has evaluated that algorithm (``spread`` in
    ``modes``). Groups of an axis without a reference (:attr:`Axis.against_reference`,
    models) have the ``mode@M - spread@M`` pairs only. A pair is formed (``stats``:
    :func:`paired_difference` of each ``metrics("scale")`` key, ``n_boot`` resamples,
    ``seed``; ``differs``: :func:`hparams_differences`) when both sides are evaluated and
    :func:`pair_refusal` has nothing; otherwise ``reason`` says why. In table order:
    algorithm, mode, group, against, edits made."""
    ms = metrics("scale")
    algs = shared_algorithms(points, kind)
    steps = [steps_of_kind(p.found, kind) for p in points]
    ref = points[0].group
    across = points[0].axis.against_reference
    order = {p.group: i for i, p in enumerate(points)}
    out: List[Pair] = []

    def add(alg, mode, group, against, made, cell, spread):
        pair = Pair(alg, mode, group, against, made)
        if cell is None or spread is None:
            pair.missing = True
            pair.reason = f"{mode + '@' + group if cell is None else 'spread@' + against} not evaluated"
        else:
            pair.reason = pair_refusal(cell, spread)
            if pair.reason is None:
                pair.differs = hparams_differences(cell, spread, group != against)
                rows, reference = _numbers(cell)["per_edit"], _numbers(spread)["per_edit"]
                pair.stats = {m.key: paired_difference(rows, reference, m.key, n_boot, seed) for m in ms}
                if kind[0] == "sequential":
                    b = kind[1][0]
                    pair.retention = [paired_difference(rows[j * b:(j + 1) * b], reference[j * b:(j + 1) * b],
                                                        RETENTION_KEY, n_boot, seed) for j in range(made // b)]
        out.append(pair)

    for made in sorted({m for s in steps for m in s}, key=lambda m: m or 0):
        ref_cells = steps[0].get(made, {})
        for p, by_made in zip(points, steps):
            cells = {k: c for k, c in by_made.get(made, {}).items() if RunKey.parse(k).alg in algs}
            for against, spreads in [(p.group, cells)] + ([(ref, ref_cells)] if p.group != ref and across else []):
                for alg, mode, cell, spread in against_spread(cells, spreads, missing=True):
                    if not modes or mode in modes:
                        add(alg, mode, p.group, against, made, cell, spread)
            if p.group != ref and across and (not modes or "spread" in modes):
                for alg in sorted({RunKey.parse(k).alg for k in cells}, key=lambda a: algs.index(a)):
                    add(alg, "spread", p.group, ref, made, cells.get(RunKey(alg, "spread").text),
                        ref_cells.get(RunKey(alg, "spread").text))
    out.sort(key=lambda q: (run_order(RunKey(q.alg, q.mode)), order[q.group], q.against != q.group, q.made or 0))
    return out


# ----------------------------------------------------------------------------- tables


def side_by_side_table(points: Sequence[GroupCells], kind: tuple,
                       modes: Optional[Sequence[str]] = None) -> List[List[str]]:
    """Rows (header first) of ``kind``: the ``metrics("scale")``, mean [95% CI], one row
    per algorithm (:func:`shared_algorithms`), mode (``modes``, all when None), group
    (point or model: :attr:`Axis.noun` heads its column) and, for a sequential series,
    number of edits made, the groups of one run next to each other."""
    ms = metrics("scale")
    seq = kind[0] == "sequential"
    algs = shared_algorithms(points, kind)
    rows = []
    for i, p in enumerate(points):
        for made, cells in steps_of_kind(p.found, kind).items():
            for key, cell in cells.items():
                k = RunKey.parse(key)
                if k.alg in algs and (not modes or k.mode in modes):
                    summary = _numbers(cell)["summary"]
                    rows.append(((run_order(key), made or 0, i), [k.alg, k.mode, p.group]
                                 + ([str(made)] if seq else []) + [fmt(summary_stat(summary, m.key)) for m in ms]))
    header = ["algorithm", "mode", points[0].axis.noun] + (["edits made"] if seq else []) + [m.label for m in ms]
    return [header] + [row for _, row in sorted(rows, key=lambda r: r[0])]


def pairs_table(found_pairs: Sequence[Pair], kind: tuple) -> List[List[str]]:
    """Rows (header first) of the formed :func:`pairs`: each ``metrics("scale")`` paired
    difference, mean [95% paired bootstrap interval], ``*`` where it excludes 0."""
    seq = kind[0] == "sequential"
    ms = metrics("scale")
    rows = [["algorithm", "difference"] + (["edits made"] if seq else []) + [m.label for m in ms]]
    rows += [[q.alg, q.label] + ([str(q.made)] if seq else []) + [marked(q.stats[m.key]) for m in ms]
             for q in found_pairs if q.stats is not None]
    return rows


def _value(v) -> str:
    if v is None:
        return "default"
    return f"{v:g}" if isinstance(v, float) else str(v)


def differences_note(found_pairs: Sequence[Pair]) -> List[str]:
    """Markdown lines under a pairs table: for each formed pair whose cells differ in a
    hyperparameter besides the expected ones (:attr:`Pair.differs`), the fields and their
    two values, once per algorithm and difference; empty when there is none."""
    items = dict.fromkeys(f"- {q.alg}, {q.text}: " + "; ".join(f"{k} {_value(a)} vs {_value(b)}"
                                                                 for k, (a, b) in q.differs.items())
                          for q in found_pairs if q.stats is not None and q.differs)
    if not items:
        return []
    return [f"Besides the modes' own hyperparameters and, across points, the anchor settings a point sets "
            f"({', '.join(POINT_FIELDS)}), these pairs' cells differ in (mode@P's value vs spread's); their "
            f"effect is mixed into the difference:", "", *items, ""]


def retention_pairs_table(found_pairs: Sequence[Pair]) -> List[List[str]]:
    """Rows (header first) of the formed sequential :func:`pairs`: the paired difference
    of efficacy Acc on each batch's edits, mean [95% paired bootstrap interval] (``*``:
    excludes 0), empty for a batch not yet made: whether a run keeps an earlier batch
    better than spreading at its own or at the reference point."""
    formed = [q for q in found_pairs if q.retention is not None]
    n = max((len(q.retention) for q in formed), default=0)
    rows = [["algorithm", "difference", "edits made"] + [f"batch {j + 1}" for j in range(n)]]
    rows += [[q.alg, q.label, str(q.made)] + [marked(st) for st in q.retention] + [""] * (n - len(q.retention))
             for q in formed]
    return rows


def _analyses(points: Sequence[GroupCells], kind: tuple, modes) -> List[tuple]:
    """``(alg, mode, group, steps, analyses)`` per run of ``kind`` in table order: a
    one-batch cell's ``run["analyses"]`` (steps None), or a sequential run's step
    analyses over steps 1..S, S the fewest steps that run has made in any group (so the
    groups of one run are compared on the same batches)."""
    seq = kind[0] == "sequential"
    algs = shared_algorithms(points, kind)
    series = [p.found["sequential"].get(kind[1], {}) if seq
              else {k: [c] for k, c in p.found["batch"].get(kind[1], {}).items()} for p in points]
    runs = []
    for i, (p, by_key) in enumerate(zip(points, series)):
        for key, steps in by_key.items():
            k = RunKey.parse(key)
            if k.alg not in algs or (modes and k.mode not in modes):
                continue
            if seq:
                s = min(len(other[key]) for other in series if key in other)
                runs.append(((run_order(key), i), k.alg, k.mode, p.group, "1" if s == 1 else f"1-{s}",
                             [c["analysis"] for c in steps[:s]]))
            else:
                runs.append(((run_order(key), i), k.alg, k.mode, p.group, None, steps[0]["run"]["analyses"]))
    return [run[1:] for run in sorted(runs, key=lambda r: r[0])]


def norm_tables(points: Sequence[GroupCells], kind: tuple, modes: Optional[Sequence[str]] = None,
                only: Optional[str] = None) -> Tuple[List[List[str]], Optional[List[List[str]]]]:
    """``(update norms, anchor norms)``: rows (header first) per algorithm, mode and group
    of ``kind`` (:func:`_analyses`; only the group ``only``, and only its layers, when
    given: :attr:`Axis.norms_per_group`): the mean ``|dW|_F`` per layer
    (:func:`~easyedit_replay.experiments.report.update_norms`), and the mean anchor
    ``|delta|`` and targets ``|t|`` relative to the unedited model's mean norm of the
    module (:func:`~easyedit_replay.experiments.tables.norm_values`; None when no cell
    records them). Columns by layer number (layer 10 after layer 9); the ``|delta|``
    columns before the ``|t|`` ones (:func:`~easyedit_replay.experiments.tables.norm_order`)."""
    runs = [run for run in _analyses(points, kind, modes) if only is None or run[2] == only]
    first = ["algorithm", "mode", points[0].axis.noun] + (["steps"] if kind[0] == "sequential" else [])
    lead = [[alg, mode, point] + ([steps] if steps is not None else []) for alg, mode, point, steps, _ in runs]
    dw = [update_norms({"analyses": analyses}) for *_, analyses in runs]
    layers = sorted({l for norms in dw for l in norms})
    updates = [first + [f"|dW| layer {l}" for l in layers]]
    updates += [row + [f"{norms[l]:.1f}" if l in norms else "-" for l in layers] for row, norms in zip(lead, dw)]
    anchors = []
    for *_, analyses in runs:
        values = [norm_values(a.get("norms")) for a in analyses]
        anchors.append({n: mean(v.get(n) for v in values) for n in dict.fromkeys(n for v in values for n in v)})
    names = sorted({n for norms in anchors for n in norms}, key=norm_order)
    if not names:
        return updates, None
    table = [first + [norm_label(n) for n in names]]
    table += [row + [f"{norms[n]:.2f}" if n in norms else "-" for n in names] for row, norms in zip(lead, anchors)]
    return updates, table


# ----------------------------------------------------------------------------- the report


def points_markdown(sources: Sequence, reference: str = REFERENCE, modes: Optional[Sequence[str]] = None,
                    n_boot: int = 1000, seed: int = 0) -> str:
    """``report --points``: the markdown report of the module docstring over the
    ``scale --out`` folders ``sources``, one per operating point, ``reference`` the point
    spreading is compared at (a-d above); only ``modes`` (all when None).

    Raises:
        ReplayError: a folder's point cannot be told or is not one (it names the field
            ``operating_point``), two folders at one point, no folder at ``reference``
            (:func:`read_points`); an entry of ``modes`` that no folder's cells have
            (:func:`~easyedit_replay.experiments.cells.check_modes`).
    """
    points = read_points(sources, reference)
    check_modes(modes, [p.found for p in points], "report --points")
    lines = ["# `scale` cells across operating points", ""]
    for p in points:
        lines.append(f"- `{p.point}`{' (reference)' if p is points[0] else ''}: {p.source}"
                     + (f" ({p.from_plan} cells predate the field `operating_point` and take the point of "
                        f"scale.json)" if p.from_plan else ""))
    lines += ["", f"Cells: mean over edits [95% bootstrap interval]. Paired: `mode@P - spread@P` within a point, "
              f"`mode@P - spread@{reference}` against spreading at the reference point and `spread@P - "
              f"spread@{reference}`, on the same edits (same records, model and edit layers), mean [95% paired "
              f"bootstrap interval]; `*` marks an interval that excludes 0. Only algorithms evaluated at more than "
              f"one point in a kind of cell are shown (a mode of theirs evaluated at one point only is named under "
              f"the kind's heading); a sequential series pairs at the numbers of edits made both sides have "
              f"evaluated.",
              ""]
    return "\n".join(lines + _groups_markdown(points, modes, n_boot, seed))


def models_markdown(sources: Sequence, modes: Optional[Sequence[str]] = None, n_boot: int = 1000,
                    seed: int = 0) -> str:
    """``report --models``: the report of :func:`points_markdown` across models (the
    module docstring, :data:`MODELS`) over the ``scale --out`` folders ``sources``, one
    per model; only ``modes`` (all when None). The header names each folder's model, its
    operating points (:func:`~easyedit_replay.experiments.cells.folder_points`) and what
    its weights are (:func:`~easyedit_replay.models.weights_note`), and says once that no
    pair crosses models.

    Raises:
        ReplayError: one folder, a folder's model cannot be told or is not one, two
            folders of one model, folders with no kind of cell in common or on other
            records (:func:`read_models`); an entry of ``modes`` that no folder's cells
            have (:func:`~easyedit_replay.experiments.cells.check_modes`).
    """
    models = read_models(sources)
    check_modes(modes, [m.found for m in models], "report --models")
    lines = ["# `scale` cells across models", ""]
    for m in models:
        points, weights = folder_points(m.source, m.found), weights_note(m.group)
        notes = (([f"operating point {', '.join(points)}"] if points else [])
                 + ([f"weights: {weights}"] if weights else []))
        lines.append(f"- `{m.group}`: {m.source}" + (f" ({'; '.join(notes)})" if notes else ""))
    lines += ["", "Cells: mean over edits [95% bootstrap interval]. Paired: `mode@M - spread@M` within a model, on "
              "the same edits (same records, model and edit layers), mean [95% paired bootstrap interval]; `*` "
              "marks an interval that excludes 0. No pair crosses models: two models' cells are not the same edits "
              "(other weights, edit layers and anchors), so the models are compared through each one's own `mode - "
              "spread`. Only algorithms evaluated on more than one model in a kind of cell are shown (a mode of "
              "theirs evaluated on one model only is named under the kind's heading); a sequential series pairs at "
              "the numbers of edits made both sides have evaluated.",
              ""]
    return "\n".join(lines + _groups_markdown(models, modes, n_boot, seed))


def _groups_markdown(groups: Sequence[GroupCells], modes: Optional[Sequence[str]], n_boot: int,
                     seed: int) -> List[str]:
    """The markdown lines after the header of :func:`points_markdown` and
    :func:`models_markdown`: for each kind of cell shared by the groups
    (:func:`shared_kinds`), a-c of the module docstring, then d, along the groups' :class:`Axis`."""
    axis = groups[0].axis
    lines: List[str] = []
    kinds = shared_kinds(groups, modes)
    if not kinds:
        lines += [f"No kind of cell evaluated at more than one {axis.noun} has cells of --modes {','.join(modes)}."
                  if modes and shared_kinds(groups) else
                  f"No kind of cell is evaluated at more than one {axis.noun} yet.", ""]
    wanted: List[Tuple[tuple, Pair]] = []
    for kind in kinds:
        found_pairs = pairs(groups, kind, modes, n_boot, seed)
        wanted += [(kind, q) for q in found_pairs]
        norms = [(only, *norm_tables(groups, kind, modes, only))
                 for only in ([g.group for g in groups] if axis.norms_per_group else [None])]
        norms = [(only, updates, anchors) for only, updates, anchors in norms if only is None or len(updates) > 1]
        lines += [f"## {_where(kind).capitalize()}", ""]
        alone = single_point_runs(groups, kind, modes)
        if alone:
            lines += [f"Evaluated at one {axis.noun} only (no other {axis.noun} to compare the run with; its rows and "
                      f"its pairs against spreading are shown): "
                      + ", ".join(f"{RunKey(alg, mode).text} at {group}" for alg, mode, group in alone) + ".", ""]
        lines += [render_markdown(side_by_side_table(groups, kind, modes)), "",
                  "Paired differences on the same edits:", "", render_markdown(pairs_table(found_pairs, kind)), ""]
        lines += differences_note(found_pairs)
        if kind[0] == "sequential":
            lines += ["Retention, paired: the same differences on each batch's edits (efficacy Acc):", "",
                      render_markdown(retention_pairs_table(found_pairs)), ""]
        own = f" of each {axis.noun} (its own layers)" if axis.norms_per_group else ""
        lines += [f"Update norms, mean |dW|_F per edited layer{own}"
                  + (f" over steps 1..S (S: the fewest steps the run has made at any {axis.noun}):"
                     if kind[0] == "sequential" else ":"), ""]
        for only, updates, _ in norms:
            lines += ([f"`{only}`:", ""] if only else []) + [render_markdown(updates), ""]
        if any(anchors is not None for *_, anchors in norms):
            lines += ["Anchor |delta| and targets |t| relative to the unedited model's mean norm of the module "
                      "(|delta| / |h|), mean over the same batches (`-`: not recorded):", ""]
            for only, _, anchors in norms:
                if anchors is not None:
                    lines += ([f"`{only}`:", ""] if only else []) + [render_markdown(anchors), ""]
    missing = [f"- {_where(kind, q.made)}, {q.alg}: {q.text}: {q.reason}" for kind, q in wanted if q.missing]
    refused = [f"- {_where(kind, q.made)}, {q.alg}: {q.text}: {q.reason}" for kind, q in wanted
               if q.reason and not q.missing]
    # planned cells not finished, of the kinds finished or planned in more than one group
    planned = [(g, missing_cells(g.source)) for g in groups]
    seen = [set(_kinds(g.found)) | {_planned_kind(c) for c in cells} for g, cells in planned]
    across = set(shared_kinds(groups)) | {k for k in set().union(*seen) if sum(k in s for s in seen) > 1}
    unfinished = [f"- {g.group}: {describe(c)}" for g, cells in planned for c in cells
                  if _planned_kind(c) in across and (not modes or c["mode"] in modes)]
    for title, items in (("Missing pairs (a side not evaluated yet)", missing),
                         ("Not paired (not the same edits)", refused),
                         ("Planned cells not finished", unfinished)):
        if items:
            lines += [f"{title}:", ""] + items + [""]
    return lines
