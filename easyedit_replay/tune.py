"""``easyedit-replay tune``: the operating-point grid on a tuning split, and the rule
that picks the SmolLM2 default from it.

The grid is anchor settings (the named operating points of ``hparams/README.md``:
``bundled``, ``paper``, ``host-fe``) x covariance weight lambda
(``mom2_update_weight``) x algorithm x target construction, each cell ONE batch of
the same records, made by :func:`easyedit_replay.scale.run_scale` into
``OUT/<point>/lambda<L>/`` (so a cell of the grid is a ``scale`` cell, resumable, and
the anchors - which depend on neither lambda nor the algorithm among MEMIT, EMMET and
AlphaEdit - come from the anchor disk cache after the first cell of a point).

The records are a tuning split that no reported table uses: every reported table
uses prefixes of at most 768 records of its file (``docs/results``), the grid uses
records counted from the END of the file (``--records 1823:1919`` for CounterFact's
1,919, ``--records 952:1000`` for ZsRE's 1,000); :data:`TUNING_SPLITS` names them and a
test checks they are disjoint from the evaluation prefixes.

:data:`RULE` is the selection rule. It was written down and committed before the grid
ran; :func:`pick` applies it to the finished cells and :func:`write_tuning_report`
reports the whole grid with the picks.

The edit window is an optional axis (``tune --windows 1-4,2-5,4-7``, parsed by
:func:`parse_windows`): each window's cells go to ``OUT/<point>/w<first>-<last>/lambda<L>/``
with the YAML's ``layers`` set to the window; without windows the layout, ``grid.json``
and the report are as they were. :data:`WINDOW_RULE` extends :data:`RULE` to choose the
window; it was committed before any grid with more than one window ran. A window
moves the anchors (replay's sits at the window's first layer, spreading's at its last;
``v_loss_layer`` stays the YAML's, the model's last layer), so a windowed grid costs,
per operating point, one anchor set per distinct anchor layer of its windows
(:func:`anchor_layers`: the first layers for replay and the last layers for spread,
a layer that is both counted once), each shared by every lambda and by MEMIT, EMMET
and AlphaEdit (PMET's anchors are its own) - 5 per point for 1-4, 2-5, 4-7
(layers 1, 2, 4, 5, 7).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .bundled import POINT_FIELDS
from .errors import ReplayError
from .files import atomic_write_text

# The algorithms of the grid (``tune --algs``' default): the three that share anchors (PMET's are its own).
GRID_ALGORITHMS = ("MEMIT", "EMMET", "AlphaEdit")
# Record ranges (Python slices of the data file) of the tuning splits; the largest
# reported evaluation prefix is EVALUATION_PREFIX records.
TUNING_SPLITS = {"counterfact-val.json": (1823, 1919), "zsre-1k.json": (952, 1000)}
EVALUATION_PREFIX = 768
# The sequential screening splits (issue 30: candidates for sequential editing are
# screened on 4 batches here, then confirmed on the reported 8 x 96 series): the tuning
# split first, so that its first batch's anchors (banked by the grid) serve again, then
# the records just before it; ``--records`` text, taken in order.
SCREENING_SPLITS = {"counterfact-val.json": "1823:1919,1535:1823", "zsre-1k.json": "952:1000,808:952"}


@functools.lru_cache(maxsize=None)
def bundled_lambda(alg: str) -> Optional[float]:
    """``mom2_update_weight`` of ``alg``'s bundled SmolLM2 YAML (the rule's "bundled
    lambda"); None for an algorithm without one."""
    from .algorithms import load_hparams
    from .bundled import default_hparams_path

    path = default_hparams_path("smollm2-135m", f"{alg}_REPLAY")
    return float(load_hparams(path).mom2_update_weight) if path.exists() else None

TIE = 0.005

RULE = """\
Selection rule (fixed before the grid ran):
1. A cell's score is (mean efficacy Acc + mean generalization Acc) / 2 over its edits.
2. A cell is admissible when its mean DKL is no larger than the mean DKL of the same
   algorithm and construction at the bundled point with the bundled lambda (5000).
3. The default anchor settings are ONE point for every algorithm (as in the paper, and
   so that MEMIT, EMMET and AlphaEdit share anchors): the point with the highest mean,
   over MEMIT, EMMET and AlphaEdit, of the best admissible SPREAD score at that point
   (best over lambda). This is how a user adopts replay: they keep the YAML that is
   good for the stock method and change alg_name.
4. Each algorithm's default lambda is the lambda of its best admissible spread cell at
   the chosen point.
5. Each construction's own best cell: per algorithm and construction, the admissible
   cell with the highest score over all points and lambdas.
Ties: scores within 0.005 are equal; then the bundled point, then the bundled lambda,
then the smaller lambda wins. PMET is outside the grid: it takes the chosen point's
four anchor values and keeps its lambda (300).
"""

