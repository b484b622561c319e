"""Can MEMIT-FE's per-case z cache serve a stale z? (a child process, EasyEdit's interpreter)

    EASYEDIT_ROOT=/path/to/EasyEdit python tests/helpers/easyedit_fe_cache.py inputs.pt report.json

``execute_memit`` of ``easyeditor/models/memit_FE`` (and of stock MEMIT) stores each
z as ``cache_template.format(layer, clamp_norm_factor, case_id)`` and loads any file
found under that name. ``inputs.pt`` is as for ``tests/helpers/easyedit_stock.py`` with two
requests (``case_id`` set). Three cases, each on its own empty cache folder:

- ``v_lr``: MEMIT-FE with ``v_lr`` 0.5 writes the cache; MEMIT-FE with ``v_lr`` 0.1 on
  the same cache vs without a cache.
- ``shared``: MEMIT-FE writes the cache (z at every edit layer); stock MEMIT on the same
  ``cache_template`` (it reads z at ``l_n`` under the same name) vs without a cache.
- ``sequential``: request A edited into the model (``apply_memit_FE_to_model``), then
  request B's z computed on that edited model writes the cache; the weights restored,
  MEMIT-FE for B on the unedited model with the cache vs without.

For each case the report gives the largest per-layer relative difference of the
updates between the cached and the uncached run (0 = the cache served a z equal to a
fresh one) and, for ``v_lr``, between the cached run and the run that wrote the cache.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from easyedit_stock import import_stock, load_model, stock_updates  # noqa: E402


def largest_rel(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b)


def main(inputs: str, output: str) -> None:
    data = torch.load(inputs, weights_only=False)
    model, tok = load_model(data["model_path"])
    hp, templates, covs = data["hparams"], data["templates"], data["covs"]
    a, b = data["requests"][:2]
    work = Path(tempfile.mkdtemp(prefix="fe_cache_"))

    def fe(reqs, cache=None, **changes):
        return stock_updates("MEMIT-FE", model, tok, reqs, {**hp, **changes}, templates, covs, cache)

    report = {}
    # 1. a change of v_lr: the key has no v_lr
    cache = str(work / "v_lr" / "{}_{}_{}.npz")
    wrote = fe([a], cache, v_lr=0.5)
    cached = fe([a], cache, v_lr=0.1)
    fresh = fe([a], None, v_lr=0.1)
    report["v_lr"] = {"cached_vs_fresh": largest_rel(cached, fresh), "cached_vs_writer": largest_rel(cached, wrote)}

    # 2. MEMIT and MEMIT-FE on one cache_template: the key has no algorithm
    cache = str(work / "shared" / "{}_{}_{}.npz")
    fe([a], cache)
    memit_cached = stock_updates("MEMIT", model, tok, [a], hp, templates, covs, cache)
    memit_fresh = stock_updates("MEMIT", model, tok, [a], hp, templates, covs, None)
    report["shared"] = {"cached_vs_fresh": largest_rel(memit_cached, memit_fresh),
                        "files": sorted(p.name for p in (work / "shared").iterdir())}

    # 3. after a sequential batch: the key has no weights
    cache = str(work / "sequential" / "{}_{}_{}.npz")
    main_mod = import_stock(os.environ["EASYEDIT_ROOT"], "memit_FE.memit_FE_main")
    fe_hp = main_mod.MEMITFEHyperParams(**{k: v for k, v in hp.items()
                                           if k in main_mod.MEMITFEHyperParams.__dataclass_fields__}
                                        | {"alg_name": "MEMIT-FE", "device": "cpu"})
    _, orig = main_mod.apply_memit_FE_to_model(model, tok, [a], fe_hp, return_orig_weights=True)
    fe([b], cache)  # B's z on the model that already holds A
    with torch.no_grad():
        for name, w in orig.items():
            model.get_parameter(name).copy_(w)
    cached = fe([b], cache)
    fresh = fe([b], None)
    report["sequential"] = {"cached_vs_fresh": largest_rel(cached, fresh)}
    Path(output).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
