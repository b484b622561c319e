"""Command line: ``easyedit-replay compare | export-model | stats``.

``compare`` edits the same requests with backward spreading and with forward
replay (one batch edit each, from the same original weights) and prints
efficacy, generalization, specificity and edit time side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ReplayError

log = logging.getLogger("easyedit_replay")


def default_hparams_path(model: str = "smollm2-135m", alg: str = "MEMIT_REPLAY") -> Path:
    """The bundled YAML for ``alg`` on ``model`` (shipped inside the package)."""
    return Path(__file__).resolve().parent / "configs" / alg / f"{model}.yaml"


def _fmt(x, width=8, digits=3) -> str:
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def render_table(rows: List[Dict], columns: List[tuple]) -> str:
    """Plain-text table; ``columns`` are ``(key, header)``; values are floats or strings."""
    widths = [max(len(h), 8) for _, h in columns]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, h), w) in enumerate(zip(columns, widths)))]
    for row in rows:
        cells = []
        for i, ((key, _), w) in enumerate(zip(columns, widths)):
            v = row.get(key)
            cells.append(str(v).ljust(w) if i == 0 else (_fmt(v, w) if not isinstance(v, str) else v.rjust(w)))
        lines.append("  ".join(cells))
    return "\n".join(lines)


COLUMNS = [
    ("mode", "mode"),
    ("efficacy_acc", "efficacy acc"),
    ("efficacy_win", "eff P(new)>P(true)"),
    ("generalization_acc", "general. acc"),
    ("generalization_win", "gen P(new)>P(true)"),
    ("specificity", "specificity"),
    ("seconds", "edit time s"),
]


def cmd_compare(args) -> int:
    import torch

    from .data import load_records
    from .editor import apply_edit, resolve_templates, weight_transaction
    from .evaluate import evaluate_records, summarize
    from .hparams import load_hparams
    from .models import cache_root, load_model
    from .stats import second_moments
    from .tracing import resolve_parameter

    hp_path = args.hparams or default_hparams_path()
    base_hp = load_hparams(hp_path, **({"context_seed": args.seed} if args.seed is not None else {}))
    if args.layers:
        base_hp = type(base_hp).from_dict({**base_hp.to_dict(), "layers": [int(x) for x in args.layers.split(",")]})
    stats_dir = args.stats_dir or (base_hp.stats_dir if args.hparams else str(cache_root() / "stats"))
    base = base_hp.alg_name.rsplit("_", 1)[0]
    model_name = args.model or base_hp.model_name
    print(f"loading {model_name} ...", file=sys.stderr)
    model, tok = load_model(model_name, device=args.device)
    records = load_records(args.data, args.n)
    print(f"{len(records)} edits from {args.data or 'the bundled demo set'}; {base} layers {base_hp.layers}",
          file=sys.stderr)

    # Statistics and context templates are shared by both modes: compute them before timing.
    covs_modules = [t.format(l) for l in base_hp.layers for t in base_hp.rewrite_templates()]
    base_hp.stats_dir = stats_dir
    second_moments(model, tok, base_hp, covs_modules, progress=True)
    templates = resolve_templates(model, tok, base_hp)
    baseline = evaluate_records(model, tok, records)
    names = [f"{t.format(l)}.weight" for l in base_hp.layers for t in base_hp.rewrite_templates()]
    params = {n: resolve_parameter(model, n) for n in names}
    results = {"unedited": {"summary": summarize(baseline), "per_edit": baseline, "seconds": None}}
    for mode in args.modes.split(","):
        hp = type(base_hp).from_dict({**base_hp.to_dict(), "alg_name": f"{base}_{mode.upper()}"})
        with weight_transaction(params, restore_always=True):
            start = time.perf_counter()
            apply_edit(model, tok, records, hp, context_templates=templates, progress=not args.quiet)
            seconds = time.perf_counter() - start
            rows = evaluate_records(model, tok, records, baseline)
        results[mode] = {"summary": summarize(rows), "per_edit": rows, "seconds": seconds}
        print(f"{mode}: edited {len(records)} requests in {seconds:.1f} s", file=sys.stderr)
    table_rows = [{"mode": m, **r["summary"], "seconds": r["seconds"]} for m, r in results.items()]
    print()
    print(f"{model_name} | {len(records)} edits | {base} layers {base_hp.layers} | one batch edit per mode")
    print(render_table(table_rows, COLUMNS))
    if args.json:
        payload = {
            "model": model_name, "data": str(args.data or "demo"), "n": len(records),
            "hparams": base_hp.to_dict(), "context_templates": templates, "records": records,
            "results": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        print(f"per-edit numbers written to {args.json}", file=sys.stderr)
    return 0


def cmd_export_model(args) -> int:
    from .models import export_model

    out = export_model(args.alias, args.out)
    print(out)
    return 0


def cmd_stats(args) -> int:
    from .hparams import load_hparams
    from .models import load_model
    from .stats import second_moments, stats_path

    hp = load_hparams(args.hparams)
    if args.stats_dir:
        hp.stats_dir = args.stats_dir
    model, tok = load_model(args.model or hp.model_name, device=args.device)
    modules = [t.format(l) for l in hp.layers for t in hp.rewrite_templates()]
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="easyedit-replay", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="edit the same requests with spread and replay; print the metrics")
    c.add_argument("--hparams", help="plugin YAML (default: the bundled MEMIT_REPLAY/smollm2-135m.yaml)")
    c.add_argument("--model", help="model alias, directory or hub name (default: the YAML's model_name)")
    c.add_argument("--data", help="edits in EasyEdit's CounterFact or ZsRE format (default: bundled demo edits)")
    c.add_argument("--n", type=int, help="use the first N edits")
    c.add_argument("--seed", type=int, help="context-template seed (default: the YAML's context_seed)")
    c.add_argument("--modes", default="spread,replay", help="comma-separated modes (default: spread,replay)")
    c.add_argument("--layers", help="override the edit layers, e.g. 3,4,5,6,7")
    c.add_argument("--json", help="write all per-edit numbers to this file")
    c.add_argument("--stats-dir", help="statistics cache (default: the cache root's stats/ for the bundled YAML)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--quiet", action="store_true", help="no per-step progress bars")
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("export-model", help="write a Hugging Face copy of a bundled model alias")
    e.add_argument("alias", help="e.g. smollm2-135m")
    e.add_argument("--out", required=True, help="output directory (new or empty)")
    e.set_defaults(func=cmd_export_model)

    s = sub.add_parser("stats", help="compute (or check) covariance statistics for a YAML")
    s.add_argument("--hparams", required=True)
    s.add_argument("--model")
    s.add_argument("--stats-dir")
    s.add_argument("--force", action="store_true", help="recompute even if cached")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_stats)
    mc = sub.add_parser("make-corpus", help="regenerate the bundled offline statistics corpus")
    mc.add_argument("--model", default="smollm2-135m")
    mc.add_argument("--n", type=int, default=512)
    mc.add_argument("--seed", type=int, default=0)
    mc.add_argument("--out", default=str(Path(__file__).resolve().parent / "data" / "bundled_corpus.json"))
    mc.add_argument("--device", default="cpu")
    mc.set_defaults(func=cmd_make_corpus)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