WINDOW_RULE = """\
Window rule (fixed before any grid with more than one edit window ran; it extends
rules 1-5 with the window as one more axis: a cell is point x window x lambda x
algorithm x construction):
W1. Admissible (replaces rule 2): a cell's mean DKL is no larger than the mean DKL of
    the same algorithm and construction at the provisional window (the window of the
    model's YAMLs; [2, 3, 4, 5] for Gemma 3 270M), the bundled point and the bundled
    lambda (5000).
W2. The point: rule 3, with each point's best admissible spread score taken over its
    windows and lambdas.
W3. The window is ONE for every algorithm (MEMIT, EMMET and AlphaEdit share anchors,
    as they share the point): at the chosen point, the window with the highest mean,
    over MEMIT, EMMET and AlphaEdit, of the best admissible SPREAD score at that
    window (best over lambda). A window that lacks an admissible spread cell for one
    of them is not chosen.
W4. Each algorithm's lambda (replaces rule 4): the lambda of its best admissible
    spread cell at the chosen point and window.
W5. Rule 5 runs over every point, window and lambda.
Ties: scores within 0.005 are equal; then the bundled point, then the provisional
window, then the bundled lambda, then the smaller lambda, then the window with the
smaller first (then last) layer wins.
"""


def parse_windows(text: str, option: str = "--windows") -> List[Tuple[int, ...]]:
    """The edit windows of ``--windows``, in the order given: ``"1-4,2-5,4-7"`` (contiguous
    inclusive layer ranges separated by commas) or ``"1,2,3,4;2,3,4,5"`` (explicit
    consecutive layer lists separated by semicolons; a range may stand in a
    semicolon-separated list too) -> ``[(1, 2, 3, 4), (2, 3, 4, 5), ...]``. Windows may
    share layers. Whether the layers exist is checked against the model
    (:func:`check_windows`).

    Raises:
        ReplayError: empty text or an empty window, a word that is not a layer range, a
            range that runs backwards (``5-2``), an explicit list that is not
            consecutive and increasing, commas that mix ranges with single layers, or a
            window given twice; the message names ``option`` and the fix.
    """
    fix = ("give contiguous inclusive layer ranges separated by commas, e.g. 1-4,2-5,4-7 (or explicit "
           "consecutive layer lists separated by ';', e.g. 1,2,3,4;2,3,4,5)")

    def bad(why: str) -> ReplayError:
        return ReplayError(f"{option} {text!r}: {why}; {fix}")

    def number(word: str) -> int:
        word = word.strip()
        if not word.isdigit():
            raise bad(f"{word!r} is not a layer index (a non-negative integer)")
        return int(word)

    def window(item: str) -> Tuple[int, ...]:
        item = item.strip()
        if not item:
            raise bad("an empty window")
        if "-" in item:
            ends = item.split("-")
            if len(ends) != 2 or "," in item:
                raise bad(f"{item!r} is not a layer range FIRST-LAST")
            first, last = number(ends[0]), number(ends[1])
            if last < first:
                raise bad(f"the range {item} runs backwards (out of order); write {last}-{first}")
            return tuple(range(first, last + 1))
        layers = tuple(number(x) for x in item.split(","))
        if any(b != a + 1 for a, b in zip(layers, layers[1:])):
            raise bad(f"the layers {item} are not consecutive and increasing (a window is a contiguous range)")
        return layers

    text = str(text or "")
    if not text.strip():
        raise bad("no window")
    if ";" in text:
        items = text.split(";")
    elif "-" in text:
        items = text.split(",")
        if not all("-" in item or not item.strip() for item in items):
            raise bad("commas mix layer ranges with single layers")
    else:
        items = [text]
    out: List[Tuple[int, ...]] = []
    for item in items:
        w = window(item)
        if w in out:
            raise bad(f"the window {window_name(w)} is given twice")
        out.append(w)
    return out


def window_name(window: Sequence[int]) -> str:
    """``(2, 3, 4, 5)`` -> ``"2-5"`` (a grid row's ``window``; the folder is ``w2-5``)."""
    return f"{window[0]}-{window[-1]}"


def window_key(name: str) -> Tuple[int, int]:
    """``"2-5"`` -> ``(2, 5)``, for ordering windows by their layers."""
    first, last = name.split("-")
    return int(first), int(last)


def check_windows(windows: Sequence[Sequence[int]], n_layers: Optional[int], option: str = "--windows") -> None:
    """Check that every window's layers exist in a model of ``n_layers`` decoder layers
    (nothing is checked when ``n_layers`` is None, i.e. unknown).

    Raises:
        ReplayError: a layer beyond the model (names ``option``, the model's layers and
            the fix).
    """
    if n_layers is None:
        return
    for w in windows:
        if max(w) >= n_layers:
            raise ReplayError(f"{option}: the window {window_name(w)} has layer {max(w)}, beyond the model's "
                              f"{n_layers} layers (0..{n_layers - 1}); give windows inside 0-{n_layers - 1}")


