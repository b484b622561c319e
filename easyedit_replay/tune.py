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
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .files import atomic_write_text

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


def grid_dir(out, point: str, lam: float) -> Path:
    """``OUT/<point>/lambda<L>``: the ``scale`` output folder of one (point, lambda)."""
    return Path(out) / point / f"lambda{int(lam) if float(lam).is_integer() else lam}"


def run_tuning(model, tok, records: List[dict], by_point: Dict[str, Dict[str, object]], lambdas: Sequence[float],
               cfg, out_dir, stats_dir=None, meta: Optional[dict] = None) -> Path:
    """Make every missing grid cell, then write the report. Returns ``OUT/report.md``.

    Args:
        records: the tuning split (all of them are edited in one batch per cell).
        by_point: operating point -> {algorithm -> hyperparameters at that point}.
        lambdas: the values of ``mom2_update_weight``.
        cfg: a :class:`~easyedit_replay.scale.ScaleConfig` with ``sizes = [len(records)]``.

    Raises:
        ReplayError: as :func:`~easyedit_replay.scale.run_scale`.
    """
    from .experiments.scale import run_scale

    for point, by_alg in by_point.items():
        for lam in lambdas:
            hps = {a: hp.replace(mom2_update_weight=float(lam)) for a, hp in by_alg.items()}
            run_scale(model, tok, records, hps, cfg, grid_dir(out_dir, point, lam), stats_dir=stats_dir,
                      meta=dict(meta or {}, operating_point=point, mom2_update_weight=float(lam)), report=False)
    return write_tuning_report(out_dir)


def grid_rows(out_dir) -> List[dict]:
    """One dict per finished grid cell: point, lambda, alg, mode, n, the means of
    efficacy Acc, generalization Acc, DKL, Top-1 and fluency, the score and per-layer
    update norms (``update_norm``: layer -> Frobenius norm of the weight change)."""
    from .experiments.cells import collect_cells

    rows = []
    for point_dir in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        for lam_dir in sorted(point_dir.glob("lambda*")):
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
                    rows.append({"point": point_dir.name, "lambda": float(lam_dir.name[len("lambda"):]),
                                 "alg": cell["alg"], "mode": cell["mode"], "n": n, "eff_acc": eff, "gen_acc": gen,
                                 "dkl": mean("locality_dkl"), "top1": mean("locality_top1"),
                                 "fluency": mean("fluency"), "score": (eff + gen) / 2, "update_norm": norms,
                                 "_per_edit": cell["run"]["per_edit"]})
    return rows


def _better(a: dict, b: Optional[dict]) -> bool:
    """``a`` beats ``b`` under :data:`RULE`'s score and tie order."""
    if b is None:
        return True
    if abs(a["score"] - b["score"]) > TIE:
        return a["score"] > b["score"]
    rank = lambda r: (r["point"] != "bundled", r["lambda"] != bundled_lambda(r["alg"]), r["lambda"])  # noqa: E731
    return rank(a) < rank(b)


def admissible(rows: Sequence[dict]) -> List[dict]:
    """The rows whose DKL is no larger than their (alg, mode) cell at the bundled point
    and bundled lambda (:data:`RULE` item 2); rows without that reference are dropped."""
    ref = {(r["alg"], r["mode"]): r["dkl"] for r in rows
           if r["point"] == "bundled" and r["lambda"] == bundled_lambda(r["alg"])}
    return [r for r in rows if (r["alg"], r["mode"]) in ref and r["dkl"] <= ref[(r["alg"], r["mode"])]]


def pick(rows: Sequence[dict]) -> dict:
    """Apply :data:`RULE`: ``{"point", "point_scores": {point: mean best spread score},
    "lambda": {alg: lambda}, "default_cells": {alg: row}, "best": {(alg, mode): row}}``."""
    ok = admissible(rows)
    algs = sorted({r["alg"] for r in ok if r["mode"] == "spread"})
    best_at: Dict[Tuple[str, str], dict] = {}
    for r in ok:
        if r["mode"] == "spread" and _better(r, best_at.get((r["point"], r["alg"]))):
            best_at[(r["point"], r["alg"])] = r
    points = sorted({p for p, _ in best_at})
    scores = {p: sum(best_at[(p, a)]["score"] for a in algs) / len(algs) for p in points
              if all((p, a) in best_at for a in algs)}
    chosen = None
    for p in sorted(scores, key=lambda p: (p != "bundled", p)):
        if chosen is None or scores[p] > scores[chosen] + TIE:
            chosen = p
    best: Dict[Tuple[str, str], dict] = {}
    for r in ok:
        if _better(r, best.get((r["alg"], r["mode"]))):
            best[(r["alg"], r["mode"])] = r
    cells = {a: best_at[(chosen, a)] for a in algs} if chosen else {}
    return {"point": chosen, "point_scores": scores, "lambda": {a: c["lambda"] for a, c in cells.items()},
            "default_cells": cells, "best": best}


