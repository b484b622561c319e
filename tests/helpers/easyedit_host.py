"""Running EasyEdit's own code next to ours: the inputs both sides share and the child
process that runs a host script (``tests/helpers/easyedit_stock.py``, ``tests/helpers/easyedit_fe_cache.py``)
with ``EASYEDIT_PYTHON`` (default this interpreter). Used by the parity tests that
need ``EASYEDIT_ROOT``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from easyedit_replay.stats import second_moments

HERE = Path(__file__).resolve().parent


def host_inputs(model_tok, hp, records: Sequence[dict], templates, modules: Sequence[str], stats_dir) -> dict:
    """What a host script loads: the model path, requests, hyperparameters (as a dict),
    context templates and our second moments of ``modules`` (CPU tensors ``[d_k, d_k]``),
    so both sides edit from the same statistics."""
    from easyedit_replay.models import resolve_model_path

    covs = second_moments(*model_tok, hp, list(modules), stats_dir=stats_dir)
    return {"model_path": resolve_model_path(hp.model_name), "requests": list(records), "hparams": hp.to_dict(),
            "templates": templates, "covs": {m: covs[m].cpu() for m in modules}}


def run_host_script(script: str, *args: str, timeout: int = 1800) -> None:
    """Run ``tests/<script> *args`` in a child process with ``EASYEDIT_PYTHON`` and this
    checkout on ``PYTHONPATH``; assert it exits 0 (its stderr tail is the message)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([os.environ.get("EASYEDIT_PYTHON", sys.executable), str(HERE / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_stock(alg: str, inputs: dict, tmp_path: Path, tag: str = "") -> dict:
    """EasyEdit's ``execute_*`` for ``alg`` on ``inputs`` in a child process
    (tests/helpers/easyedit_stock.py); returns its updates ``{weight name: tensor}``."""
    src, out = tmp_path / f"inputs{tag}.pt", tmp_path / f"stock{tag}.pt"
    torch.save(inputs, src)
    run_host_script("easyedit_stock.py", alg, src, out)
    return torch.load(out)


def relative_differences(ours: dict, stock: dict) -> dict:
    """``{weight_name: |ours - stock| / |stock|}`` (Frobenius norms, float64)."""
    assert sorted(ours) == sorted(stock)
    return {k: float((ours[k].double() - stock[k].double()).norm() / stock[k].double().norm()) for k in stock}