def yaml_window(by_point: Dict[str, Dict[str, object]], windows: Sequence[Sequence[int]],
                option: str = "--windows") -> Tuple[int, ...]:
    """The provisional window: the ``layers`` every YAML of the grid shares (the
    reference of :data:`WINDOW_RULE` item W1), checked to be one of ``windows``.

    Raises:
        ReplayError: the YAMLs' windows differ, or ``windows`` lacks theirs (the message
            names ``option`` and the window to add).
    """
    found = {tuple(hp.layers): f"{alg} at {point}" for point, by_alg in by_point.items()
             for alg, hp in by_alg.items()}
    if len(found) != 1:
        raise ReplayError(f"{option}: the YAMLs' windows differ ("
                          + ", ".join(f"{who} {list(w)}" for w, who in found.items())
                          + "); the window rule compares against one provisional window")
    ref = next(iter(found))
    if ref not in {tuple(w) for w in windows}:
        raise ReplayError(f"{option}: the YAMLs' window {list(ref)} is the rule's reference (item W1) and must be "
                          f"in the grid; add {window_name(ref)}")
    return ref


def window_hparams(hp, window: Sequence[int]):
    """``hp`` with its edit window set to ``window``: ``layers`` replaced; the anchor
    layers follow from ``layers`` (replay's first, spreading's last) and
    ``v_loss_layer`` stays the YAML's (the model's last layer), as a YAML with that
    window would have them.

    Raises:
        ReplayError: the YAML sets AlphaEdit's ``P_loc`` (a projection per layer of its
            own window) and ``window`` is another window.
        HyperParamsError: ``window`` is not a valid ``layers``.
    """
    if getattr(hp, "P_loc", None) and list(window) != list(hp.layers):
        raise ReplayError(f"--windows {window_name(window)}: {hp.alg_name}'s P_loc {hp.P_loc!r} holds projections "
                          f"for the layers {list(hp.layers)}; set P_loc: null to compute them per window")
    return hp.replace(layers=list(window))


def anchor_layers(windows: Sequence[Sequence[int]], modes: Sequence[str] = ("spread", "replay")) -> List[int]:
    """The distinct anchor layers of ``windows`` x ``modes`` (replay: each window's first
    layer, spreading: its last): one anchor set per layer and operating point, shared
    by every lambda and by MEMIT, EMMET and AlphaEdit (their objective does not depend
    on the window beyond the anchor layer), so a grid costs ``len(anchor_layers(...))``
    anchor sets per point.

    Raises:
        ValueError: an unknown mode.
    """
    from .targets import parse_mode

    return sorted({layer for w in windows for m in modes for layer in parse_mode(m)[0].anchor_layers(list(w))})


def grid_dir(out, point: str, lam: float, window: Optional[Sequence[int]] = None) -> Path:
    """``OUT/<point>/lambda<L>``: the ``scale`` output folder of one (point, lambda); with a
    ``window``, ``OUT/<point>/w<first>-<last>/lambda<L>``."""
    base = Path(out) / point
    if window is not None:
        base = base / f"w{window_name(window)}"
    return base / f"lambda{int(lam) if float(lam).is_integer() else lam}"


def run_tuning(model, tok, records: List[dict], by_point: Dict[str, Dict[str, object]], lambdas: Sequence[float],
               cfg, out_dir, stats_dir=None, meta: Optional[dict] = None,
               windows: Optional[Sequence[Sequence[int]]] = None) -> Path:
    """Make every missing grid cell, then write the report. Returns ``OUT/report.md``.

    Args:
        records: the tuning split (all of them are edited in one batch per cell).
        by_point: operating point -> {algorithm -> hyperparameters at that point}.
        lambdas: the values of ``mom2_update_weight``.
        cfg: a :class:`~easyedit_replay.scale.ScaleConfig` with ``sizes = [len(records)]``.
        windows: edit windows (:func:`parse_windows`); each sets the YAMLs' ``layers``
            (:func:`window_hparams`) and its cells go to ``OUT/<point>/w<first>-<last>/lambda<L>``.
            None: the YAMLs' own window, cells in ``OUT/<point>/lambda<L>`` (as before the
            window axis). The YAMLs' window must be among them (the rule's reference).

    Raises:
        ReplayError: a window beyond the model or without the YAMLs' window
            (:func:`check_windows`, :func:`yaml_window`, :func:`window_hparams`); as
            :func:`~easyedit_replay.scale.run_scale`.
    """
    from .experiments.scale import run_scale
    from .model_info import num_layers

    check_layout(out_dir, bool(windows))
    if windows:
        check_windows(windows, num_layers(model))
        ref = window_name(yaml_window(by_point, windows))
        windowed = {point: {w: {a: window_hparams(hp, w) for a, hp in by_alg.items()} for w in windows}
                    for point, by_alg in by_point.items()}
    for point, by_alg in by_point.items():
        for window in windows or [None]:
            base = by_alg if window is None else windowed[point][window]
            extra = {} if window is None else {"window": window_name(window), "yaml_window": ref}
            for lam in lambdas:
                hps = {a: hp.replace(mom2_update_weight=float(lam)) for a, hp in base.items()}
                run_scale(model, tok, records, hps, cfg, grid_dir(out_dir, point, lam, window), stats_dir=stats_dir,
                          meta=dict(meta or {}, operating_point=point, mom2_update_weight=float(lam), **extra),
                          report=False)
    return write_tuning_report(out_dir)


