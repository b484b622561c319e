"""Checks that need a real EasyEdit, run in ITS interpreter by tests/test_easyedit.py.

``python easyedit_probe.py STOCK_YAML REPLAY_YAML OUT_JSON [--steps N]``

STOCK_YAML (``alg_name: MEMIT``) and REPLAY_YAML (``alg_name: MEMIT_REPLAY``) are
identical otherwise and name an exported model directory EasyEdit loads by name.
Writes a JSON report: how registration happened, the classes ``from_hparams``
returned, the tokenizer padding side and pad token under ``BaseEditor`` for both
names, batchability, the error for a planned name, and the relative difference
between EasyEdit's ``execute_memit`` and the plugin's ``MEMIT_SPREAD``
(``compute_edit``) weight updates given the same context templates and the same
statistics files.
"""

import argparse
import json
import sys
import time

import torch

TEMPLATES = [["{}"], ["The following is true. {}", "I read this yesterday. {}"]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("stock")
    p.add_argument("replay")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--n", type=int, default=2)
    args = p.parse_args()
    report = {}

    t0 = time.perf_counter()
    import easyeditor  # noqa: F401  (the .pth hook registers here)
    from easyedit_replay.easyedit import registered

    report["import_easyeditor_s"] = round(time.perf_counter() - t0, 2)
    report["registered_by_hook"] = registered()
    import easyedit_replay

    again = easyedit_replay.register()
    report["second_register_patched"] = again.patched
    report["register_ok"] = again.ok

    from easyeditor import BaseEditor, BatchEditor, MEMITHyperParams
    from easyeditor.util import alg_dict

    stock_hp = MEMITHyperParams.from_hparams(args.stock)
    replay_hp = MEMITHyperParams.from_hparams(args.replay)
    report["stock_class"] = f"{type(stock_hp).__module__}.{type(stock_hp).__name__}"
    report["replay_class"] = f"{type(replay_hp).__module__}.{type(replay_hp).__name__}"
    report["batchable"] = {n: BatchEditor.is_batchable_method(n) for n in ("MEMIT", "MEMIT_REPLAY", "MEMIT_SPREAD")}

    # A paper baseline name (MEMIT_BLUE) falls out of the registry: EasyEdit knows it and
    # its stock hparams class loads a YAML that names it.
    import tempfile

    import yaml

    cfg = yaml.safe_load(open(args.replay))
    cfg["alg_name"] = "MEMIT_BLUE"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    blue_hp = MEMITHyperParams.from_hparams(f.name)
    report["blue"] = {"class": type(blue_hp).__name__, "alg_name": blue_hp.alg_name,
                      "in_alg_dict": "MEMIT_BLUE" in alg_dict.ALG_DICT}

    ed_stock = BaseEditor.from_hparams(stock_hp)
    ed_replay = BaseEditor.from_hparams(replay_hp)
    report["padding_side"] = {"MEMIT": ed_stock.tok.padding_side, "MEMIT_REPLAY": ed_replay.tok.padding_side}
    report["pad_token_id"] = {"MEMIT": ed_stock.tok.pad_token_id, "MEMIT_REPLAY": ed_replay.tok.pad_token_id}
    report["editor_alg_name"] = ed_replay.alg_name
    report["hparams_alg_name_after_init"] = replay_hp.alg_name
    report["apply_algo_is_plugin"] = ed_replay.apply_algo is alg_dict.ALG_DICT["MEMIT_REPLAY"]
    report["stock_apply_algo_is_stock"] = ed_stock.apply_algo is alg_dict.ALG_DICT["MEMIT"]
    del ed_replay

    # Equivalence: stock execute_memit vs plugin MEMIT_SPREAD, same templates and statistics.
    from easyeditor.models.memit import memit_main

    from easyedit_replay.data import load_records
    from easyedit_replay.algorithms import load_hparams

    model, tok = ed_stock.model, ed_stock.tok
    requests = [{k: r[k] for k in ("prompt", "subject", "target_new", "ground_truth")}
                for r in load_records()[: args.n]]
    # The plugin first: it writes the npz statistics if missing (stock EasyEdit cannot
    # compute mom2_dataset 'bundled'; it reads the file the plugin wrote).
    spread_hp = load_hparams(args.replay, alg_name="MEMIT_SPREAD", v_num_grad_steps=args.steps)
    t0 = time.perf_counter()
    plan = easyedit_replay.compute_edit(model, tok, requests, spread_hp, "spread", context_templates=TEMPLATES)
    report["plugin_seconds"] = round(time.perf_counter() - t0, 2)
    memit_main.CONTEXT_TEMPLATES_CACHE = TEMPLATES
    stock_hp.v_num_grad_steps = args.steps
    t0 = time.perf_counter()
    deltas = memit_main.execute_memit(model, tok, requests, stock_hp)
    report["stock_seconds"] = round(time.perf_counter() - t0, 2)
    stock = {}
    for name, (adj_k, resid) in deltas.items():
        w = model.get_parameter(name)
        stock[name] = memit_main.upd_matrix_match_shape(adj_k @ resid.T, w.shape).double()
    rel = {}
    for name, upd in stock.items():
        ours = plan.updates[name].double().to(upd.device)
        rel[name] = float((ours - upd).norm() / upd.norm())
    report["equivalence_rel_error"] = rel
    report["update_norms"] = {name: float(u.norm()) for name, u in stock.items()}
    report["steps"] = args.steps
    report["n_requests"] = len(requests)
    report["torch"] = torch.__version__
    json.dump(report, open(args.out, "w"), indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
