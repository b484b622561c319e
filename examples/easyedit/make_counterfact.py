"""Write CounterFact edits in the layout EasyEdit's ``examples/run_AlphaEdit_editing.py``
reads with ``--data_type CF`` (``DATA_DIR/counterfact.json``).

    python examples/easyedit/make_counterfact.py OUT_DIR [--data FILE] [--n N]

``FILE`` holds KnowEdit-style CounterFact records (``prompt``, ``subject``,
``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``), such as
EasyEdit's ``counterfact-val.json`` or, by default, this plugin's bundled demo edits
(``easyedit_replay/data/demo_edits.json``). Records whose prompt does not contain the
subject are skipped (the CF layout stores the prompt with a ``{}`` for the subject);
the first ``N`` (default: all) of the rest are written. Prints the path and the edits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "easyedit_replay" / "data" / "demo_edits.json"
FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt")


def to_cf(record: dict) -> dict:
    """One KnowEdit CounterFact record in the CF layout of ``run_AlphaEdit_editing.py``."""
    return {
        "case_id": record.get("case_id"),
        "requested_rewrite": {"prompt": record["prompt"].replace(record["subject"], "{}", 1),
                              "subject": record["subject"], "target_new": {"str": record["target_new"]},
                              "target_true": {"str": record["ground_truth"]}},
        "paraphrase_prompts": [record["rephrase_prompt"]],
        "neighborhood_prompts": [record["locality_prompt"]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="folder to write counterfact.json into (run_AlphaEdit_editing.py --data_dir)")
    p.add_argument("--data", default=str(DEMO), help="KnowEdit-style CounterFact JSON (default: bundled demo edits)")
    p.add_argument("--n", type=int, help="write the first N usable records (default: all)")
    args = p.parse_args(argv)
    records = json.loads(Path(args.data).read_text())
    missing = sorted({f for r in records for f in FIELDS if f not in r})
    if missing:
        sys.exit(f"{args.data}: records lack {missing}; expected KnowEdit CounterFact fields {list(FIELDS)}")
    usable = [r for r in records if r["subject"] in r["prompt"]][: args.n]
    if not usable:
        sys.exit(f"{args.data}: no record whose prompt contains its subject")
    out = Path(args.out_dir) / "counterfact.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([to_cf(r) for r in usable], indent=1))
    print(f"{out}: {len(usable)} edits, first: "
          + "; ".join(f"{r['subject']} -> {r['target_new']}" for r in usable[:4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
