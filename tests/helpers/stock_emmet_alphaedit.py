"""Our EMMET_SPREAD / AlphaEdit_SPREAD vs EasyEdit's stock ``execute_emmet`` /
``execute_AlphaEdit`` on the same inputs. Run by tests/test_emmet_alphaedit.py in a
separate interpreter that can import EasyEdit (``EASYEDIT_PYTHON``, e.g. a venv built
from EasyEdit's requirements); prints one ``RESULT {json}`` line.

Same inputs: the same context templates (stock caches them in the module global
``CONTEXT_TEMPLATES_CACHE``), the same statistics (stock ``COV_CACHE``), the same
projections (a ``P_loc`` file holding ours), and the same anchors: stock's
``compute_z`` optimizes one request at a time while ours is batched, so stock's
``compute_z`` is replaced by one that returns our anchor values. Everything else
(keys, current states, residuals, the solves, AlphaEdit's sequential cache) is
stock code.

EasyEdit's package ``__init__`` imports every editor and its optional
dependencies; only the two editor modules are needed, so the ``easyeditor`` and
``easyeditor.models`` packages are entered without running their ``__init__``.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import tempfile
import types

import torch


def stock_module(name):
    root = os.environ["EASYEDIT_ROOT"]
    for pkg, sub in (("easyeditor", "easyeditor"), ("easyeditor.models", "easyeditor/models")):
        if pkg not in sys.modules:
            m = types.ModuleType(pkg)
            m.__path__ = [os.path.join(root, sub)]
            sys.modules[pkg] = m
    return importlib.import_module(name)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def stock_update(delta, weight):
    """Stock EMMET returns ``(adj_k, resid)`` (applied as ``adj_k @ resid^T``), AlphaEdit the matrix."""
    if isinstance(delta, tuple):
        delta = delta[0] @ delta[1].T
    return delta if delta.shape == weight.shape else delta.T


def main():
    from easyedit_replay.algorithms.alphaedit import null_space_projection, projections
    from easyedit_replay.data import load_records
    from easyedit_replay.algorithms import get_algorithm
    from easyedit_replay.editor import compute_edit
    from easyedit_replay.algorithms import load_hparams
    from easyedit_replay.easyedit import seed_stock_caches
    from easyedit_replay.models import cache_root, load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    records = load_records(None, 6)
    batches = [records[:3], records[3:6]]
    templates = [["{}"], ["The following is true. {}", "I read this yesterday. {}"]]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    steps = int(os.environ.get("STOCK_CHECK_STEPS", "4"))
    out = {}
    for alg, main_name, hp_name in (("EMMET", "easyeditor.models.emmet.emmet_main", "EMMETHyperParams"),
                                    ("AlphaEdit", "easyeditor.models.alphaedit.AlphaEdit_main", "AlphaEditHyperParams")):
        stock = stock_module(main_name)
        ours_hp = load_hparams(os.path.join(root, "hparams", f"{alg}_REPLAY", "smollm2-135m.yaml"),
                               alg_name=f"{alg}_SPREAD", stats_dir=str(cache_root() / "stats"), v_num_grad_steps=steps)
        modules = [ours_hp.rewrite_module_tmp.format(l) for l in ours_hp.layers]
        covs = seed_stock_caches(stock, model, tok, ours_hp, templates)
        fields = getattr(stock, hp_name).__dataclass_fields__
        config = {k: v for k, v in ours_hp.to_dict().items() if k in fields}
        config.update(alg_name=alg, device="cpu")
        tmpdir = tempfile.mkdtemp()
        if alg == "AlphaEdit":
            P = projections(model, ours_hp, covs)
            stacked = torch.stack([P[m] for m in modules])
            config["P_loc"] = os.path.join(tmpdir, "P.pt")
            torch.save(stacked, config["P_loc"])
            # stock sizes its cache by substrings of model_name; SmolLM2 has llama-style weights
            config["model_name"] = "smollm2-llama-style"
            stock.P, stock.P_loaded = stacked, True
            d = covs[modules[0]].shape[0]
            stock.cache_c, stock.cache_c_new = torch.zeros(len(modules), d, d), True
            out["AlphaEdit_P_vs_get_project"] = max(
                rel(null_space_projection(covs[m], ours_hp.nullspace_threshold), stock.get_project(model, tok, l, types.SimpleNamespace(**config)))
                for m, l in zip(modules, ours_hp.layers))
        stock_hp = getattr(stock, hp_name)(**config)
        ours_model, stock_model = copy.deepcopy(model), copy.deepcopy(model)
        errors = []
        for b, batch in enumerate(batches):
            plan = compute_edit(ours_model, tok, batch, ours_hp, "spread", context_templates=templates)
            zs = iter(plan.anchor.value[0])
            original = stock.compute_z
            stock.compute_z = lambda *a, **k: next(zs).clone()
            try:
                fn = stock.execute_emmet if alg == "EMMET" else stock.execute_AlphaEdit
                deltas = fn(stock_model, tok, copy.deepcopy(batch), stock_hp)
            finally:
                stock.compute_z = original
            per = {}
            for w, delta in deltas.items():
                weight = stock_model.get_parameter(w)
                upd = stock_update(delta, weight)
                per[w] = rel(plan.updates[w], upd)
                with torch.no_grad():
                    weight += upd.to(weight.dtype)
            errors.append(per)
            # ours: write the edit and commit it (AlphaEdit's cache grows), as apply_edit does
            with torch.no_grad():
                for w, u in plan.updates.items():
                    p = ours_model.get_parameter(w)
                    p += u.to(p.dtype)
            get_algorithm(ours_hp.alg_name).rule.commit(ours_model, ours_hp, plan.pending)
        out[alg] = errors
        out[f"{alg}_max_rel"] = max(v for per in errors for v in per.values())
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
