"""MEMIT-FE as EasyEdit's ``BaseEditor`` runs it (a child process, EasyEdit's interpreter).

    EASYEDIT_ROOT=/path/to/EasyEdit python tests/helpers/easyedit_fe_editor.py inputs.pt report.pt

``inputs.pt`` is as for ``tests/helpers/easyedit_stock.py``: ``model_path``, ``requests``,
``hparams`` (our fields; ``MEMITFEHyperParams`` keeps its own), ``templates`` (written
into MEMIT-FE's ``CONTEXT_TEMPLATES_CACHE``) and ``covs`` (written into its
``COV_CACHE``), so the host edits from the same templates and statistics as the plugin.
Imports the whole ``easyeditor`` package of ``EASYEDIT_ROOT`` (on a CPU-only torch,
with ``examples/easyedit/host_stubs`` on ``PYTHONPATH``).

``report.pt`` receives:

- ``yaml``: ``{file name: alg_name or the error}`` for every ``hparams/MEMIT-FE/*.yaml``
  of ``EASYEDIT_ROOT`` loaded with ``MEMITFEHyperParams.from_hparams``;
- ``padding_side``: the tokenizer's padding side after ``BaseEditor.__init__`` (the
  model is loaded by path, through a ``...-llama`` link, as a user's YAML would name it);
- ``updates``: one ``{weight name: update}`` per request, each edited by
  ``BaseEditor.edit`` from the unedited weights (``sequential_edit=False``): the
  ``(keys, residuals)`` pairs MEMIT-FE's ``execute_memit`` returned to
  ``apply_memit_FE_to_model``, multiplied out as it does (read, not changed);
- ``pre``, ``post``: EasyEdit's ``rewrite_acc`` per request before and after its edit.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch


def load_yamls(cls, root: Path) -> dict:
    out = {}
    for path in sorted((root / "hparams" / "MEMIT-FE").glob("*.yaml")):
        try:
            out[path.name] = cls.from_hparams(str(path)).alg_name
        except Exception as exc:  # the host's loader asserts
            out[path.name] = f"{type(exc).__name__}: {exc}"
    return out


def main(inputs: str, output: str) -> None:
    data = torch.load(inputs, weights_only=False)
    root = Path(os.environ["EASYEDIT_ROOT"]).resolve()
    sys.path.insert(0, str(root))
    torch.set_num_threads(1)
    import easyeditor
    from easyeditor import BaseEditor, MEMITFEHyperParams
    from easyeditor.models.memit_FE import memit_FE_main

    assert Path(easyeditor.__file__).resolve().parent == root / "easyeditor", easyeditor.__file__
    report = {"yaml": load_yamls(MEMITFEHyperParams, root)}

    link = Path(tempfile.mkdtemp(prefix="fe_editor_")) / "smollm2-135m-llama"
    link.symlink_to(data["model_path"], target_is_directory=True)
    fields = {f.name for f in dataclasses.fields(MEMITFEHyperParams)}
    hp = MEMITFEHyperParams(**{k: v for k, v in data["hparams"].items() if k in fields}
                            | {"alg_name": "MEMIT-FE", "model_name": str(link), "device": "cpu"})
    editor = BaseEditor.from_hparams(hp)
    report["padding_side"] = editor.tok.padding_side

    memit_FE_main.CONTEXT_TEMPLATES_CACHE = data["templates"]
    name = editor.model.config._name_or_path.replace("/", "_")
    for mod, cov in data["covs"].items():
        memit_FE_main.COV_CACHE[(name, mod)] = cov.float()
    recorded = []
    execute = memit_FE_main.execute_memit

    def recording_execute(model, tok, requests, hparams, **kwargs):
        deltas = execute(model, tok, requests, hparams, **kwargs)
        recorded.append({w: memit_FE_main.upd_matrix_match_shape(k @ r.T, model.get_parameter(w).shape).detach().clone()
                         for w, (k, r) in deltas.items()})
        return deltas

    memit_FE_main.execute_memit = recording_execute  # apply_memit_FE_to_model looks it up here
    reqs = data["requests"]
    metrics, _, _ = editor.edit(prompts=[r["prompt"] for r in reqs], target_new=[r["target_new"] for r in reqs],
                                ground_truth=[r["ground_truth"] for r in reqs], subject=[r["subject"] for r in reqs],
                                sequential_edit=False)
    report.update(updates=recorded, pre=[m["pre"]["rewrite_acc"] for m in metrics],
                  post=[m["post"]["rewrite_acc"] for m in metrics])
    torch.save(report, output)


if __name__ == "__main__":
    main(*sys.argv[1:3])
