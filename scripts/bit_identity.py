"""Bit-identity harness for refactors that must not change a number (issue 32).

    python scripts/bit_identity.py save DIR      # before the change: record everything below into DIR
    python scripts/bit_identity.py check DIR     # after it: recompute and compare with DIR
    python scripts/bit_identity.py diff DIR NEW  # or: save the changed code into NEW too, then compare the two
    python scripts/bit_identity.py reports       # the committed docs/results reports regenerate byte-identical

``save`` and ``check`` run the real SmolLM2-135M (as the tests load it) on the first
four bundled demo edits, with ``v_num_grad_steps`` lowered to 2, fixed context
templates for the plans and a fresh private anchor cache, and record:

- **plans**: MEMIT, PMET, EMMET and AlphaEdit x every registered construction
  (:data:`easyedit_replay.targets.CONSTRUCTIONS`), one batch of 2 edits, and as 2
  sequential batches of 2 (``spread``, ``replay`` and ``replay`` with each sequential
  option, :data:`easyedit_replay.sequential.SEQUENTIAL_OPTIONS`): each
  anchor's ``init``, ``delta``, ``nll`` and ``steps``, every target, every weight update
  (tensors, compared with ``torch.equal`` after a dtype and shape check) and the
  layer records (text). A refused combination records its message.
- **compare**: ``run_comparison`` on the 4 edits, MEMIT and AlphaEdit x spread, replay
  and replay_joint in one batch, and MEMIT x spread and replay+norm_anchor in batches of 2
  applied sequentially: ``results.json`` and the
  ``report.md`` of ``write_outputs`` (seconds set to 0, so both are byte-comparable).
- **scale**: ``run_scale`` one-batch cells (n = 2, 4; MEMIT and AlphaEdit; spread and
  replay_tau=0.5) and a sequential series (4 edits in batches of 2, ``--curve``,
  ``--attribution 2``; MEMIT and AlphaEdit; spread and replay+rekeyed): every cell file, each
  ``n<N>/results.json`` and ``report.md`` (cells with timings and timestamps zeroed,
  the report rewritten from them).

Each section goes to ``DIR/<section>/`` (tensors in ``tensors.safetensors``, texts in
``texts.json``). ``check`` prints how many entries of each section matched and every
one that did not, and exits 1 on a mismatch.

``reports`` copies each committed ``docs/results/<x>`` (not the anchor bank) to a
temporary folder, regenerates its reports there (``scale --report-only``, ``tune
--report-only``, ``compare``'s report from its ``results.json``, the allocation and
readme tables) and compares them byte for byte with the committed files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("EASYEDIT_REPLAY_AUTOLOAD") != "0":  # the .pth hook imports the installed package at start-up:
    os.environ["EASYEDIT_REPLAY_AUTOLOAD"] = "0"     # run again without it, so this checkout's code is measured
    os.execv(sys.executable, [sys.executable, *sys.argv])
sys.path.insert(0, str(ROOT))

ALGS = ("MEMIT", "PMET", "EMMET", "AlphaEdit")
TEMPLATES = [["{}"], ["The following is true. {}", "I read this yesterday. {}"]]
STEPS = 2  # v_num_grad_steps: keeps the anchors cheap; the code paths are the same
TIME_KEYS = ("seconds", "finished")
PROVENANCE_KEY = "provenance"  # a cell's version and commit: differs between the two sides by design


def _modes():
    """``(every construction, the sequential specs)``: the sequential runs take spread,
    replay and replay with each sequential option."""
    from easyedit_replay.sequential import SEQUENTIAL_OPTIONS
    from easyedit_replay.targets import CONSTRUCTIONS

    return list(CONSTRUCTIONS), ["spread", "replay"] + [f"replay+{o}" for o in SEQUENTIAL_OPTIONS]


def _hparams(alg):
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.bundled import default_hparams_path
    from easyedit_replay.models import cache_root

    hp = load_hparams(default_hparams_path("smollm2-135m", f"{alg}_REPLAY"), stats_dir=str(cache_root() / "stats"))
    return hp.replace(v_num_grad_steps=STEPS)


def _zero_times(obj):
    """``obj`` with every timing (keys ending in ``seconds``) set to 0, timestamps and a
    cell's provenance dropped."""
    if isinstance(obj, dict):
        return {k: (_zero_times_value(v) if k.endswith(TIME_KEYS[0]) else _zero_times(v))
                for k, v in obj.items() if k not in (TIME_KEYS[1], PROVENANCE_KEY)}
    if isinstance(obj, list):
        return [_zero_times(v) for v in obj]
    return obj


