"""Cost of the layer loop's reads (keys and current states), whole sequences in file
order against the compact reads (each sequence only up to its lookup token, batched
longest first), side by side, alternating, on the unedited model.

For every edit layer: the keys (input of ``rewrite_module_tmp`` at every request x
context template, as the layer loop reads them) and the current states (output of the
layer at the bare prompts). Prints seconds per edit of each, the ratio, the real over
padded tokens, and the largest relative difference between the two (float rounding).

    python benchmarks/bench_reads.py --data ../shared/data/counterfact/counterfact-val.json --n 192
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from _report import append_results  # benchmarks/ is sys.path[0] when a benchmark runs

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "bench_reads_cpu.txt"


def padding_efficiency(lengths, batch_size: int) -> float:
    """Real over padded tokens of right-padded batches of ``batch_size`` in the given order."""
    real = sum(lengths)
    padded = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    return real / padded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="EasyEdit-format edits (default: the bundled demo edits)")
    p.add_argument("--n", type=int, default=192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch

    from easyedit_replay.algorithms import get_algorithm, load_hparams
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.data import load_records
    from easyedit_replay.editor import resolve_templates
    from easyedit_replay.batching import token_ids
    from easyedit_replay.prompts import prepare_requests
    from easyedit_replay.reads import bare_probes, read_at_lookup, template_probes
    from easyedit_replay.models import load_model

    model, tok = load_model("smollm2-135m")
    hp = load_hparams(default_hparams_path(alg="MEMIT_REPLAY"))
    records = load_records(args.data, args.n)
    reqs = prepare_requests(records, leading_space=get_algorithm(hp.alg_name).rule.leading_space(model, hp))
    templates = resolve_templates(model, tok, hp)
    key_probes = list(dict.fromkeys(template_probes(tok, reqs, templates, hp.fact_token)))
    now_probes = bare_probes(tok, reqs, hp.fact_token)

    full = [len(token_ids(tok, q.text)) for q in key_probes]
    upto = sorted((q.index + 1 for q in key_probes), reverse=True)
    times = {False: 0.0, True: 0.0}
    largest = 0.0
    for _ in range(args.repeats):
        for layer in hp.layers:
            key_mod, now_mod = hp.rewrite_module_tmp.format(layer), hp.layer_module_tmp.format(layer)
            got = {}
            for compact in (False, True):
                t0 = time.perf_counter()
                keys = read_at_lookup(model, tok, key_probes, inputs=[key_mod], compact=compact)["in:" + key_mod]
                now = read_at_lookup(model, tok, now_probes, outputs=[now_mod], compact=compact)["out:" + now_mod]
                times[compact] += time.perf_counter() - t0
                got[compact] = (keys, now)
            for a, b in zip(got[False], got[True]):
                largest = max(largest, float((a - b).norm(dim=-1).max() / a.norm(dim=-1).min()))
    n_reads = args.repeats * len(records)
    lines = [f"\n# bench_reads | n={len(records)} | data {args.data or 'demo'} | {platform.machine()}, torch "
             f"{torch.__version__} threads {torch.get_num_threads()} | {time.strftime('%Y-%m-%d %H:%M')}",
             f"per layer loop over {len(hp.layers)} layers: {len(key_probes)} key rows + {len(now_probes)} "
             f"state rows per layer",
             f"  whole sequences, file order:   {times[False] / n_reads:.4f} s/edit "
             f"(real/padded tokens {padding_efficiency(full, 64):.2f})",
             f"  up to the lookup, longest first: {times[True] / n_reads:.4f} s/edit "
             f"(real/padded tokens {padding_efficiency(upto, 64):.2f}; tokens run {sum(upto) / sum(full):.2f} of "
             f"the whole)",
             f"  ratio {times[False] / times[True]:.2f}x faster; largest relative difference {largest:.1e}"]
    print("\n".join(lines))
    append_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