def check_layout(out_dir, windowed: bool) -> None:
    """Check that ``OUT`` holds no grid of the other layout (window folders for a grid
    without windows, or the reverse): one report reads one layout.

    Raises:
        ReplayError: ``OUT`` holds the other layout (names ``--windows`` and ``--out``).
    """
    out = Path(out_dir)
    if not out.is_dir():
        return
    kinds = {window is not None for _, window, _ in _grid_folders(out)}
    if kinds and kinds != {windowed}:
        have, want = ("folders without a window (<point>/lambda<L>)", "with --windows") if windowed else (
            "window folders (<point>/w<first>-<last>)", "without --windows")
        raise ReplayError(f"--out {out}: holds {have}; a grid {want} goes to another --out folder "
                          "(one report reads one layout)")


def _grid_folders(out_dir) -> Iterator[Tuple[str, Optional[str], Path]]:
    """``(point, window name or None, lambda folder)`` of every grid folder: ``OUT/<point>/lambda<L>``
    and ``OUT/<point>/w<first>-<last>/lambda<L>``."""
    for point_dir in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        for lam_dir in sorted(point_dir.glob("lambda*")):
            yield point_dir.name, None, lam_dir
        for win_dir in sorted((p for p in point_dir.glob("w*-*") if p.is_dir()), key=lambda p: window_key(p.name[1:])):
            for lam_dir in sorted(win_dir.glob("lambda*")):
                yield point_dir.name, win_dir.name[1:], lam_dir


def grid_of(folder) -> Optional[Path]:
    """The ``tune --out`` folder whose grid has ``folder`` as one of its ``scale`` folders
    (``OUT/<point>/lambda<L>`` or ``OUT/<point>/w<first>-<last>/lambda<L>``, as
    :func:`_grid_folders` finds them), or None: a ``scale --out`` folder of its own."""
    f = Path(folder).resolve()
    if not f.name.startswith("lambda") or len(f.parents) < 3:
        return None
    try:
        windowed = f.parent.name.startswith("w") and len(window_key(f.parent.name[1:])) == 2
    except ValueError:
        windowed = False
    root = f.parents[2] if windowed else f.parents[1]
    try:
        return root if any(lam.resolve() == f for _, _, lam in _grid_folders(root)) else None
    except ValueError:  # a folder beside the points named w<...>-<...> that is no window: no grid
        return None


def grid_scale_folders(path) -> List[Path]:
    """The ``scale`` output folders (``lambda<L>``) of a ``tune`` grid at ``path``: every one
    of the grid when ``path`` is a ``tune --out`` folder, those of one point
    (``OUT/<point>``) or one window (``OUT/<point>/w<first>-<last>``); empty for any
    other folder (a ``scale --out`` folder among them)."""
    p = Path(path)
    if not p.is_dir():
        return []
    found = [lam for _, _, lam in _grid_folders(p)] + sorted(p.glob("lambda*")) + sorted(p.glob("w*-*/lambda*"))
    return [f for f in found if (f / "scale.json").is_file() or (f / "cells").is_dir()]


def grid_rows(out_dir) -> List[dict]:
    """One dict per finished grid cell: point, window (only for the cells of a window
    folder: ``"2-5"``), lambda, alg, mode, n, the means of efficacy Acc, generalization
    Acc, DKL, Top-1 and fluency, the score and per-layer update norms (``update_norm``:
    layer -> Frobenius norm of the weight change)."""
    from .experiments.cells import collect_cells

    rows = []
    for point, window, lam_dir in _grid_folders(out_dir):
        found = collect_cells(lam_dir)
        for n, cells in found["batch"].items():
            for key, cell in cells.items():
                s = cell["run"]["summary"]
                mean = lambda k: (s.get(k) or [None])[0]  # noqa: E731
                norms = {}
                for a in cell["run"].get("analyses") or []:
                    for name, v in (a.get("update_norm") or {}).items():
                        layer = int(name.split(".")[2]) if name.split(".")[2].isdigit() else name
                        norms[layer] = norms.get(layer, 0.0) + v
                eff, gen = mean("efficacy_exact"), mean("generalization_exact")
                row = {"point": point} if window is None else {"point": point, "window": window}
                row.update({"lambda": float(lam_dir.name[len("lambda"):]),
                            "alg": cell["alg"], "mode": cell["mode"], "n": n, "eff_acc": eff, "gen_acc": gen,
                            "dkl": mean("locality_dkl"), "top1": mean("locality_top1"),
                            "fluency": mean("fluency"), "score": (eff + gen) / 2, "update_norm": norms,
                            "_per_edit": cell["run"]["per_edit"]})
                rows.append(row)
    return rows


def _rank(r: dict, window: Optional[str] = None) -> tuple:
    """The tie order of :data:`RULE` (bundled point, bundled lambda, smaller lambda); for
    a row of a window folder that of :data:`WINDOW_RULE` (the provisional ``window``
    after the point, the smaller window last)."""
    lam = (r["lambda"] != bundled_lambda(r["alg"]), r["lambda"])
    if "window" not in r:
        return (r["point"] != "bundled",) + lam
    return (r["point"] != "bundled", r["window"] != window) + lam + (window_key(r["window"]),)


