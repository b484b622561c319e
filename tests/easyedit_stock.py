"""Run one of EasyEdit's stock ``execute_*`` functions on prepared inputs (a child process).

    EASYEDIT_ROOT=/path/to/EasyEdit python tests/easyedit_stock.py PMET inputs.pt deltas.pt

``inputs.pt`` (``torch.save`` of a dict) holds ``model_path``, ``requests``,
``hparams`` (our fields; the stock dataclass keeps its own), ``templates`` (the
context templates, written into the module's ``CONTEXT_TEMPLATES_CACHE``) and
``covs`` (``{module: [d, d]}``, written into ``COV_CACHE``), so stock runs on the
same templates and statistics as the plugin. ``deltas.pt`` receives
``{weight_name: update}``. Only the stock algorithm's own package is imported:
``easyeditor`` and ``easyeditor.models`` are bare namespace stubs, so EasyEdit's
top-level imports (trainers, multimodal models) are not needed.

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
}


def import_stock(root: str, module: str):
    for name, sub in (("easyeditor", "easyeditor"), ("easyeditor.models", "easyeditor/models")):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = stub
    return importlib.import_module(f"easyeditor.models.{module}")


def main(alg: str, inputs: str, output: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, execute, hp_class = STOCK[alg]
    data = torch.load(inputs, weights_only=False)
    torch.set_num_threads(1)
    main_mod = import_stock(os.environ["EASYEDIT_ROOT"], module)
    tok = AutoTokenizer.from_pretrained(data["model_path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(data["model_path"], dtype=torch.float32).eval()
    main_mod.CONTEXT_TEMPLATES_CACHE = data["templates"]
    name = model.config._name_or_path.replace("/", "_")
    for mod, cov in data["covs"].items():
        main_mod.COV_CACHE[(name, mod)] = cov.float()
    cls = getattr(main_mod, hp_class)
    fields = {f.name for f in dataclasses.fields(cls)}
    hp = cls(**{k: v for k, v in data["hparams"].items() if k in fields} | {"alg_name": alg, "device": "cpu"})
    deltas = getattr(main_mod, execute)(model, tok, data["requests"], hp)
    torch.save({k: v.detach().cpu() for k, v in deltas.items()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
