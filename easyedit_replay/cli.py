"""The ``easyedit-replay`` command line; its subcommands are those :func:`build_parser`
registers (the top-level help lists them from the parser).

``compare`` edits the same requests with backward spreading and with forward
replay (one batch edit each, from the same original weights) and prints
efficacy, generalization, specificity and edit time side by side. ``scale`` does
the same at growing numbers of edits (nested prefixes, one batch or sequential),
cell by cell, and resumes where a stopped run left off (:mod:`easyedit_replay.scale`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .anchors import bank as anchor_bank
from .bundled import OPERATING_POINTS, bundled_algorithms, bundled_model, default_hparams_path  # noqa: F401
from .data import parse_records  # noqa: F401  (re-exported: ``--records``)
from .errors import ReplayError
from .tune import GRID_ALGORITHMS

log = logging.getLogger("easyedit_replay")


@dataclass
class Prepared:
    """What ``compare``, ``scale`` and ``tune`` start from (:func:`_prepare`).

    Attributes:
        by_alg: base algorithm -> hyperparameters (bundled YAMLs or ``--hparams``, with
            the command-line overrides).
        stats_dir: the statistics folder.
        records: the canonical records, validated.
        model, tok: the loaded model (None when not loaded).
        model_name: the model's name or alias.
        modes: the canonical mode specs of ``--modes``.
    """

    by_alg: Dict[str, object]
    stats_dir: str
    records: List[dict]
    model: object
    tok: object
    model_name: str
    modes: Tuple[str, ...]


def _overrides(args) -> dict:
    """The hyperparameter overrides of the command-line options (validated with the YAML).

    Raises:
        ReplayError: ``--layers`` that is not comma-separated integers."""
    overrides = {"context_seed": args.seed} if args.seed is not None else {}
    if args.layers is not None:
        try:
            overrides["layers"] = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ReplayError(f"--layers {args.layers!r}: expected comma-separated layer indices, "
                              f"e.g. 3,4,5,6,7") from None
    if args.steps is not None:
        overrides["v_num_grad_steps"] = args.steps
    if args.no_anchor_cache:
        overrides["anchor_cache"] = False
    if args.lambda_ is not None:
        overrides["mom2_update_weight"] = args.lambda_
    return overrides


def _hparams_by_alg(args, point: str):
    """``(by_alg, stats_dir)``: the hyperparameters per algorithm at operating point
    ``point`` (bundled YAMLs, or ``--hparams``) with the command-line overrides.

    Raises:
        ReplayError: ``--point`` with ``--hparams``, or an algorithm without a bundled YAML.
    """
    from .algorithms import get_algorithm, load_hparams
    from .paths import cache_root

    overrides = _overrides(args)
    if args.hparams and point != "bundled":
        raise ReplayError(f"--point {point} picks a bundled YAML; with --hparams the YAML sets the values")
    if args.hparams:
        hp = load_hparams(args.hparams, **overrides)
        return {get_algorithm(hp.alg_name).base: hp}, args.stats_dir or hp.stats_dir
    model = bundled_model(args.model)  # --model without --hparams: that model's bundled YAMLs, or an error
    algs = args.algs.split(",") if args.algs else bundled_algorithms(model)
    for alg in algs:
        _check_alg(alg)
    by_alg = {}
    for alg in algs:
        path = default_hparams_path(model, f"{alg}_REPLAY", point)
        if not path.exists():
            raise ReplayError(f"--algs {alg} --point {point}: no bundled YAML {alg}_REPLAY/{path.name}; "
                              f"pass --hparams")
        by_alg[alg] = load_hparams(path, **overrides)
    return by_alg, args.stats_dir or str(cache_root() / "stats")


def _check_alg(alg: str) -> None:
    """Refuse an ``--algs`` entry that is not a registered base algorithm (before looking for
    its YAML, whose absence named the wrong fix).

    Raises:
        ReplayError: names the entry, the algorithms, and the closest one or the split of an
            ``alg_name`` (``MEMIT_REPLAY``) into algorithm and construction."""
    import difflib

    from .algorithms import RULES, name_table

    if alg in RULES:
        return
    found = name_table().get(alg)
    if found is not None:
        raise ReplayError(f"--algs {alg}: --algs takes base algorithms ({found.base}); the target construction "
                          f"is --modes ({found.mode})")
    close = [b for b in RULES if b.lower() == alg.lower()] or difflib.get_close_matches(alg, list(RULES), n=1)
    raise ReplayError(f"--algs {alg}: not an algorithm of the plugin; use names from {', '.join(RULES)}"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))


def _check_modes(by_alg: Dict[str, object], modes: Tuple[str, ...]) -> None:
    """Check every algorithm in every mode as its edit will (the mode's fields on the
    hyperparameters, the construction's refusal of the rule, the limits of ``+refresh`` and
    its weight), so that a combination that cannot run is refused before the model loads,
    not when its turn comes.

    Raises:
        ReplayError: names the mode, the algorithm and the reason."""
    from .algorithms import get_algorithm
    from .editor import check_construction
    from .experiments.runner import mode_hparams

    for base, hp in by_alg.items():
        for mode in modes:
            try:
                hp_mode, construction = mode_hparams(hp, base, mode)
                check_construction(get_algorithm(hp_mode.alg_name).rule, hp_mode, construction)
            except (ReplayError, ValueError) as exc:
                raise ReplayError(f"--modes {mode} with {base}: {exc}") from None


def _spellings(hparams) -> List[bool]:
    """The target spellings (leading space or not) ``hparams`` use, each once. The leading
    space of target_new only changes its spelling, not what is valid; PMET's default
    depends on the model name, which is not loaded yet."""
    leads = (getattr(hp, "target_leading_space", None) for hp in hparams)
    return list(dict.fromkeys(True if lead is None else bool(lead) for lead in leads))


def _validate(args, records, spellings) -> None:
    """Validate ``records`` once per target spelling.

    Raises:
        ReplayError: a record that is not a valid edit (names it and ``--data``).
    """
    from .data import validate_records

    for lead in spellings:
        validate_records(records, leading_space=lead,
                         source=f"--data {args.data!r}" if args.data else "bundled demo edits")


def parse_modes(text: str, strict: bool = True) -> Tuple[str, ...]:
    """``--modes``: comma-separated mode specs, each in its canonical spelling
    (:func:`~easyedit_replay.targets.mode_spec`, the spelling ``scale`` writes a cell's
    mode in: ``replay_tau=0.50`` -> ``replay_tau=0.5``, `` replay`` -> ``replay``), in
    the order given; empty entries (``spread,replay,``) are ignored. ``strict=False``
    (``report``, which matches the modes of cells) keeps an entry ``mode_spec`` refuses as
    written: a cell's mode may be a construction registered in another process, and
    :func:`~easyedit_replay.experiments.cells.check_modes` names an entry no cell has.

    Raises:
        ReplayError: no entry; with ``strict``, an entry that is not a mode spec or a mode
            given twice (all name ``--modes``).
    """
    from .targets import mode_spec

    entries = [m.strip() for m in str(text).split(",") if m.strip()]
    if not entries:
        raise ReplayError(f"--modes {text!r}: names no mode; give comma-separated modes, e.g. spread,replay")
    modes = []
    for m in entries:
        try:
            modes.append(mode_spec(m))
        except ValueError as exc:
            if strict:
                raise ReplayError(f"--modes {text}: {exc}") from None
            modes.append(m)
    twice = next((m for i, m in enumerate(modes) if m in modes[:i]), None)
    if strict and twice:
        raise ReplayError(f"--modes {text}: {twice} is given twice; give each mode once")
    return tuple(modes)


def _prepare(args, n: Optional[int], load: bool = True) -> Prepared:
    """Shared by ``compare``, ``scale`` and ``tune``: hyperparameters per algorithm
    (:func:`_hparams_by_alg` at ``args.point``), the statistics folder, the first ``n``
    records (validated) and the model, in that order, so bad input fails before the
    model loads (``model`` and ``tok`` None with ``load=False``).

    Raises:
        ReplayError: bad ``--modes`` (or a mode an algorithm cannot run, :func:`_check_modes`),
            ``--batch-size``, ``--stats-dir``, hyperparameters, data or records.
    """
    from .data import load_records

    modes = parse_modes(args.modes)
    if vars(args).get("batch_size") is not None and args.batch_size < 1:
        raise ReplayError(f"--batch-size {args.batch_size}: expected a positive number of edits per batch")
    by_alg, stats_dir = _hparams_by_alg(args, args.point)
    for hp in by_alg.values():  # the statistics folder the edits will use (run_comparison, run_scale set it)
        try:
            hp.replace(stats_dir=stats_dir)
        except ReplayError as exc:
            raise ReplayError(f"--stats-dir {stats_dir}: {exc}" if args.stats_dir else str(exc)) from None
    _check_modes(by_alg, modes)
    # Fail fast: data, requests and modes (above) are checked before the model is loaded.
    records = load_records(args.data, n, records=parse_records(args.records))
    _validate(args, records, _spellings(by_alg.values()))
    if not args.quiet:
        logging.getLogger("easyedit_replay.anchors").setLevel(logging.INFO)  # anchors loaded vs optimized
    model_name = args.model or next(iter(by_alg.values())).model_name
    prep = Prepared(by_alg, stats_dir, records, None, None, model_name, modes)
    return _load(args, prep) if load else prep


def _load(args, prep: Prepared) -> Prepared:
    """``prep`` with its model and tokenizer loaded (``--device``)."""
    from .models import load_model

    print(f"loading {prep.model_name} ...", file=sys.stderr)
    model, tok = load_model(prep.model_name, device=args.device)
    return replace(prep, model=model, tok=tok)


def cmd_compare(args) -> int:
    """``compare``: edit the records with every algorithm and mode in one batch, independent
    batches or sequentially, print the report table, and write ``--out`` / ``--json``.
    Returns 0.

    Raises:
        ReplayError: an ``--out`` that is a file; bad ``--modes``, ``--batch-size``,
            hyperparameters, data or records (from :func:`_prepare`); or an edit that fails.
    """
    from .experiments.report import render_report, write_outputs
    from .experiments.runner import CompareConfig, run_comparison

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ReplayError(f"--out {args.out} is a file; give a folder for report.md and the plots")
    prep = _prepare(args, args.n)
    by_alg, records, model_name = prep.by_alg, prep.records, prep.model_name
    how = f"sequentially in batches of {args.batch_size or len(records)}" if args.sequential else (
        f"in independent batches of {args.batch_size}" if args.batch_size else "in one batch")
    print(f"{len(records)} edits from {args.data or 'the bundled demo set'}; {', '.join(by_alg)}; {how}",
          file=sys.stderr)
    cfg = CompareConfig(modes=prep.modes, batch_size=args.batch_size, sequential=args.sequential,
                        fluency=not args.no_fluency, target_accuracy=not args.no_target_accuracy,
                        seed=args.seed or 0, progress=not args.quiet)
    results = run_comparison(prep.model, prep.tok, records, by_alg, cfg, stats_dir=prep.stats_dir)
    results.update(model=model_name, data=str(args.data or "demo"),
                   hparams={k: v.to_dict() for k, v in by_alg.items()}, records=records)
    title = f"{model_name}: {len(records)} edits ({args.data or 'bundled demo'}), {how}"
    print()
    print(title)
    print(render_report(results))
    print("cells: mean over edits [95% bootstrap interval]")
    if args.out:
        files = write_outputs(results, args.out, title)
        print(f"report: {files['report']}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"per-edit numbers written to {args.json}", file=sys.stderr)
    return 0


def parse_sizes(text: str, option: str = "--n") -> List[int]:
    """``"48,192,768"`` -> ``[48, 192, 768]``.

    Raises:
        ReplayError: an item that is not a positive integer (names ``option``).
    """
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ReplayError(f"{option} {text!r}: expected comma-separated positive integers, e.g. 48,192,768")
    return sorted(set(sizes))


# ``scale``'s options that only a ``--sequential`` run reads: (args attribute, flag, why), refused
# without --sequential by :func:`_refuse_sequential_only`
SEQUENTIAL_ONLY = (("batch_size", "--batch-size", "one-batch cells edit all n at once"),
                   ("curve", "--curve", "one-batch cells are evaluated once, at their n"),
                   ("attribution", "--attribution", "it names steps of the series"))


def _refuse_sequential_only(args) -> None:
    """Refuse ``scale``'s sequential-only options (:data:`SEQUENTIAL_ONLY`) without ``--sequential``.

    Raises:
        ReplayError: the first such option given, named with why it needs ``--sequential``.
    """
    if args.sequential:
        return
    for dest, flag, why in SEQUENTIAL_ONLY:
        if getattr(args, dest):
            raise ReplayError(f"{flag} is for --sequential runs: {why}; add --sequential or drop {flag}")


def cmd_scale(args) -> int:
    """Make the missing cells of ``--out`` and write its report (only the report with
    ``--report-only``; the plan without a model with ``--plan-only``).

    Raises:
        ReplayError: bad ``--n``; ``--sequential`` without ``--batch-size``, or a batch size or
            ``--attribution`` step beyond the series (:func:`~easyedit_replay.experiments.scale.check_sizes`);
            a sequential-only option without ``--sequential`` (:func:`_refuse_sequential_only`); an
            ``--out`` that is a file, that holds cells at another operating point
            (:func:`~easyedit_replay.experiments.cells.check_out_point`) or of another ``--data`` or
            ``--records`` (:func:`~easyedit_replay.experiments.cells.check_out_data`), or, with
            ``--report-only``, that holds no cells; and as :func:`_prepare`. All before the model loads.
    """
    from .experiments.cells import check_out_data, check_out_point
    from .experiments.report import write_scale_report
    from .experiments.scale import ScaleConfig, check_sizes, record_plan, run_scale

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ReplayError(f"--out {out} is a file; give the folder of the scale cells")
    if args.report_only:
        if not (out / "scale.json").exists() and not (out / "cells").is_dir():
            raise ReplayError(f"--out {out}: no scale cells here (no scale.json, no cells/); give the --out "
                              f"folder of a scale run")
        print(write_scale_report(args.out))
        return 0
    sizes = parse_sizes(args.n)
    if args.sequential and not args.batch_size:
        raise ReplayError("--sequential needs --batch-size B (edits per batch)")
    _refuse_sequential_only(args)
    prep = _prepare(args, max(sizes), load=False)
    by_alg, modes = prep.by_alg, prep.modes
    attribution = parse_sizes(args.attribution, "--attribution") if args.attribution else []
    cfg = ScaleConfig(sizes=sizes, modes=modes, sequential=args.sequential, batch_size=args.batch_size,
                      curve=args.curve, fluency=not args.no_fluency, target_accuracy=args.target_accuracy,
                      seed=args.seed or 0, progress=not args.quiet, attribution=attribution)
    check_sizes(cfg, len(prep.records))  # the batch size and attribution steps, before the model loads
    meta = {"model": prep.model_name, "data": str(args.data or "demo"), "records": args.records or ":",
            "operating_point": sorted({hp.operating_point for hp in by_alg.values()})}
    check_out_point(args.out, meta["operating_point"])  # before the model loads
    check_out_data(args.out, meta)
    what = (f"sequentially, {max(sizes)} edits in batches of {args.batch_size}" if args.sequential
            else f"one batch each of {', '.join(map(str, sizes))} edits")
    print(f"{', '.join(by_alg)} x {', '.join(modes)}; {what}; cells in {args.out}/cells", file=sys.stderr)
    if args.plan_only:
        print(record_plan(args.out, cfg, list(by_alg), meta=meta))
        return 0
    prep = _load(args, prep)
    report = run_scale(prep.model, prep.tok, prep.records, by_alg, cfg, args.out, stats_dir=prep.stats_dir, meta=meta)
    print(report)
    return 0


def cmd_tune(args) -> int:
    """The operating-point grid on a tuning split (:mod:`easyedit_replay.tune`), with
    ``--windows`` also over edit windows.

    Raises:
        ReplayError: bad ``--points``, ``--lambdas`` or ``--windows`` (also ``--point`` or
            ``--lambda``, which the grid's axes replace; ``--points`` other than bundled with
            ``--hparams``; ``--windows`` with ``--layers``, without the YAMLs' window, or with a layer beyond the
            model), an ``--out`` of the other layout, and as :func:`_prepare`.
    """
    from .experiments.scale import ScaleConfig
    from .tune import RULE, WINDOW_RULE, anchor_layers, check_layout, parse_windows, run_tuning, \
        window_name, write_tuning_report, yaml_window

    if args.report_only:
        print(write_tuning_report(args.out).read_text())
        return 0
    windows = parse_windows(args.windows) if args.windows is not None else None
    if windows and args.layers:
        raise ReplayError("--windows sets the edit layers of each cell; drop --layers")
    if args.point != "bundled":
        raise ReplayError(f"tune --point {args.point}: the grid's points are --points (comma-separated, e.g. "
                          f"--points bundled,{args.point}); drop --point")
    if args.lambda_ is not None:
        raise ReplayError(f"tune --lambda {args.lambda_}: the grid's lambdas are --lambdas (comma-separated, e.g. "
                          f"--lambdas 1000,{args.lambda_:g}); drop --lambda")
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    bad = [p for p in points if p not in OPERATING_POINTS]
    if bad or not points:
        raise ReplayError(f"--points {args.points}: expected names from {', '.join(OPERATING_POINTS)}")
    named = [p for p in points if p != "bundled"]  # points name bundled YAMLs; --hparams is one YAML of its own
    if args.hparams and named:
        default = " (the default)" if args.points == ",".join(OPERATING_POINTS) else ""
        raise ReplayError(f"--points {args.points}{default} includes {' and '.join(named)}, operating points of the "
                          "bundled YAMLs; with --hparams the YAML sets the anchor settings: pass --points bundled")
    try:
        lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    except ValueError:
        lambdas = []
    if not lambdas or min(lambdas) < 0:
        raise ReplayError(f"--lambdas {args.lambdas}: expected comma-separated non-negative numbers, e.g. 1000,5000")
    args.point = points[0]
    prep = _prepare(args, None, load=False)  # modes, data and records are checked once
    by_point = {point: _hparams_by_alg(args, point)[0] for point in points}
    done = _spellings(prep.by_alg.values())
    _validate(args, prep.records, [lead for lead in _spellings(hp for by_alg in by_point.values()
                                                               for hp in by_alg.values()) if lead not in done])
    check_layout(args.out, bool(windows))
    cfg = ScaleConfig(sizes=[len(prep.records)], modes=prep.modes, fluency=not args.no_fluency, seed=args.seed or 0,
                      progress=not args.quiet)
    print(RULE, file=sys.stderr)
    if windows:
        ref = yaml_window(by_point, windows)
        layers = anchor_layers(windows, prep.modes)
        print(WINDOW_RULE, file=sys.stderr)
        print(f"windows {', '.join(window_name(w) for w in windows)} (provisional {window_name(ref)}): anchor sets "
              f"at layers {', '.join(map(str, layers))}, {len(layers)} per point x {len(points)} point(s)",
              file=sys.stderr)
    prep = _load(args, prep)
    meta = {"model": prep.model_name, "data": str(args.data or "demo"), "records": args.records or ":"}
    report = run_tuning(prep.model, prep.tok, prep.records, by_point, lambdas, cfg, args.out, stats_dir=prep.stats_dir,
                        meta=meta, windows=windows)
    print(report.read_text())
    return 0


def cmd_report(args) -> int:
    """The condensed markdown tables of docs/results.md (:func:`easyedit_replay.experiments.report.markdown`),
    or with ``--points`` (``--models``) the cells of ``scale`` folders side by side across
    operating points (models): :func:`easyedit_replay.experiments.points.points_markdown`
    (:func:`~easyedit_replay.experiments.points.models_markdown`); ``--out FILE`` writes it too.

    Raises:
        ReplayError: ``--points`` or ``--models`` with a SOURCE or ``--allocation``; both of
            them; ``--models`` with ``--reference``; none of ``--points``, ``--models`` and
            SOURCE ``--markdown``; ``--modes`` with no entry (:func:`parse_modes`); ``--reference``
            without ``--points``, ``--out`` without ``--allocation``, ``--points`` or ``--models``
            (options that would do nothing); those of the report functions (a ``--modes`` entry
            no cell has, ``--modes`` with a compare results.json, ``--allocation`` with a scale
            folder, one ``--models`` folder or two of one model).
    """
    modes = list(parse_modes(args.modes, strict=False)) if args.modes else None
    if args.points and args.models:
        raise ReplayError("report --points and --models: give one of them (--points: one model's folders at "
                          "several operating points; --models: the folders of several models)")
    if args.points or args.models:
        from .experiments.points import REFERENCE, models_markdown, points_markdown

        option = "--points" if args.points else "--models"
        if args.source or args.allocation:
            raise ReplayError(f"report {option} DIR [DIR ...] takes the scale --out folders after {option}; "
                              "no SOURCE, no --allocation")
        if args.models and args.reference is not None:
            raise ReplayError(f"report --models --reference {args.reference}: --reference is the point --points "
                              "compares spreading at; --models pairs within each model (drop --reference)")
        if args.out and Path(args.out).is_dir():
            raise ReplayError(f"report {option} --out {args.out}: a folder; --out takes the markdown file to "
                              f"write, e.g. {Path(args.out) / (option[2:] + '.md')}")
        text = (points_markdown(args.points, reference=args.reference or REFERENCE, modes=modes) if args.points
                else models_markdown(args.models, modes=modes))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"wrote {args.out}", file=sys.stderr)
        print(text, end="")
        return 0
    if not args.source or not args.markdown:
        given = (f"report {args.source}{' --allocation' if args.allocation else ''}: add --markdown (the format); "
                 if args.source else "report: ")
        raise ReplayError(given + "give SOURCE --markdown (a compare results.json or a scale --out folder), "
                          "SOURCE --markdown --allocation (a compare results.json's allocation tables) "
                          "or --points / --models DIR [DIR ...]")
    if args.reference is not None:
        raise ReplayError(f"report --reference {args.reference}: --reference is the point --points compares "
                          "spreading at; SOURCE is reported as it is (drop --reference, or give --points DIR [DIR ...])")
    if args.out and not args.allocation:
        raise ReplayError(f"report --out {args.out}: --out writes the --allocation report of a compare results.json "
                          "(report.md and plots) or the --points / --models markdown; without them it would write "
                          "nothing (drop --out, or add --allocation)")
    from .experiments.report import markdown

    print(markdown(args.source, modes=modes, allocation=args.allocation, out=args.out), end="")
    return 0


def cmd_export_model(args) -> int:
    """Write the model and say whether EasyEdit's ``BaseEditor`` will load it by that path."""
    from .easyedit import host_loader_branch
    from .models import export_model

    out = export_model(args.alias, args.out).resolve()
    print(out)
    branch = host_loader_branch(str(out))
    if branch == "llama":
        print(f"EasyEdit: set model_name: {out} in the YAML (loaded by BaseEditor's 'llama' branch)", file=sys.stderr)
    else:
        print(f"warning: EasyEdit's BaseEditor picks its loader from substrings of model_name; {out} "
              f"{'matches ' + repr(branch) if branch else 'matches none'}, not 'llama'. Export to a directory "
              f"whose path contains 'llama' and none of 't5', 'gpt', 'chatglm-api' (e.g. ./smollm2-135m-llama)",
              file=sys.stderr)
    return 0