def _better(a: dict, b: Optional[dict], window: Optional[str] = None) -> bool:
    """``a`` beats ``b`` under :data:`RULE`'s score and tie order (:data:`WINDOW_RULE`'s for
    rows of window folders, ``window`` the provisional one)."""
    if b is None:
        return True
    if abs(a["score"] - b["score"]) > TIE:
        return a["score"] > b["score"]
    return _rank(a, window) < _rank(b, window)


def admissible(rows: Sequence[dict], window: Optional[str] = None) -> List[dict]:
    """The rows whose DKL is no larger than their (alg, mode) cell at the bundled point
    and bundled lambda (:data:`RULE` item 2) and, for rows of window folders, the
    provisional ``window`` (:data:`WINDOW_RULE` item W1); rows without that reference
    are dropped."""
    ref = {(r["alg"], r["mode"]): r["dkl"] for r in rows
           if r["point"] == "bundled" and r["lambda"] == bundled_lambda(r["alg"]) and r.get("window") == window}
    return [r for r in rows if (r["alg"], r["mode"]) in ref and r["dkl"] <= ref[(r["alg"], r["mode"])]]


def _first_best(scores: Dict[str, float], preferred) -> Optional[str]:
    """The name with the highest score, a score within :data:`TIE` of an earlier one in
    ``preferred`` order (a sort key) counting as equal."""
    chosen = None
    for name in sorted(scores, key=preferred):
        if chosen is None or scores[name] > scores[chosen] + TIE:
            chosen = name
    return chosen


def pick(rows: Sequence[dict], window: Optional[str] = None) -> dict:
    """Apply :data:`RULE`: ``{"point", "point_scores": {point: mean best spread score},
    "lambda": {alg: lambda}, "default_cells": {alg: row}, "best": {(alg, mode): row},
    "window": None, "window_scores": {}}``.

    Rows of window folders (with a ``window`` key) follow :data:`WINDOW_RULE`, ``window``
    being the provisional window (``"2-5"``): ``"window"`` is the chosen window (None
    while undecidable), ``"window_scores"`` the mean best admissible spread score per
    window at the chosen point, and the lambdas and default cells are those at the
    chosen point and window."""
    ok = admissible(rows, window)
    spread = [r for r in ok if r["mode"] == "spread"]
    algs = sorted({r["alg"] for r in spread})
    chosen, scores, cells = _choose(spread, "point", algs, lambda p: (p != "bundled", p), window)
    best = _best_by(ok, lambda r: (r["alg"], r["mode"]), window)
    chosen_window, window_scores = None, {}
    if any("window" in r for r in rows):
        chosen_window, window_scores, cells = _choose([r for r in spread if r["point"] == chosen], "window", algs,
                                                      lambda w: (w != window, window_key(w)), window)
    return {"point": chosen, "point_scores": scores, "lambda": {a: c["lambda"] for a, c in cells.items()},
            "default_cells": cells, "best": best, "window": chosen_window, "window_scores": window_scores}


def _best_by(rows: Sequence[dict], key, window: Optional[str] = None) -> Dict[tuple, dict]:
    """The best of ``rows`` per ``key(row)`` (:func:`_better`; ``window`` the provisional one)."""
    best: Dict[tuple, dict] = {}
    for r in rows:
        if _better(r, best.get(key(r)), window):
            best[key(r)] = r
    return best


def _choose(spread: Sequence[dict], axis: str, algs: Sequence[str], preferred,
            window: Optional[str] = None) -> Tuple[Optional[str], Dict[str, float], Dict[str, dict]]:
    """One choice of :data:`RULE` items 3-4 (``axis`` ``"point"``) or :data:`WINDOW_RULE`
    items W3-W4 (``axis`` ``"window"``, ``spread`` already at the chosen point):
    ``(chosen value, {value: mean over algs of the best admissible spread score},
    {alg: its best spread cell at the chosen value})``. A value lacking a cell of one of
    ``algs`` has no score; ``preferred`` is the tie order (:func:`_first_best`)."""
    best = _best_by(spread, lambda r: (r[axis], r["alg"]), window)
    scores = {v: sum(best[(v, a)]["score"] for a in algs) / len(algs) for v in sorted({v for v, _ in best})
              if all((v, a) in best for a in algs)}
    chosen = _first_best(scores, preferred)
    return chosen, scores, ({a: best[(chosen, a)] for a in algs} if chosen else {})