POINT_FIELDS = ("clamp_norm_factor", "v_lr", "v_weight_decay", "v_num_grad_steps")


def anchor_norms(anchor_dir, records: Sequence[dict]) -> List[dict]:
    """Anchor norms of ``records`` found in an anchor store, per operating point and
    anchor layer: ``[{"point", "layer", "n", "ratio", "delta", "h"}]`` with the means over
    requests of ``|delta| / |h|``, ``|delta|`` and ``|h|`` (``h`` = the anchor site's
    output before editing, ``init`` of :class:`~easyedit_replay.anchors.AnchorResult`;
    one site per layer: MEMIT's YAMLs, which EMMET and AlphaEdit share). Read from the
    files' metadata, no model: a file counts when its request (prompt, subject,
    target_new) is one of ``records`` and its objective matches a bundled point's four
    anchor settings; of the model fingerprints found (a sequential series banks
    anchors made on edited weights too) the one with the most requests is used."""
    from safetensors import safe_open

    from .algorithms import load_hparams
    from .anchors.store import AnchorStore
    from .bundled import OPERATING_POINTS, default_hparams_path

    points = {}
    for point in OPERATING_POINTS:
        hp = load_hparams(default_hparams_path("smollm2-135m", "MEMIT_REPLAY", point))
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


def _row_text(r: dict) -> List[str]:
    norms = " ".join(f"{r['update_norm'][k]:.1f}" for k in sorted(r["update_norm"], key=str))
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [r["point"], f"{r['lambda']:g}", r["alg"], r["mode"], f(r["eff_acc"]), f(r["gen_acc"]), f(r["score"]),
            f(r["dkl"]), f(r["top1"]), f(r["fluency"]), norms]


def _paired_lines(rows: Sequence[dict], chosen: dict) -> List[str]:
    """Paired differences replay - spread on the same edits (95% paired bootstrap
    interval, :func:`~easyedit_replay.experiments.statistics.paired_difference`; the
    ``paired`` metrics): at each point with each algorithm's default lambda, and each
    construction at its own best admissible cell against spreading at ITS best."""
    from .experiments.metrics import metrics
    from .experiments.statistics import paired_difference
    from .experiments.tables import fmt, render_markdown

    paired = metrics("paired")

    def pair(r, ref):
        return [fmt(paired_difference(r["_per_edit"], ref["_per_edit"], m.key), signed=True) for m in paired]

    cells = {(r["point"], r["lambda"], r["alg"], r["mode"]): r for r in rows}
    header = ["point", "lambda", "alg", "spread eff. / gen. / DKL", "replay eff. / gen. / DKL"] + [
        f"replay - spread {m.label}" for m in paired]
    table = [header]
    for (point, lam, alg, mode), r in sorted(cells.items(), key=lambda x: (x[0][2], x[0][0])):
        ref = cells.get((point, lam, alg, "spread"))
        if mode != "replay" or ref is None or lam != chosen["lambda"].get(alg, bundled_lambda(alg)):
            continue
        f = lambda c: f"{c['eff_acc']:.2f} / {c['gen_acc']:.2f} / {c['dkl']:.3f}"  # noqa: E731
        table.append([point, f"{lam:g}", alg, f(ref), f(r)] + pair(r, ref))
    best = [["alg", "replay's best cell", "spread's best cell"] + [f"replay - spread {m.label}" for m in paired]]
    for (alg, mode), r in sorted(chosen["best"].items()):
        ref = chosen["best"].get((alg, "spread"))
        if mode == "replay" and ref is not None:
            best.append([alg, f"{r['point']} lambda {r['lambda']:g}", f"{ref['point']} lambda {ref['lambda']:g}"]
                        + pair(r, ref))
    return (["", "## Replay against spreading on the same edits", "",
             "At each point, with each algorithm's default lambda (the rule's pick; AlphaEdit's solve does not read "
             "lambda, its L2 term regularizes instead):", ""] + render_markdown(table).splitlines()
            + ["", "Each at its own best admissible cell (rule item 5):", ""] + render_markdown(best).splitlines())