def _zero_times_value(v):
    if isinstance(v, list):
        return [0.0] * len(v)
    if isinstance(v, dict):
        return {k: 0.0 for k in v}
    return 0.0


def _plan_entries(prefix, plan, tensors, texts):
    for layer, a in sorted(plan.anchors.items()):
        for f in ("init", "delta", "nll", "steps"):
            tensors[f"{prefix}/anchor/{layer}/{f}"] = getattr(a, f)
    for (layer, template), v in sorted(plan.targets.values.items()):
        tensors[f"{prefix}/target/{layer}/{template}"] = v
    for name, u in sorted(plan.updates.items()):
        tensors[f"{prefix}/update/{name}"] = u
    texts[f"{prefix}/records"] = json.dumps([r.__dict__ for r in plan.records], default=str)


def collect_plans(model, tok, records, tensors, texts):
    """One batch of 2 and two sequential batches of 2 for every algorithm and mode spec."""
    from easyedit_replay.algorithms import weight_names
    from easyedit_replay.editor import apply_plan, compute_edit, weight_transaction
    from easyedit_replay.errors import ReplayError
    from easyedit_replay.experiment import mode_hparams
    from easyedit_replay.sequential import reset_sequential_state
    from easyedit_replay.tracing import resolve_parameter

    plain, seq = _modes()
    for alg in ALGS:
        hp0 = _hparams(alg)
        for spec in dict.fromkeys(plain + seq):
            hp, construction = mode_hparams(hp0, alg, spec)
            params = {n: resolve_parameter(model, n) for n in weight_names(hp)}
            runs = [("batch", [records[:2]])] if spec in plain else []
            runs += [("seq", [records[:2], records[2:4]])] if spec in seq else []
            for kind, batches in runs:
                prefix = f"plan/{alg}/{spec}/{kind}"
                reset_sequential_state(model)
                try:
                    with weight_transaction(params, restore_always=True):
                        for k, batch in enumerate(batches):
                            plan = compute_edit(model, tok, batch, hp, construction, context_templates=TEMPLATES)
                            apply_plan(model, plan, hp)
                            _plan_entries(f"{prefix}/{k}", plan, tensors, texts)
                except ReplayError as exc:
                    texts[f"{prefix}/refused"] = f"{type(exc).__name__}: {exc}"
                finally:
                    reset_sequential_state(model)
            print(f"plans {alg} {spec}: {len(tensors)} tensors", file=sys.stderr, flush=True)


def collect_compare(model, tok, records, texts, work: Path):
    from easyedit_replay.experiment import CompareConfig, render_report, run_comparison, write_outputs

    runs = (("batch", None, False, ("MEMIT", "AlphaEdit"), ("spread", "replay", "replay_joint")),
            ("seq", 2, True, ("MEMIT",), ("spread", "replay+norm_anchor")))
    for kind, batch_size, sequential, algs, modes in runs:
        for alg in algs:
            cfg = CompareConfig(modes=modes, batch_size=batch_size, sequential=sequential, fluency_tokens=4,
                                progress=False)
            results = _zero_times(run_comparison(model, tok, records[:4], {alg: _hparams(alg)}, cfg))
            results = json.loads(json.dumps(results, default=str))
            out = work / f"compare_{kind}_{alg}"
            files = write_outputs(results, out, f"bit identity: {alg}, {kind}")
            texts[f"compare/{kind}/{alg}/results.json"] = files["results"].read_text()
            texts[f"compare/{kind}/{alg}/report.md"] = files["report"].read_text()
            texts[f"compare/{kind}/{alg}/render_report"] = render_report(results)
            print(f"compare {kind} {alg}", file=sys.stderr, flush=True)


def collect_scale(model, tok, records, texts, work: Path):
    from easyedit_replay.scale import ScaleConfig, run_scale, write_scale_report

    runs = (("batch", ("MEMIT", "AlphaEdit"), ScaleConfig(sizes=[2, 4], modes=("spread", "replay_tau=0.5"),
                                                          fluency_tokens=4, progress=False)),
            ("seq", ("MEMIT", "AlphaEdit"), ScaleConfig(sizes=[2, 4], modes=("spread", "replay+rekeyed"),
                                                        sequential=True, batch_size=2, curve=True, attribution=[2],
                                                        fluency_tokens=4, progress=False)))
    for kind, algs, cfg in runs:
        out = work / f"scale_{kind}"
        hps = {alg: _hparams(alg) for alg in algs}
        run_scale(model, tok, records[:4], hps, cfg, out, meta={"model": "smollm2-135m", "data": "demo"},
                  report=False)
        for path in sorted((out / "cells").rglob("*.json")):
            cell = _zero_times(json.loads(path.read_text()))
            path.write_text(json.dumps(cell, indent=1))
            texts[f"scale/{kind}/{path.relative_to(out)}"] = path.read_text()
        report = write_scale_report(out)
        texts[f"scale/{kind}/report.md"] = report.read_text()
        for path in sorted(out.glob("n*/results.json")):
            texts[f"scale/{kind}/{path.relative_to(out)}"] = path.read_text()
        print(f"scale {kind}", file=sys.stderr, flush=True)