def anchor_norms(anchor_dir, records: Sequence[dict], model: Optional[str] = None) -> List[dict]:
    """Anchor norms of ``records`` found in an anchor store, per operating point and
    anchor layer: ``[{"point", "layer", "n", "ratio", "delta", "h"}]`` with the means over
    requests of ``|delta| / |h|``, ``|delta|`` and ``|h|`` (``h`` = the anchor site's
    output before editing, ``init`` of :class:`~easyedit_replay.anchors.AnchorResult`;
    one site per layer: MEMIT's YAMLs, which EMMET and AlphaEdit share). Read from the
    files' metadata, no model: a file counts when its request (prompt, subject,
    target_new) is one of ``records`` and its objective matches a bundled point's four
    anchor settings; of the model fingerprints found (a sequential series banks
    anchors made on edited weights too) the one with the most requests is used.

    ``model``: the alias of the model whose bundled YAMLs name the points (default
    SmolLM2's); given, a file counts only when its loss module is that YAML's
    (``v_loss_layer``), which keeps apart the anchors of two models sharing a store
    and records (an unknown name falls back to SmolLM2's points, unfiltered)."""
    from safetensors import safe_open

    from .algorithms import load_hparams
    from .anchors.store import AnchorStore
    from .bundled import OPERATING_POINTS, default_hparams_path

    loss_module = None
    if model is not None and default_hparams_path(model, "MEMIT_REPLAY").exists():
        hp = load_hparams(default_hparams_path(model, "MEMIT_REPLAY"))
        loss_module = hp.layer_module_tmp.format(hp.v_loss_layer)
    else:
        model = "smollm2-135m"
    points = {}
    for point in OPERATING_POINTS:
        path = default_hparams_path(model, "MEMIT_REPLAY", point)
        if path.exists():
            hp = load_hparams(path)
            points[tuple(float(getattr(hp, f)) for f in POINT_FIELDS)] = point
    wanted = set()
    for r in records:
        prompt = r["prompt"] if "{}" in r["prompt"] else r["prompt"].replace(r["subject"], "{}", 1)
        wanted.add((prompt, r["subject"], r["target_new"].strip()))
    acc: Dict[Tuple[str, int], Dict[str, List[Tuple[float, float]]]] = {}
    for path, key, _ in AnchorStore(Path(anchor_dir)).stored():
        req = key["request"]
        point = points.get(tuple(float(key["hparams"][k]) for k in POINT_FIELDS))
        if (point is None or len(key["sites"]) != 1
                or (loss_module is not None and key.get("loss_module") != loss_module)
                or (req["prompt"], req["subject"], req["target_new"].strip()) not in wanted):
            continue
        with safe_open(str(path), framework="pt") as f:
            delta, init = f.get_tensor("delta").float(), f.get_tensor("init").float()
        group = acc.setdefault((point, int(key["layer"])), {}).setdefault(key["model"], [])
        group.append((float(delta.norm()), float(init.norm())))
    out = []
    for (point, layer), by_model in sorted(acc.items()):
        vals = max(by_model.values(), key=len)  # the weights most of these requests were anchored on
        n = len(vals)
        out.append({"point": point, "layer": layer, "n": n, "ratio": sum(d / h for d, h in vals) / n,
                    "delta": sum(d for d, _ in vals) / n, "h": sum(h for _, h in vals) / n})
    return out


def _axes(windowed: bool) -> List[str]:
    """The columns that name a cell before its lambda: the point, and the window in a
    windowed grid (a table's header, and the keys of a row's values)."""
    return ["point", "window"] if windowed else ["point"]


def _row_text(r: dict, windowed: bool = False) -> List[str]:
    norms = " ".join(f"{r['update_norm'][k]:.1f}" for k in sorted(r["update_norm"], key=str))
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [r[k] for k in _axes(windowed)] + [f"{r['lambda']:g}", r["alg"], r["mode"], f(r["eff_acc"]),
                                               f(r["gen_acc"]), f(r["score"]), f(r["dkl"]), f(r["top1"]),
                                               f(r["fluency"]), norms]


def _cell_name(r: dict, windowed: bool) -> str:
    """``bundled lambda 5000`` (``bundled window 2-5 lambda 5000`` in a windowed grid)."""
    return f"{r['point']}{' window ' + r['window'] if windowed else ''} lambda {r['lambda']:g}"


def _paired_lines(rows: Sequence[dict], chosen: dict, windowed: bool = False) -> List[str]:
    """Paired differences replay - spread on the same edits (95% paired bootstrap
    interval, :func:`~easyedit_replay.experiments.statistics.paired_difference`; the
    ``paired`` metrics): at each point (and window, in a windowed grid) with each
    algorithm's default lambda, and each construction at its own best admissible cell
    against spreading at ITS best."""
    from .experiments.metrics import metrics
    from .experiments.statistics import paired_difference
    from .experiments.tables import fmt, render_markdown

    paired = metrics("paired")

    def pair(r, ref):
        return [fmt(paired_difference(r["_per_edit"], ref["_per_edit"], m.key), signed=True) for m in paired]

    cells = {(r["point"], r.get("window"), r["lambda"], r["alg"], r["mode"]): r for r in rows}
    header = _axes(windowed) + ["lambda", "alg", "spread eff. / gen. / DKL", "replay eff. / gen. / DKL"] + [
        f"replay - spread {m.label}" for m in paired]
    order = (lambda x: (x[0][3], x[0][0], window_key(x[0][1]))) if windowed else (lambda x: (x[0][3], x[0][0]))
    table = [header]
    for (point, window, lam, alg, mode), r in sorted(cells.items(), key=order):
        ref = cells.get((point, window, lam, alg, "spread"))
        if mode != "replay" or ref is None or lam != chosen["lambda"].get(alg, bundled_lambda(alg)):
            continue
        f = lambda c: f"{c['eff_acc']:.2f} / {c['gen_acc']:.2f} / {c['dkl']:.3f}"  # noqa: E731
        table.append([r[k] for k in _axes(windowed)] + [f"{lam:g}", alg, f(ref), f(r)] + pair(r, ref))
    best = [["alg", "replay's best cell", "spread's best cell"] + [f"replay - spread {m.label}" for m in paired]]
    for (alg, mode), r in sorted(chosen["best"].items()):
        ref = chosen["best"].get((alg, "spread"))
        if mode == "replay" and ref is not None:
            best.append([alg, _cell_name(r, windowed), _cell_name(ref, windowed)] + pair(r, ref))
    where = "At each point and window" if windowed else "At each point"
    return (["", "## Replay against spreading on the same edits", "",
             f"{where}, with each algorithm's default lambda (the rule's pick; AlphaEdit's solve does not read "
             "lambda, its L2 term regularizes instead):", ""] + render_markdown(table).splitlines()
            + ["", "Each at its own best admissible cell (rule item 5):", ""] + render_markdown(best).splitlines())


