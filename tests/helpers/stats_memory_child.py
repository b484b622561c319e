"""One measurement of the statistics pass's peak memory on a 128k-context config, in this
process (run as a child: ``tests/test_real_models.py`` and ``benchmarks/stats_memory.py``).

SmolLM2-135M with ``max_position_embeddings`` patched to 131072 (Llama-3.1/3.2's
value), eager or SDPA attention, and a corpus of one very long text (``--tokens``
tokens, the bundled corpus's texts joined on one line) plus a few short lines. After
computing the second moment of ``model.layers.4.mlp.down_proj`` it prints one JSON line
with the peak resident set size (``VmHWM`` of ``/proc/self/status``, the high-water mark
of this process's own address space; ``ru_maxrss`` instead keeps the parent's RSS at
fork across ``exec``, so a child of a large pytest process reported the parent's 3.2 GB)
and the RSS right after loading the model, for reference.

    python tests/helpers/stats_memory_child.py --tokens 12000 --attn eager --limit-gb 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

POSITIONS = 131072
MODULE = "model.layers.4.mlp.down_proj"


def long_corpus(tok, n_tokens: int, path: Path, n_short: int = 3) -> Path:
    """Write ``path``: one line of at least ``n_tokens`` tokens, then ``n_short`` short lines."""
    from easyedit_replay.stats import bundled_texts

    texts = [t.replace("\n", " ") for t in bundled_texts()]
    line, i = [], 0
    while len(tok.encode(" ".join(line))) < n_tokens:
        line.extend(texts[i % len(texts)] for _ in range(8))
        i += 8
    path.write_text(" ".join(line) + "\n" + "\n".join(texts[:n_short]) + "\n", encoding="utf-8")
    return path


def child(args) -> None:
    """One measurement in this process; prints one JSON line."""
    import resource
    import time

    import torch

    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.cli import default_hparams_path
    from easyedit_replay.models import load_model
    from easyedit_replay.stats import second_moments

    if args.limit_gb:  # address-space limit: a regression fails with MemoryError instead of exhausting the machine
        limit = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    model, tok = load_model()
    model.config.max_position_embeddings = POSITIONS
    model.set_attn_implementation(args.attn)
    with open("/proc/self/status") as fh:
        loaded = next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
    with tempfile.TemporaryDirectory() as tmp:
        corpus = long_corpus(tok, args.tokens, Path(tmp) / "long.txt")
        n_lines = len(corpus.read_text().splitlines())
        changes = dict(mom2_dataset=str(corpus), mom2_n_samples=n_lines, layers=[4])
        if args.max_length:
            changes["mom2_max_length"] = args.max_length
        hp = load_hparams(default_hparams_path(), stats_dir=str(Path(tmp) / "stats"), **changes)
        started = time.perf_counter()
        second_moments(model, tok, hp, [MODULE], progress=False)
        seconds = time.perf_counter() - started
        files = sorted(p.name for p in Path(tmp, "stats").rglob("*.npz"))
    peak = peak_rss_mb()
    print(json.dumps(dict(attn=args.attn, tokens=args.tokens, max_length=getattr(hp, "mom2_max_length", None),
                          rss_after_load_mb=round(loaded), peak_rss_mb=round(peak), seconds=round(seconds, 1),
                          files=files)))


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB: ``VmHWM`` (Linux; reset at ``exec``), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, required=True, help="length of the long text")
    p.add_argument("--attn", required=True, help="attention implementation: eager or sdpa")
    p.add_argument("--max-length", type=int, default=None, help="mom2_max_length (default: the hparams default)")
    p.add_argument("--limit-gb", type=float, default=None, help="address-space limit of this process")
    child(p.parse_args(argv))


if __name__ == "__main__":
    main()
