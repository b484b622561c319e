"""Run one of EasyEdit's example scripts, unchanged, for an ``alg_name`` its
``--editing_method`` switch has no branch for (MEMIT-FE, PMET, EMMET and their
plugin twins in ``examples/run_AlphaEdit_editing.py``).

    cd EasyEdit/examples
    python /path/to/easyedit-replay/examples/easyedit/run_example.py run_AlphaEdit_editing.py \
        --editing_method MEMIT --hparams_dir ../yaml/PMET.yaml --data_dir ../cf --data_type CF ...

Every argument after the script path goes to the script as its own ``sys.argv``.
The script file is executed as ``__main__`` (``runpy.run_path``) after one change
to the loaded ``easyeditor`` package: the hyperparameter class that
``--editing_method`` names (``MEMITHyperParams`` for ``MEMIT``) is replaced, for
the script only, by EasyEdit's class for the YAML's ``alg_name``
(``MEMITFEHyperParams`` for ``MEMIT-FE``, ``PMETHyperParams`` for ``PMET`` and,
through the plugin's registration, for ``PMET_REPLAY``). Data loading, the
``BaseEditor.edit`` call and ``summary_metrics`` are the script's own.

Raises SystemExit with a message when the YAML's ``alg_name`` has no
hyperparameter class in the loaded EasyEdit.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import yaml


def host_class_name(alg_name: str) -> str:
    """EasyEdit's hyperparameter class name for ``alg_name``: a plugin name maps to its
    base's class (``PMET_REPLAY`` -> ``PMETHyperParams``), a stock name to
    ``<name without '-'>HyperParams`` (``MEMIT-FE`` -> ``MEMITFEHyperParams``)."""
    from easyedit_replay.easyedit import base_name, host_hparams_name

    base = base_name(alg_name)
    return host_hparams_name(base) if base else f"{alg_name.replace('-', '')}HyperParams"


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    script, script_args = sys.argv[1], sys.argv[2:]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--editing_method", required=True)
    parser.add_argument("--hparams_dir", required=True)
    opts, _ = parser.parse_known_args(script_args)
    sys.path.insert(0, os.path.abspath(".."))  # what the examples' sys.path.append('..') finds
    import easyeditor  # the plugin's import hook registers here

    import easyedit_replay

    easyedit_replay.register()  # idempotent; for interpreters without the .pth hook
    with open(opts.hparams_dir) as f:
        alg_name = yaml.safe_load(f)["alg_name"]
    name = host_class_name(alg_name)
    cls = getattr(easyeditor, name, None)
    if cls is None:
        sys.exit(f"the loaded EasyEdit ({easyeditor.__file__}) has no {name} for alg_name {alg_name!r}")
    setattr(easyeditor, f"{opts.editing_method}HyperParams", cls)
    print(f"examples/easyedit/run_example.py: {os.path.basename(script)} unchanged; --editing_method "
          f"{opts.editing_method} loads {name} for alg_name {alg_name}", flush=True)
    sys.argv = [script] + script_args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