def cmd_stats(args) -> int:
    """``stats``: compute (or read from the cache) the second moments ``C [d_in, d_in]`` of
    every rewritten module of ``--hparams`` and print each one's shape and trace. Returns 0.

    Raises:
        HyperParamsError: a bad hparams file (:func:`~easyedit_replay.algorithms.load_hparams`).
        ModelLoadError: the model cannot be loaded.
        StatisticsError: from :func:`~easyedit_replay.stats.second_moments`.
    """
    from .algorithms import load_hparams, rewrite_modules
    from .models import load_model
    from .stats import second_moments

    hp = load_hparams(args.hparams)
    if args.stats_dir:
        hp.stats_dir = args.stats_dir
    model, tok = load_model(args.model or hp.model_name, device=args.device)
    modules = rewrite_modules(hp)
    covs = second_moments(model, tok, hp, modules, force=args.force, progress=True)
    for m, c in covs.items():
        print(f"{m}: {tuple(c.shape)} trace {float(c.trace()):.3f}")
    return 0


def cmd_make_corpus(args) -> int:
    """Regenerate the bundled statistics corpus (texts sampled from a model)."""
    from .models import load_model
    from .stats import SELF_NEW_TOKENS, self_generated_texts

    model, tok = load_model(args.model, device=args.device)
    texts = self_generated_texts(model, tok, args.n, seed=args.seed, progress=True)
    payload = {
        "description": (
            f"{args.n} texts sampled from {args.model} by `easyedit-replay make-corpus --n {args.n} "
            f"--seed {args.seed}`: {SELF_NEW_TOKENS} new tokens after an everyday opener, temperature 1, "
            f"top-k 50. Offline corpus for covariance statistics (mom2_dataset: bundled)."
        ),
        "texts": texts,
    }
    Path(args.out).write_text(json.dumps(payload, indent=0, ensure_ascii=False))
    print(f"wrote {len(texts)} texts to {args.out}")
    return 0