def _edit_span(windows: Sequence[str], rows: Sequence[dict]) -> Optional[Tuple[int, int]]:
    """The first and last edit layer of a grid of one window: that window's ends, else
    (a grid without window folders) the ends of the layers its spread and replay cells
    changed (``update_norm``); None when there is no one such span."""
    if len(windows) == 1:
        return window_key(windows[0])
    spans = {(min(layers), max(layers)) for r in rows if r["mode"] in ("spread", "replay")
             for layers in [[k for k in r.get("update_norm", {}) if isinstance(k, int)]] if layers}
    return spans.pop() if len(spans) == 1 else None


def _anchor_norm_lines(meta: dict, windows: Sequence[str] = (), cells: Sequence[dict] = ()) -> List[str]:
    """The report's anchor-norm section: the table of :func:`anchor_norms` of the grid's
    records in the anchor store in use, for the grid's model; when the data file is
    absent, or the store holds none of the grid's anchors, a note saying so, where the
    anchors were looked for and how to point at the bank (also printed to stderr).
    ``windows``: the grid's windows, named in the text when more than one; with one or
    none, the text names the anchor layers of the grid's window (:func:`_edit_span` of
    ``windows`` and ``cells``, the grid's rows)."""
    from .anchors.store import ENV_DIR, anchor_cache_dir
    from .data import load_records, parse_records
    from .experiments.tables import render_markdown

    data, store = meta.get("data"), anchor_cache_dir()
    norms = []
    if not data or not Path(data).exists():
        why = f"the grid's data file {data} is absent (the anchors are matched to its records)" if data else \
            "the grid's scale.json names no data file (the anchors are matched to its records)"
    elif not store.is_dir():
        why = f"no anchor folder at {store}"
    else:
        records = load_records(data, records=parse_records(meta.get("records") or ":"))
        norms = anchor_norms(store, records, model=meta.get("model"))
        why = f"{store} holds no anchor of the grid's records at its points"
    if not norms:
        note = (f"Not reported: {why}. Anchors are looked for in ${ENV_DIR} (default: the cache root's anchors/), "
                f"here {store}; point {ENV_DIR} at the anchor bank the grid was made with (this repository's: "
                "docs/results/anchors) and rerun `easyedit-replay tune --report-only --out OUT`.")
        print(f"note: anchor norms: {note}", file=sys.stderr)
        return ["", "## Anchor norms", "", note]
    rows = [["point", "anchor layer", "requests", "mean abs(delta) / abs(h)", "mean abs(delta)", "mean abs(h)"]]
    rows += [[r["point"], str(r["layer"]), str(r["n"]), f"{r['ratio']:.3f}", f"{r['delta']:.1f}", f"{r['h']:.1f}"]
             for r in norms]
    span = _edit_span(windows, cells) if len(windows) < 2 else None
    if len(windows) > 1:
        which = f"A window's first layer is replay's anchor, its last spreading's (windows {', '.join(windows)})"
    elif span:
        which = f"Layer {span[0]} is replay's anchor (the first edit layer), layer {span[1]} spreading's (the last)"
    else:
        which = "The first edit layer is replay's anchor, the last spreading's"
    return ["", "## Anchor norms", "", f"{which}; h = the layer's output at the subject's last token before "
            "editing, delta = the optimized change (its norm is clamped to clamp_norm_factor x abs(h)).",
            ""] + render_markdown(rows).splitlines()


def _grid_meta(out: Path) -> dict:
    """The ``meta`` of the first ``scale.json`` of the grid in :func:`_grid_folders`' order
    (model, data, records; in a windowed grid also ``window`` and ``yaml_window``); empty
    when no grid folder has one."""
    for _, _, lam_dir in _grid_folders(out):
        if (lam_dir / "scale.json").exists():
            return json.loads((lam_dir / "scale.json").read_text()).get("meta", {})
    return {}


# what ``--out`` of ``tune --report-only`` should hold (the refusals of :func:`_check_grid`)
_GRID_CONTENTS = ("the grid folders that `tune --out OUT` writes: <point>/lambda<L>/ (<point>/w<first>-<last>/lambda<L>/ "
                 "with --windows), each with its scale.json and cells/")


