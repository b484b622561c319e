"""Run one of EasyEdit's stock ``execute_*`` functions on prepared inputs (a child process).

    EASYEDIT_ROOT=/path/to/EasyEdit python tests/helpers/easyedit_stock.py PMET inputs.pt deltas.pt

``inputs.pt`` (``torch.save`` of a dict) holds ``model_path``, ``requests``,
``hparams`` (our fields; the stock dataclass keeps its own), ``templates`` (the
context templates, written into the module's ``CONTEXT_TEMPLATES_CACHE``) and
``covs`` (``{module: [d, d]}``, written into ``COV_CACHE``), so stock runs on the
same templates and statistics as the plugin; optionally ``padding_side`` (default
``"right"``, what ``BaseEditor`` sets for MEMIT on Llama models) and
``cache_template`` (passed to ``execute_*``). ``deltas.pt`` receives
``{weight_name: update}`` shaped like the weight (MEMIT's ``(adj_k, resid)`` pairs
are multiplied out as ``apply_memit_to_model`` does). Only the stock algorithm's
own package is imported: ``easyeditor`` and ``easyeditor.models`` are bare
namespace stubs, so EasyEdit's top-level imports (trainers, multimodal models) are
not needed.

Run it with the interpreter of EasyEdit's environment (``EASYEDIT_PYTHON``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types

import torch

STOCK = {
    # alg: (module under easyeditor.models, execute function, hparams class)
    "PMET": ("pmet.pmet_main", "execute_pmet", "PMETHyperParams"),
    "MEMIT": ("memit.memit_main", "execute_memit", "MEMITHyperParams"),
    "MEMIT-FE": ("memit_FE.memit_FE_main", "execute_memit", "MEMITFEHyperParams"),
}


def import_stock(root: str, module: str):
    for name, sub in (("easyeditor", "easyeditor"), ("easyeditor.models", "easyeditor/models")):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = stub
    return importlib.import_module(f"easyeditor.models.{module}")


def load_model(model_path: str, padding_side: str = "right"):
    """The model and tokenizer as ``BaseEditor`` loads a Llama-family path (pad = EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, tok


def stock_updates(alg: str, model, tok, requests, hparams: dict, templates, covs, cache_template=None):
    """``{weight_name: update}`` (weight-shaped, detached, CPU) of EasyEdit's ``execute_*``
    for ``alg`` on the given templates and second moments; the model is left unchanged."""
    module, execute, hp_class = STOCK[alg]
    main_mod = import_stock(os.environ["EASYEDIT_ROOT"], module)
    main_mod.CONTEXT_TEMPLATES_CACHE = templates
    name = model.config._name_or_path.replace("/", "_")
    for mod, cov in covs.items():
        main_mod.COV_CACHE[(name, mod)] = cov.float()
    cls = getattr(main_mod, hp_class)
    fields = {f.name for f in dataclasses.fields(cls)}
    hp = cls(**{k: v for k, v in hparams.items() if k in fields} | {"alg_name": alg, "device": "cpu"})
    kwargs = {} if cache_template is None else {"cache_template": cache_template}
    deltas = getattr(main_mod, execute)(model, tok, requests, hp, **kwargs)
    out = {}
    for w_name, value in deltas.items():
        if isinstance(value, tuple):  # MEMIT: (adj_k, resid), multiplied out as apply_memit_to_model does
            adj_k, resid = value
            value = main_mod.upd_matrix_match_shape(adj_k @ resid.T, model.get_parameter(w_name).shape)
        out[w_name] = value.detach().cpu()
    return out


def main(alg: str, inputs: str, output: str) -> None:
    data = torch.load(inputs, weights_only=False)
    model, tok = load_model(data["model_path"], data.get("padding_side", "right"))
    deltas = stock_updates(alg, model, tok, data["requests"], data["hparams"], data["templates"], data["covs"],
                           data.get("cache_template"))
    torch.save(deltas, output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