def collect(sections):
    """``(tensors, texts)`` of the chosen sections, computed now."""
    import torch

    from easyedit_replay.data import load_records
    from easyedit_replay.models import load_model

    torch.set_num_threads(1)
    tensors, texts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EASYEDIT_REPLAY_ANCHOR_CACHE"] = str(Path(tmp) / "anchors")
        model, tok = load_model("smollm2-135m")
        records = load_records()[:4]
        if "plans" in sections:
            collect_plans(model, tok, records, tensors, texts)
        if "compare" in sections:
            collect_compare(model, tok, records, texts, Path(tmp))
        if "scale" in sections:
            collect_scale(model, tok, records, texts, Path(tmp))
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, texts


def save(out: Path, sections) -> None:
    """Compute each section and write it to ``out/<section>/`` (tensors and texts)."""
    from safetensors.torch import save_file

    import easyedit_replay

    print(f"code: {Path(easyedit_replay.__file__).parent}", flush=True)
    for section in sections:
        tensors, texts = collect([section])
        d = out / section
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "tensors.safetensors"))
        (d / "texts.json").write_text(json.dumps(texts, indent=0, sort_keys=True))
        print(f"saved {section}: {len(tensors)} tensors and {len(texts)} texts to {d}", flush=True)


def _load(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "tensors.safetensors")), json.loads((d / "texts.json").read_text())


def compare_entries(section: str, want, got) -> bool:
    """Print how many of ``section``'s entries match (tensors: dtype, shape, ``torch.equal``;
    texts: byte equality) and every one that does not; True when all match."""
    import torch

    (want_t, want_x), (got_t, got_x) = want, got
    bad = []
    for k in sorted(set(want_t) | set(got_t)):
        a, b = want_t.get(k), got_t.get(k)
        if a is None or b is None:
            bad.append(f"tensor {k}: missing on one side")
        elif a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"tensor {k}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):
            bad.append(f"tensor {k}: max |diff| {float((a.double() - b.double()).abs().max()):.3g}")
    for k in sorted(set(want_x) | set(got_x)):
        if want_x.get(k) != got_x.get(k):
            bad.append(f"text {k}: " + ("missing on one side" if k not in want_x or k not in got_x else "differs"))
    n_t, n_x = len(set(want_t) | set(got_t)), len(set(want_x) | set(got_x))
    bad_t = sum(b.startswith("tensor") for b in bad)
    print(f"{section}: tensors {n_t - bad_t}/{n_t} equal (torch.equal), texts {n_x - (len(bad) - bad_t)}/{n_x} "
          f"byte-identical", flush=True)
    for b in bad:
        print("  MISMATCH", b)
    return not bad


def _saved(base: Path, sections=None):
    return sections or sorted(p.name for p in base.iterdir() if (p / "texts.json").exists())


def check(base: Path, sections=None) -> int:
    """Recompute the saved sections (or ``sections``) and compare with ``base``
    (:func:`compare_entries`). Returns 1 on any mismatch or missing entry."""
    ok = True
    for section in _saved(base, sections):
        ok &= compare_entries(section, _load(base / section), collect([section]))
    return 0 if ok else 1


def diff(base: Path, other: Path, sections=None) -> int:
    """Compare two saved folders (a baseline and a ``save`` of the changed code, made in
    parallel) section by section. Returns 1 on any mismatch or missing entry."""
    ok = True
    for section in _saved(other, sections):
        ok &= compare_entries(section, _load(base / section), _load(other / section))
    return 0 if ok else 1


# ----------------------------------------------------------------------------- committed reports

RESULTS = ROOT / "docs" / "results"


def _cli(*argv, env=None) -> str:
    return subprocess.run([sys.executable, "-m", "easyedit_replay.cli", *argv], check=True, capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, **(env or {}))).stdout


def _tool(*argv) -> str:
    """A report command's stdout: ``easyedit-replay report ...`` when the CLI has it, else the old tools/ script."""
    return subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True, cwd=ROOT).stdout