def _check_grid(out: Path) -> None:
    """Check that ``out`` holds a ``tune`` grid: a grid folder (:func:`_grid_folders`) with
    its ``scale.json``.

    Raises:
        ReplayError: ``out`` is missing or not a folder, or holds no such grid folder (a
            ``scale --out`` folder included); the message names ``--out`` and what it
            should contain (:data:`_GRID_CONTENTS`).
    """
    if not out.is_dir():
        why = "not a folder" if out.exists() else "no such folder"
        raise ReplayError(f"--out {out}: {why}; give the folder of a tune grid, holding {_GRID_CONTENTS}")
    if not any((lam_dir / "scale.json").exists() for _, _, lam_dir in _grid_folders(out)):
        scale = (" (it is a `scale --out` folder: `easyedit-replay scale --report-only --out` reports it)"
                 if (out / "scale.json").exists() else "")
        raise ReplayError(f"--out {out}: no tune grid here{scale}; the folder should hold {_GRID_CONTENTS}")


def write_tuning_report(out_dir) -> Path:
    """Write ``OUT/report.md`` (the rule, the picks, the whole grid) and ``OUT/grid.json``.

    A grid of more than one window (``tune --windows``) is reported under :data:`RULE`
    and :data:`WINDOW_RULE`, with the chosen window among the picks and a window column
    in every table; a grid of one window reads as one without the axis (only ``grid.json``
    rows of window folders carry their ``window``).

    Raises:
        ReplayError: ``OUT`` is missing or holds no grid (:func:`_check_grid`), or holds
            cells with and without window folders.
    """
    from .experiments.metrics import ALGORITHM_ORDER
    from .experiments.tables import render_markdown

    out = Path(out_dir)
    _check_grid(out)
    rows = grid_rows(out)
    if len({"window" in r for r in rows}) > 1:
        raise ReplayError(f"{out}: holds cells with and without a window folder; one report reads one layout")
    order = {"bundled": 0, "paper": 1, "host-fe": 2}
    algs = {a: i for i, a in enumerate(ALGORITHM_ORDER)}
    windows = sorted({r["window"] for r in rows if "window" in r}, key=window_key)
    windowed = len(windows) > 1
    rows.sort(key=lambda r: (algs.get(r["alg"], 9), r["mode"] != "spread", r["mode"], order.get(r["point"], 9))
              + ((window_key(r["window"]),) if "window" in r else ()) + (r["lambda"],))
    meta = _grid_meta(out)
    ref = meta.get("yaml_window") if windowed else (windows[0] if windows else None)
    title = "Operating-point and window grid" if windowed else "Operating-point grid"
    lines = [f"# {title}: {meta.get('model', '?')}, {meta.get('data', '?')} records "
             f"{meta.get('records', '?')}, one batch", "", "```", RULE.rstrip()]
    lines += (["", WINDOW_RULE.rstrip()] if windowed else []) + ["```", ""]
    if rows:
        chosen = pick(rows, ref)
        lines += ["## Picks", ""]
        if chosen["point"] and (chosen["window"] or not windowed):
            lines.append(f"- default anchor settings: **{chosen['point']}** (mean best admissible spread score per "
                         "point: " + ", ".join(f"{p} {s:.3f}" for p, s in sorted(chosen["point_scores"].items()))
                         + ")")
            if windowed:
                lines.append(f"- edit window: **{chosen['window']}** (provisional {ref}; mean best admissible spread "
                             f"score per window at {chosen['point']}: " + ", ".join(
                                 f"{w} {s:.3f}" for w, s in sorted(chosen["window_scores"].items(),
                                                                   key=lambda x: window_key(x[0]))) + ")")
            lines.append("- default lambda per algorithm: " + ", ".join(
                f"{a} {lam:g}" for a, lam in sorted(chosen["lambda"].items(), key=lambda x: algs.get(x[0], 9))))
        else:
            lines.append("- default: not decidable yet (a point lacks an admissible spread cell for some algorithm)"
                         if not windowed else "- default: not decidable yet (a point or window lacks an admissible "
                         f"spread cell for some algorithm; the reference is window {ref}, bundled point, bundled "
                         "lambda)")
        lines += ["", "Each construction's own best admissible cell:", ""]
        header = _axes(windowed) + ["lambda", "alg", "mode", "eff. Acc", "gen. Acc", "score", "DKL", "Top-1",
                                    "fluency", "|dW| per layer"]
        best = sorted(chosen["best"].values(), key=lambda r: (algs.get(r["alg"], 9), r["mode"]))
        lines += render_markdown([header] + [_row_text(r, windowed) for r in best]).splitlines()
        lines += _paired_lines(rows, chosen, windowed)
        lines += ["", "## The whole grid", "", "Means over the edits of each cell (one batch); score = (eff. Acc + "
                  "gen. Acc) / 2; |dW| = Frobenius norm of each edit layer's weight change.", ""]
        lines += render_markdown([header] + [_row_text(r, windowed) for r in rows]).splitlines()
        lines += _anchor_norm_lines(meta, windows, rows)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "grid.json", json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                                     for r in rows], indent=1))
    return out / "report.md"
