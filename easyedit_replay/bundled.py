"""The YAMLs shipped with the package (``hparams/``, reached as ``easyedit_replay/configs``):
their paths per model, algorithm and operating point, and which algorithms and models
have them. ``hparams/README.md`` says where each operating point's values come from."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .errors import ReplayError

OPERATING_POINTS = ("bundled", "paper", "host-fe")
# The hyperparameters an operating point sets: the anchor objective's four settings. A
# point's YAML is the bundled one's but for these (and its labels, ``operating_point`` and
# ``hparams_source``); PMET's point YAMLs set the same four and keep PMET's own fields.
POINT_FIELDS = ("clamp_norm_factor", "v_lr", "v_weight_decay", "v_num_grad_steps")


def default_hparams_path(model: str = "smollm2-135m", alg: str = "MEMIT_REPLAY", point: str = "bundled") -> Path:
    """The bundled YAML for ``alg`` on ``model`` at operating point ``point`` (shipped
    inside the package): ``<alg>/<model>.yaml`` for ``bundled``, else
    ``<alg>/<model>-<point>.yaml`` (``hparams/README.md`` says where each point's values
    come from)."""
    name = model if point == "bundled" else f"{model}-{point}"
    return Path(__file__).resolve().parent / "configs" / alg / f"{name}.yaml"


def bundled_algorithms(model: str = "smollm2-135m") -> List[str]:
    """Base algorithms that have a bundled ``<ALG>_REPLAY/<model>.yaml``, in the paper's order."""
    from .algorithms import RULES

    order = ["MEMIT", "PMET", "EMMET", "AlphaEdit"]
    names = sorted(RULES, key=lambda b: order.index(b) if b in order else len(order))
    return [b for b in names if default_hparams_path(model, f"{b}_REPLAY").exists()]


def bundled_model(model: Optional[str]) -> str:
    """The bundled YAMLs' name (``hparams/<ALG>_REPLAY/<name>.yaml``) for ``--model``: the
    default SmolLM2 without ``--model``, else the model's alias or last path component
    (``/models/llama3-8b`` -> ``llama3-8b``); ``--point`` then picks among that model's
    operating points.

    Raises:
        ReplayError: no bundled YAML has that name (the message names ``--hparams``).
    """
    from .algorithms import RULES
    from .models import ALIASES, DEFAULT_MODEL

    if not model:
        return DEFAULT_MODEL
    name = Path(str(model).rstrip("/")).name
    if name.lower() in ALIASES:  # an alias's other spellings share its YAMLs
        name = next(k for k, v in ALIASES.items() if v is ALIASES[name.lower()])
    variants = tuple(f"-{point}" for point in OPERATING_POINTS if point != "bundled")  # <model>-<point>.yaml
    if not name.endswith(variants) and any(default_hparams_path(name, f"{b}_REPLAY").exists() for b in RULES):
        return name
    folders = [default_hparams_path(DEFAULT_MODEL, f"{b}_REPLAY").parent for b in RULES]
    stems = {p.stem for folder in folders for p in folder.glob("*.yaml")}
    known = sorted(s for s in stems if not s.endswith(variants))
    raise ReplayError(f"--model {model}: no bundled YAML hparams/<ALG>_REPLAY/{name}.yaml (bundled: "
                      f"{', '.join(known)}); pass --hparams with a YAML for this model")