def reports(keep: bool = False) -> int:
    """Regenerate every committed report into copies and compare byte for byte."""
    from easyedit_replay.experiment import write_outputs

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir() and p.name != "anchors"):
            copy = Path(tmp) / folder.name
            shutil.copytree(folder, copy)
            if (copy / "scale.json").exists():
                _cli("scale", "--out", str(copy), "--report-only")
            elif folder.name.startswith("tune"):  # its anchor-norm table reads the banked anchors
                _cli("tune", "--out", str(copy), "--report-only",
                     env={"EASYEDIT_REPLAY_ANCHOR_CACHE": str(RESULTS / "anchors")})
            else:
                data = json.loads((copy / "results.json").read_text())
                title = (copy / "report.md").read_text().splitlines()[0][2:]
                with contextlib.redirect_stdout(io.StringIO()):
                    write_outputs(data, copy, title)
            for report in sorted(folder.rglob("report.md")):
                rel = report.relative_to(RESULTS)
                if report.parent != folder:  # alloc192/: the allocation report of the folder's n00192 results
                    sub = Path(tmp) / rel.parent
                    _allocation(copy / "n00192" / "results.json", sub)
                same = (Path(tmp) / rel).read_bytes() == report.read_bytes()
                results.append((str(rel), same))
    for rel, same in results:
        print(f"{'identical' if same else 'DIFFERS  '} docs/results/{rel}")
    print(f"{sum(s for _, s in results)}/{len(results)} committed reports regenerate byte-identical")
    return 0 if all(s for _, s in results) else 1


def _allocation(results_json: Path, out: Path) -> None:
    new = _has_report_command()
    if new:
        _cli("report", str(results_json), "--markdown", "--allocation", "--out", str(out))
    else:
        _tool(str(ROOT / "tools" / "allocation_report.py"), str(results_json), "--out", str(out))


def _has_report_command() -> bool:
    return "report" in _cli("--help")


def tables(out: Path) -> None:
    """Save the printed tables of the docs/results.md commands (readme and allocation tables) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, argv in _table_commands().items():
        (out / f"{name}.txt").write_text(_run_table(argv))
    print(f"saved {len(_table_commands())} printed tables to {out}")


def check_tables(base: Path) -> int:
    bad = 0
    for name, argv in _table_commands().items():
        same = (base / f"{name}.txt").read_text() == _run_table(argv)
        bad += not same
        print(f"{'identical' if same else 'DIFFERS  '} {name}")
    print(f"{len(_table_commands()) - bad}/{len(_table_commands())} printed tables byte-identical")
    return 1 if bad else 0


def _table_commands():
    r = "docs/results/"
    return {"readme_cf48": ["--compare", r + "cf48_all/results.json"],
            "readme_zsre48": ["--compare", r + "zsre48_all/results.json"],
            "readme_cf32_alloc": ["--compare", r + "cf32_alloc/results.json"],
            "scale_cf": ["--scale", r + "scale_cf"],
            "scale_cf_modes": ["--scale", r + "scale_cf", "--modes", "spread,replay,blue"],
            "scale_cf_two": ["--scale", r + "scale_cf", "--modes", "spread,replay"],
            "scale_zsre": ["--scale", r + "scale_zsre"],
            "scale_zsre_modes": ["--scale", r + "scale_zsre", "--modes", "spread,replay,blue"]}


def _run_table(argv) -> str:
    if _has_report_command():  # easyedit-replay report SOURCE --markdown [--modes M]
        return _cli("report", argv[1], "--markdown", *argv[2:])
    if argv[0] == "--compare":
        return _tool(str(ROOT / "tools" / "readme_tables.py"), argv[1])
    return _tool(str(ROOT / "tools" / "readme_tables.py"), *argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("save", "check"):
        s = sub.add_parser(name)
        s.add_argument("dir")
        s.add_argument("--sections", default="compare,scale,plans" if name == "save" else "",
                       help="comma-separated: compare, scale, plans (check: default every saved one)")
    d = sub.add_parser("diff", help="compare two saved folders (baseline, then the changed code's save)")
    d.add_argument("dir")
    d.add_argument("other")
    d.add_argument("--sections", default="")
    sub.add_parser("reports")
    t = sub.add_parser("tables", help="save (or with --check compare) the printed docs/results.md tables")
    t.add_argument("dir")
    t.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    if args.command == "diff":
        return diff(Path(args.dir), Path(args.other), [s.strip() for s in args.sections.split(",") if s.strip()])
    if args.command in ("save", "check"):
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        if args.command == "save":
            save(Path(args.dir), sections)
            return 0
        return check(Path(args.dir), sections)
    if args.command == "tables":
        return check_tables(Path(args.dir)) if args.check else (tables(Path(args.dir)) or 0)
    return reports()


if __name__ == "__main__":
    sys.exit(main())