def _common_options(c, algs: Optional[Tuple[str, ...]] = None, grid: bool = False) -> None:
    """Options ``compare``, ``scale`` and ``tune`` share: what is edited, how, and with which
    model. ``algs``: the default of ``--algs``, which its help then names (None: every
    algorithm with a bundled YAML for ``--model``, :func:`bundled_algorithms`). ``grid``: ``tune``'s parser, where the grid's
    ``--points`` and ``--lambdas`` replace ``--point`` and ``--lambda`` (left out of the
    help, still parsed so that :func:`cmd_tune` refuses them naming the replacement) and
    ``--records`` is the whole tuning split (tune has no ``--n``)."""
    c.add_argument("--algs", default=",".join(algs) if algs else None,
                   help="comma-separated base algorithms (default: "
                        + ("%(default)s" if algs else "every one with a bundled YAML for --model, "
                           "hparams/<ALG>_REPLAY/<model>.yaml; SmolLM2's without --model") + ")")
    c.add_argument("--hparams", help="one plugin YAML instead of the bundled ones (its alg_name picks the algorithm)")
    c.add_argument("--model", help="model alias, directory or hub name (default: the YAML's model_name); without "
                   "--hparams, the bundled YAMLs named after it are used (hparams/<ALG>_REPLAY/<name>.yaml)")
    c.add_argument("--data", help="edits in EasyEdit's CounterFact or ZsRE format (default: bundled demo edits)")
    c.add_argument("--seed", type=int, help="seed of the context templates (default: the YAML's context_seed) and of "
                   "the bootstrap intervals (default 0)")
    c.add_argument("--modes", default="spread,replay",
                   help="comma-separated target constructions: spread, replay, blue, onelayer, nodiv, "
                        "replay_remaining, replay_tau (or replay_tau=0.25 to set its exponent), "
                        "replay_capacity, replay_joint; '+option' adds a sequential-editing option: +refresh "
                        "(or +refresh=4 to weight the earlier edits' rows 4), +old_keys, +rekeyed, +norm_anchor "
                        "(e.g. replay+refresh; default: spread,replay)")
    c.add_argument("--point", default="bundled", choices=OPERATING_POINTS,
                   help=argparse.SUPPRESS if grid else "operating point of the bundled YAMLs: bundled (default), "
                   "paper (the FE authors' anchor settings), host-fe (EasyEdit's MEMIT-FE); see hparams/README.md")
    c.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=float, help=argparse.SUPPRESS if grid else
                   "override mom2_update_weight (the covariance weight lambda; default: the YAML's) for MEMIT, PMET "
                   "and EMMET; AlphaEdit's solve regularizes with L2 and does not read it")
    slices = ("START:END (e.g. 1823:1919, or -96: for the last 96; ranges separated by commas are taken in order, "
              "e.g. 1823:1919,1535:1823)")
    c.add_argument("--records", help=f"the tuning split: this slice of --data, {slices}, every record edited in "
                   "each cell; default: the whole file" if grid else
                   f"use this slice of --data before --n, {slices}; default: from the first record")
    c.add_argument("--layers", help="override the edit layers, e.g. 3,4,5,6,7 (default: the YAML's layers)")
    c.add_argument("--steps", type=int, help="override v_num_grad_steps (default: the YAML's)")
    c.add_argument("--no-fluency", action="store_true", help="skip the generation-based fluency metric")
    c.add_argument("--stats-dir", help="statistics cache (default: the cache root's stats/ for bundled YAMLs, the "
                   "YAML's stats_dir with --hparams)")
    c.add_argument("--no-anchor-cache", action="store_true",
                   help="optimize every anchor afresh; neither read nor write the anchor disk cache")
    c.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda, cuda:1 (default cpu)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``easyedit-replay`` parser: every subcommand, its options and the function that
    runs it (``args.func``); the top-level description lists the registered subcommands."""
    p = argparse.ArgumentParser(prog="easyedit-replay")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="edit the same requests with spread and replay; print the metrics")
    _common_options(c)
    c.add_argument("--n", type=int, help="use the first N edits (default: all of --data; the bundled demo set has 24)")
    c.add_argument("--batch-size", type=int, help="edits per batch (default: all in one batch); without --sequential "
                   "each batch is edited from the original weights")
    c.add_argument("--sequential", action="store_true", help="apply the batches one after another to the same model")
    c.add_argument("--out", help="directory for report.md, results.json and PNG plots (default: none, the tables "
                   "are only printed)")
    c.add_argument("--json", help="write all per-edit numbers to this file")
    c.add_argument("--no-target-accuracy", action="store_true", help="skip the per-layer target diagnostics")
    c.set_defaults(func=cmd_compare)

    sc = sub.add_parser("scale", help="compare at growing numbers of edits (one batch, or sequential), cell by "
                        "cell; a rerun resumes")
    _common_options(sc)
    sc.add_argument("--n", default="48,192,768",
                    help="comma-separated sizes, nested prefixes of --data (default 48,192,768); with --sequential "
                         "the largest is the number of edits and the others where they are evaluated")
    sc.add_argument("--sequential", action="store_true", help="edit the first max(--n) records in batches of "
                    "--batch-size, one after another on the same model")
    sc.add_argument("--batch-size", type=int, help="edits per batch of a --sequential run (required with it)")
    sc.add_argument("--curve", action="store_true", help="--sequential: evaluate all edits so far after every batch")
    sc.add_argument("--target-accuracy", action="store_true", help="also measure the per-layer target error "
                    "(expensive: reads every context template to the loss layer again)")
    sc.add_argument("--attribution", help="--sequential: comma-separated steps after which each earlier batch's "
                    "efficacy is re-scored with each edited layer set back to its weights right after that batch "
                    "(2 + layers evaluations per earlier batch); cells made with it differ from cells without")
    sc.add_argument("--out", required=True, help="directory of the cells, report.md and plots (a rerun resumes)")
    sc.add_argument("--report-only", action="store_true", help="rewrite report.md and the plots from the cells "
                    "found; compute nothing")
    sc.add_argument("--plan-only", action="store_true", help="record the cells this command would make in "
                    "OUT/scale.json (report.md then lists the unfinished ones as missing) and rewrite the report; "
                    "load no model, compute nothing")
    sc.set_defaults(func=cmd_scale)

    t = sub.add_parser("tune", help="the operating-point grid (points [x windows] x lambda x algorithm x "
                       "construction) on a tuning split, one batch per cell, and the rule that picks the default; a "
                       "rerun resumes")
    _common_options(t, algs=GRID_ALGORITHMS, grid=True)
    t.add_argument("--points", default=",".join(OPERATING_POINTS), help="comma-separated operating points "
                   "(default %(default)s)")
    t.add_argument("--lambdas", default="1000,5000,15000,30000", help="comma-separated mom2_update_weight values "
                   "(default %(default)s; AlphaEdit's solve does not read them: its cells repeat across lambda)")
    t.add_argument("--windows", help="also sweep the edit window: contiguous inclusive layer ranges separated by "
                   "commas, e.g. 1-4,2-5,4-7 (or explicit layer lists separated by ';', e.g. 1,2,3,4;2,3,4,5); "
                   "must include the YAMLs' window (the rule's reference); each window's cells go to "
                   "OUT/<point>/w<first>-<last>/lambda<L>/ and the window rule (tune.WINDOW_RULE) picks one; "
                   "anchors cost one set per point per distinct anchor layer: each window's first layer (replay) "
                   "and last layer (spread), a layer that is both counted once")
    t.add_argument("--out", required=True, help="directory of the grid: OUT/<point>/lambda<L>/ scale cells "
                   "(OUT/<point>/w<first>-<last>/lambda<L>/ with --windows), OUT/report.md, OUT/grid.json")
    t.add_argument("--report-only", action="store_true", help="rewrite OUT/report.md from the cells found")
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("report", help="the condensed markdown tables of a compare results.json or of scale cells "
                       "(docs/results.md), or scale cells side by side across operating points (--points) or "
                       "models (--models)")
    r.add_argument("source", nargs="?", help="results.json of `compare --out DIR`, or a `scale --out DIR` folder")
    r.add_argument("--markdown", action="store_true", help="print markdown tables (the format; needed with SOURCE)")
    r.add_argument("--points", nargs="+", metavar="DIR", help="`scale --out` folders, one per operating point "
                   "(read from the cells' operating_point): the scale metrics side by side, mode - spread within "
                   "each point and against spread at --reference on the same edits, update and anchor norms")
    r.add_argument("--models", nargs="+", metavar="DIR", help="`scale --out` folders, one per model (read from "
                   "the cells' hparams model_name), on the same records: the scale metrics side by side, mode - "
                   "spread within each model on the same edits, each model's update and anchor norms")
    r.add_argument("--reference", help="only with --points: the point spreading is compared at, one of "
                   "the folders' points (default bundled, the tuned default)")
    r.add_argument("--modes", help="scale cells: only these comma-separated modes, each one the cells have "
                   "(default: all)")
    r.add_argument("--allocation", action="store_true", help="a compare results.json: every rule against replay "
                   "on the same edits, per-layer update norms and residual ratios (the allocation sweep)")
    r.add_argument("--out", help="only with --allocation (also write report.md and the two allocation plots into "
                   "this folder) or --points / --models (also write the markdown to this file)")
    r.set_defaults(func=cmd_report)

    anchor_bank.add_subcommands(sub, lambda alg, point="bundled": default_hparams_path(alg=alg, point=point))

    e = sub.add_parser("export-model", help="write a Hugging Face copy of a bundled model alias")
    e.add_argument("alias", help="e.g. smollm2-135m")
    e.add_argument("--out", required=True, help="output directory (new or empty); for EasyEdit its path must "
                   "contain 'llama', e.g. ./smollm2-135m-llama")
    e.set_defaults(func=cmd_export_model)

    s = sub.add_parser("stats", help="compute (or check) covariance statistics for a YAML: files already in the "
                       "statistics folder are checked, not recomputed",
                       description="Compute the covariance statistics (key second moments) of a YAML's rewritten "
                       "modules, in one pass over its corpus for every module without a file. A module whose file "
                       "is already in the statistics folder is checked instead: the file is read, its shape, dtype and "
                       "sample size are compared with the model and the YAML, and its values must be finite (a bad "
                       "file is an error naming it; delete it or pass --force). Either way it prints each module's shape "
                       "and trace.")
    s.add_argument("--hparams", required=True, help="a plugin YAML (alg_name e.g. MEMIT_REPLAY): its layers, "
                   "rewritten modules, mom2_dataset, mom2_n_samples and mom2_dtype say which statistics")
    s.add_argument("--model", help="model alias, directory or hub name (default: the YAML's model_name)")
    s.add_argument("--stats-dir", help="statistics folder, in EasyEdit's cache layout (default: the YAML's stats_dir)")
    s.add_argument("--force", action="store_true", help="recompute and overwrite the files even if they exist")
    s.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda (default cpu)")
    s.set_defaults(func=cmd_stats)
    mc = sub.add_parser("make-corpus", help="regenerate the bundled offline statistics corpus")
    mc.add_argument("--model", default="smollm2-135m", help="the model that samples the texts (default %(default)s)")
    mc.add_argument("--n", type=int, default=512, help="number of texts (default %(default)s)")
    mc.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    mc.add_argument("--out", default=str(Path(__file__).resolve().parent / "data" / "bundled_corpus.json"),
                    help="the JSON file to write (default: the package's bundled corpus, which it replaces)")
    mc.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda (default cpu)")
    mc.set_defaults(func=cmd_make_corpus)
    p.description = ("Forward replay for MEMIT-family editors, as a plugin for EasyEdit. Commands: "
                     + " | ".join(sub.choices))  # every registered subcommand, in the order of the list below
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """The ``easyedit-replay`` command: parse ``argv`` (default ``sys.argv[1:]``) and run the
    subcommand. Returns its exit status; a :class:`~easyedit_replay.errors.ReplayError` is
    printed as ``error: ...`` and gives 2 (other exceptions propagate; argparse exits on
    bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # argparse reads `--records -96:` as a missing value: attach it
        if argv[i] == "--records" and argv[i + 1].startswith("-"):
            argv[i:i + 2] = [f"--records={argv[i + 1]}"]
            break
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