def _anchor_norm_lines(meta: dict) -> List[str]:
    """The report's anchor-norm table (:func:`anchor_norms` of the grid's records in the
    anchor store in use); empty when the data file or the store is not at hand."""
    from .anchors.store import anchor_cache_dir
    from .data import load_records, parse_records
    from .experiments.tables import render_markdown

    data, store = meta.get("data"), anchor_cache_dir()
    if not data or not Path(data).exists() or not store.exists():
        return []
    records = load_records(data, records=parse_records(meta.get("records") or ":"))
    norms = anchor_norms(store, records)
    if not norms:
        return []
    rows = [["point", "anchor layer", "requests", "mean abs(delta) / abs(h)", "mean abs(delta)", "mean abs(h)"]]
    rows += [[r["point"], str(r["layer"]), str(r["n"]), f"{r['ratio']:.3f}", f"{r['delta']:.1f}", f"{r['h']:.1f}"]
             for r in norms]
    return ["", "## Anchor norms", "", "Layer 4 is replay's anchor (the first edit layer), layer 8 spreading's (the "
            "last); h = the layer's output at the subject's last token before editing, delta = the optimized "
            "change (its norm is clamped to clamp_norm_factor x abs(h)).", ""] + render_markdown(rows).splitlines()


def write_tuning_report(out_dir) -> Path:
    """Write ``OUT/report.md`` (the rule, the picks, the whole grid) and ``OUT/grid.json``."""
    from .experiments.metrics import ALGORITHM_ORDER
    from .experiments.tables import render_markdown

    out = Path(out_dir)
    rows = grid_rows(out)
    order = {"bundled": 0, "paper": 1, "host-fe": 2}
    algs = {a: i for i, a in enumerate(ALGORITHM_ORDER)}
    rows.sort(key=lambda r: (algs.get(r["alg"], 9), r["mode"] != "spread", r["mode"], order.get(r["point"], 9),
                             r["lambda"]))
    meta = {}
    for p in out.glob("*/lambda*/scale.json"):
        meta = json.loads(p.read_text()).get("meta", {})
        break
    lines = [f"# Operating-point grid: {meta.get('model', '?')}, {meta.get('data', '?')} records "
             f"{meta.get('records', '?')}, one batch", "", "```", RULE.rstrip(), "```", ""]
    if rows:
        chosen = pick(rows)
        lines += ["## Picks", ""]
        if chosen["point"]:
            lines.append(f"- default anchor settings: **{chosen['point']}** (mean best admissible spread score per "
                         "point: " + ", ".join(f"{p} {s:.3f}" for p, s in sorted(chosen["point_scores"].items()))
                         + ")")
            lines.append("- default lambda per algorithm: " + ", ".join(
                f"{a} {lam:g}" for a, lam in sorted(chosen["lambda"].items(), key=lambda x: algs.get(x[0], 9))))
        else:
            lines.append("- default: not decidable yet (a point lacks an admissible spread cell for some algorithm)")
        lines += ["", "Each construction's own best admissible cell:", ""]
        header = ["point", "lambda", "alg", "mode", "eff. Acc", "gen. Acc", "score", "DKL", "Top-1", "fluency",
                  "|dW| per layer"]
        best = sorted(chosen["best"].values(), key=lambda r: (algs.get(r["alg"], 9), r["mode"]))
        lines += render_markdown([header] + [_row_text(r) for r in best]).splitlines()
        lines += _paired_lines(rows, chosen)
        lines += ["", "## The whole grid", "", "Means over the edits of each cell (one batch); score = (eff. Acc + "
                  "gen. Acc) / 2; |dW| = Frobenius norm of each edit layer's weight change.", ""]
        lines += render_markdown([header] + [_row_text(r) for r in rows]).splitlines()
        lines += _anchor_norm_lines(meta)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "grid.json", json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                                     for r in rows], indent=1))
    return out / "report.md"
