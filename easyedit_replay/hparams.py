"""Hyperparameter dataclasses: EasyEdit's fields plus the replay fields, YAML loading,
and validation with clear errors.

The field names and meanings are EasyEdit's (``MEMITHyperParams`` and friends),
so a stock YAML loads after changing ``alg_name``. Fields we add all have
defaults:

- ``replay_share`` and ``replay_tau``: YAML aliases of construction parameters
  (:mod:`easyedit_replay.targets.shares`), read when an edit starts and only by the
  construction they belong to. ``replay_share``: ``"full"`` (default, the paper's
  method: each layer takes its full local residual ``z^{l_i} - h^{l_i}_cur``) or
  ``"remaining"`` (ablation: layer ``l_i`` takes ``1/(n-i+1)`` of it, PMET
  ``1/sqrt(n-i+1)``, the stock share applied to replayed targets); the ``replay``
  construction's. ``replay_tau``: the exponent of the ``replay_tau`` construction, in
  ``[0, 1]`` (default 0.5; a mode spec ``replay_tau=0.25`` sets it instead): layer
  ``l_i`` takes ``1/(n-i+1)^tau`` of its replayed residual (0: the paper's FE, 1:
  ``replay_remaining``).
- ``anchor_batch_size``: requests optimized together in one anchor loop.
- ``mom2_batch_tokens``: cap on tokens per statistics sample (EasyEdit's
  ``batch_tokens`` of ``layer_stats``; the file name then gets ``_t{N}``);
  ``None`` = the statistics context length (below).
- ``mom2_max_length`` (default 4096): cap on the statistics context length, applied
  like EasyEdit's own Qwen (4096) and Mistral caps of ``npos`` (file name
  unchanged): a text longer than this contributes its first ``mom2_max_length``
  tokens. Bounds the memory of a 128k-context model's statistics pass (one
  sequence of ``T`` tokens costs ``heads * T^2`` attention scores under eager
  attention).
- ``mom2_tokens_per_batch`` (default 4096): texts are packed into forward passes of
  at most this many tokens (a text longer than this runs alone); changes only
  float rounding, not the file name.
- ``context_seed``: seed of the context-template sampler.
- ``anchor_cache``: keep optimized anchors in the disk cache (:mod:`easyedit_replay.anchors.store`).
- ``operating_point``: the name of the anchor settings a YAML carries (``bundled``,
  ``paper``, ``host-fe``: ``hparams/README.md``); a label, read by ``compare`` and
  ``scale`` to record which point made a cell. The values themselves key cells and
  anchors, so two points never share either.
- ``hparams_source``: the file (and repository) the values were taken from.
- ``post_norm``: ``"invert"`` (default) or ``"additive"``. Where the rewritten module's
  output passes through a norm before the residual stream (Gemma 2/3's
  ``post_feedforward_layernorm``, detected from the model), ``invert`` optimizes the
  anchor on the rewritten module's output and turns each layer's block-output residual
  into the change that module must write (:mod:`easyedit_replay.postnorm`);
  ``additive`` keeps stock EasyEdit's assumption that the two are the same. No effect
  on models without such a norm.

Sequential editing (:mod:`easyedit_replay.sequential`; both off by default, which is
bit-identical to an edit without them):

- ``sequential_keys``: which keys of EARLIER batches of the same model the solve
  protects. ``"stock"`` (default): each algorithm as shipped (MEMIT, EMMET, PMET: none;
  AlphaEdit: its sequential cache of the keys as read at their edit). ``"edit_time"``:
  the earlier batches' keys as read at their edit are added to the solve of MEMIT,
  EMMET and PMET (the FE authors' ``add_old_keys``: ``K K^T`` of each batch accumulated
  into the next batches' solve; AlphaEdit's stock cache already is this).
  ``"rekeyed"``: the earlier edits' keys are re-read on the current model at each
  layer's solve (the layers before it already updated by this batch) and protected
  instead of the stale ones, in MEMIT's, EMMET's and PMET's solve and in place of
  AlphaEdit's sequential cache.
- ``norm_anchor``: ``true`` rescales every target to the norm anchor of its layer
  (NAS, "Norm Anchors Make Model Edits Last", arXiv 2602.02543): the value the
  rewritten module must output for the target is rescaled to the mean of those
  values over the first batch of the model's sequential record (in a sequence edited
  with the option on from its start: the first batch, edited on the unedited model),
  and dropped when it is more than twice that (the anchor and every replayed target
  alike).
- ``sequential_refresh``: ``true`` restores the earlier edits in every later batch's
  solve: the model's record keeps the states each batch's requests reached at every
  edit layer once it was written, and every later batch adds those requests as rows of
  each layer's solve with those states as targets (under its own construction's share
  and measure). No anchor is optimized again. MEMIT, EMMET and AlphaEdit (whose
  sequential cache then leaves the solve but for its untracked part, the edits the
  record does not hold: the rest holds the same edits), with
  ``sequential_keys: stock`` and a construction that shares the residual uniformly
  (not ``replay_capacity``/``replay_joint``).
- ``sequential_refresh_weight`` (default 1): the weight ``w`` of those earlier rows in
  the least-squares solve (their keys and residuals enter it multiplied by
  ``sqrt(w)``: ``w K_old K_old^T`` and ``w R_old K_old^T`` in the normal equations);
  ``w > 1`` holds the earlier edits more firmly at the cost of the new batch's fit
  (``w -> inf``: hard constraints, the limit AlphaEdit's null-space projection is for
  the keys it preserves). A positive finite number; a value other than 1 needs
  ``sequential_refresh: true`` (mode spec ``+refresh=W``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

import yaml

from .errors import HyperParamsError, field_error
from .model_info import num_layers

REPLAY_SHARES = ("full", "remaining")
POST_NORM_MODES = ("invert", "additive")  # easyedit_replay.postnorm
SEQUENTIAL_KEYS = ("stock", "edit_time", "rekeyed")
INTEGER_FIELDS = ("v_num_grad_steps", "mom2_n_samples", "anchor_batch_size", "mom2_max_length",
                  "mom2_tokens_per_batch")
MOM2_DTYPES = ("float16", "float32", "float64", "bfloat16")
# EasyEdit-compatibility only: accepted (and validated where EasyEdit gives them a type) so that
# a stock YAML loads, read nowhere in the plugin (device: EasyEdit's BaseEditor places the model;
# the plugin uses the devices of the model's modules). tests/test_docs.py keeps this list honest.
EASYEDIT_ONLY_FIELDS = ("layer_selection", "mom2_adjustment", "device", "max_length", "batch_size", "model_parallel")
LAYER_SELECTIONS = ("all", "random")  # EasyEdit's Literal for layer_selection


def _to_float_if_numeric(config: dict) -> dict:
    """EasyEdit's ``construct_float_from_scientific_notation``: "5e-1" -> 0.5."""
    out = {}
    for key, value in config.items():
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


@dataclass(kw_only=True)
class ReplayHyperParams:
    """Fields shared by MEMIT, PMET, EMMET and AlphaEdit (EasyEdit names), plus ours.

    Loaded with :meth:`from_hparams` (a YAML path) or :meth:`from_dict`.
    """

    # Method (EasyEdit)
    layers: List[int]
    layer_selection: str = "all"  # EasyEdit-compatibility only (EASYEDIT_ONLY_FIELDS)
    fact_token: str = "subject_last"
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool = True  # EasyEdit-compatibility only
    mom2_update_weight: float
    # Module templates (EasyEdit)
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    # Statistics (EasyEdit)
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str = "float32"
    alg_name: str
    device: Union[int, str] = 0  # EasyEdit-compatibility only
    model_name: str
    stats_dir: str = "./data/stats"
    max_length: int = 40  # EasyEdit-compatibility only
    batch_size: int = 1  # EasyEdit-compatibility only
    model_parallel: bool = False  # EasyEdit-compatibility only
    # easyedit-replay
    replay_share: str = "full"
    replay_tau: float = 0.5
    anchor_batch_size: int = 16
    mom2_batch_tokens: Optional[int] = None
    mom2_max_length: int = 4096
    mom2_tokens_per_batch: int = 4096
    context_seed: int = 0
    anchor_cache: bool = True
    operating_point: str = "bundled"
    hparams_source: Optional[str] = None
    post_norm: str = "invert"
    # easyedit-replay, sequential editing (easyedit_replay.sequential)
    sequential_keys: str = "stock"
    norm_anchor: bool = False
    sequential_refresh: bool = False
    sequential_refresh_weight: float = 1.0

    # ------------------------------------------------------------------ loading
    @classmethod
    def field_names(cls) -> List[str]:
        """Names of every dataclass field of this class (EasyEdit's fields, the replay
        fields and the algorithm's own), in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source: str = "hparams"):
        """Build and validate from a mapping (YAML contents).

        Raises:
            HyperParamsError: unknown or missing fields, a wrong ``alg_name``, or any
                value :meth:`validate` rejects. The message names the field and the fix.
        """
        if not isinstance(config, dict) or not config:
            raise HyperParamsError(f"{source}: expected a mapping of hyperparameters, got {type(config).__name__}")
        config = _to_float_if_numeric(config)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in config if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, list(known), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise HyperParamsError(
                f"{source}: unknown field(s) {', '.join(hints)} for {cls.__name__}; "
                f"remove them or fix the spelling"
            )
        required = [
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in config]
        if missing:
            raise HyperParamsError(f"{source}: missing required field(s) {missing} for {cls.__name__}; add them to the YAML")
        cls.check_alg_name(config.get("alg_name"), source)
        hp = cls(**config)
        hp.validate()
        return hp

    # Set by easyedit_replay.algorithms.register_algorithm: the algorithm this class loads.
    ALGORITHM: ClassVar[str] = ""

    @classmethod
    def check_alg_name(cls, alg, source: str = "hparams") -> None:
        """Check that ``alg`` names this class's algorithm: ``{ALGORITHM}_<CONSTRUCTION>``
        (``MEMIT_REPLAY``, ``MEMIT_BLUE``, ...); anything goes for the shared base class.
        The construction suffix is the registries' to check
        (:func:`easyedit_replay.algorithms.get_algorithm`, when the name is used).

        Raises:
            HyperParamsError: another algorithm's name, or not a string.
        """
        if cls.ALGORITHM and not (isinstance(alg, str) and alg.startswith(f"{cls.ALGORITHM}_")):
            raise field_error(HyperParamsError, "alg_name", alg,
                              f"{cls.__name__} loads {cls.ALGORITHM}_<CONSTRUCTION> names ({cls.ALGORITHM}_REPLAY, "
                              f"{cls.ALGORITHM}_SPREAD, ...)", source)

    def replace(self, **changes):
        """A validated copy with ``changes`` applied (``dataclasses.replace`` + :meth:`validate`).

        Raises:
            HyperParamsError: an unknown field, an ``alg_name`` this class does not
                load, or a value :meth:`validate` rejects.
        """
        unknown = [k for k in changes if k not in self.field_names()]
        if unknown:
            raise HyperParamsError(f"{type(self).__name__}.replace: unknown field(s) {unknown}")
        if "alg_name" in changes:
            self.check_alg_name(changes["alg_name"])
        hp = dataclasses.replace(self, **changes)
        hp.validate()
        return hp

    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, Path]):
        """Load a YAML file (``.yaml`` is appended when missing), like EasyEdit."""
        config, source = read_yaml(hparams_name_or_path)
        return cls.from_dict(config, source=source)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as a plain mapping (``dataclasses.asdict``: nested values copied);
        :meth:`from_dict` of it gives back an equal object."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        """Normalize YAML spellings once, at construction: ``25.0`` -> ``25`` for integer
        fields (YAML's ``5e1`` is a float). :meth:`validate` only checks."""
        for name in INTEGER_FIELDS + ("v_loss_layer", "context_seed", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))

    def validate(self) -> None:
        """Model-independent checks (no value is changed).

        Raises:
            HyperParamsError: the first field whose value is out of range or of the wrong
                type (``layers``, ``fact_token``, the positive / non-negative finite numbers,
                ``model_name``, ``hparams_source``, ``context_seed``, ``stats_dir``,
                the EasyEdit-compatibility fields EasyEdit reads, ``mom2_dtype``, the replay
                and sequential fields, the module templates, ``mom2_dataset``); the message
                names the field and the fix."""
        err = lambda name, fix: field_error(HyperParamsError, name, getattr(self, name), fix)  # noqa: E731
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise err("layers", "must be a non-empty list of layer indices, e.g. [4, 5, 6, 7, 8]")
        if not all(is_integer(x) for x in self.layers):
            raise err("layers", "must contain integers only")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise err("layers", f"must be strictly increasing; use {sorted(set(self.layers))}")
        if min(self.layers) < 0:
            raise err("layers", "must be non-negative layer indices")
        from .prompts import FACT_TOKENS

        if self.fact_token not in FACT_TOKENS:
            raise err("fact_token", f"must be one of {list(FACT_TOKENS)}")
        for name in INTEGER_FIELDS:
            if not is_positive_integer(getattr(self, name)):
                raise err(name, "must be a positive integer")
        for name in ("v_lr", "clamp_norm_factor"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise err(name, "must be a positive number")
        for name in ("v_weight_decay", "kl_factor", "mom2_update_weight"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise err(name, "must be a non-negative number")
        if not is_integer(self.v_loss_layer):
            raise err("v_loss_layer", "must be an integer layer index (usually the last layer)")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise err("model_name", "must be the model's name, alias or directory, e.g. 'smollm2-135m'")
        if self.hparams_source is not None and not isinstance(self.hparams_source, str):
            raise err("hparams_source", "must be a string (where the values come from) or null")
        if not is_integer(self.context_seed):
            raise err("context_seed", "must be an integer (the seed of the context-template sampler), e.g. 0")
        if not isinstance(self.stats_dir, (str, os.PathLike)) or not str(self.stats_dir):
            raise err("stats_dir", "must be a folder path (the statistics cache), e.g. './data/stats'")
        if os.path.isfile(self.stats_dir):
            raise err("stats_dir", "is a file; give the folder of the statistics cache (created if missing)")
        # EasyEdit-compatibility fields: the plugin does not read them, EasyEdit's BaseEditor does
        for name in ("mom2_adjustment", "model_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise err(name, "must be true or false (read by EasyEdit)")
        for name in ("batch_size", "max_length"):
            if not is_positive_integer(getattr(self, name)):
                raise err(name, "must be a positive integer (read by EasyEdit)")
        if self.layer_selection not in LAYER_SELECTIONS:
            raise err("layer_selection", f"must be one of {list(LAYER_SELECTIONS)} (EasyEdit's values)")
        if self.mom2_dtype not in MOM2_DTYPES:
            raise err("mom2_dtype", f"must be one of {list(MOM2_DTYPES)}")
        if not isinstance(self.operating_point, str) or not self.operating_point:
            raise err("operating_point", "must be a non-empty name, e.g. 'bundled', 'paper' or 'host-fe'")
        if not isinstance(self.anchor_cache, bool):
            raise err("anchor_cache", "must be true or false")
        if self.post_norm not in POST_NORM_MODES:
            raise err("post_norm", f"must be one of {list(POST_NORM_MODES)} (invert: edit through a post-norm "
                      f"MLP such as Gemma's correctly; additive: stock EasyEdit's assumption)")
        if self.sequential_keys not in SEQUENTIAL_KEYS:
            raise err("sequential_keys", f"must be one of {list(SEQUENTIAL_KEYS)} (stock: as the algorithm ships; "
                      f"edit_time: earlier batches' keys as read at their edit; rekeyed: re-read on the current model)")
        if not isinstance(self.norm_anchor, bool):
            raise err("norm_anchor", "must be true or false")
        if not isinstance(self.sequential_refresh, bool):
            raise err("sequential_refresh", "must be true or false")
        if self.sequential_refresh and self.sequential_keys != "stock":
            raise err("sequential_refresh", f"restores the earlier edits, which sequential_keys "
                      f"{self.sequential_keys!r} holds at their current outputs; set one of them, not both")
        problem = refresh_weight_problem(self.sequential_refresh_weight)
        if problem:
            raise err("sequential_refresh_weight", problem)
        if self.sequential_refresh_weight != 1 and self.sequential_refresh is not True:
            raise err("sequential_refresh_weight", "weighs the earlier edits' rows that sequential_refresh adds; "
                      "set sequential_refresh: true as well (mode spec: +refresh=W), or leave it at 1")
        if self.replay_share not in REPLAY_SHARES:
            raise err("replay_share", f"must be one of {list(REPLAY_SHARES)}")
        if not is_number(self.replay_tau) or not 0 <= self.replay_tau <= 1:
            raise err("replay_tau", "must be a number in [0, 1] (0: full residual as FE, 1: divided as spreading)")
        if self.mom2_batch_tokens is not None and (
            not isinstance(self.mom2_batch_tokens, int) or self.mom2_batch_tokens <= 0
        ):
            raise err("mom2_batch_tokens", "must be a positive integer or null")
        for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
            value = getattr(self, name)
            if not isinstance(value, str) or value.count("{}") != 1:
                raise err(name, "must be a module name template with one {} for the layer index, e.g. 'model.layers.{}'")
        for name in ("ln_f_module", "lm_head_module", "mom2_dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise err(name, "must be a non-empty string")
        from .stats import known_corpus

        if not known_corpus(self.mom2_dataset):
            raise err("mom2_dataset", "is neither a known corpus ('bundled', 'self_generated', 'wikipedia', "
                      "'wikitext', 'wikitext2') nor an existing .txt file or folder")

    # Module templates (a string, or a list of them) checked against the model for every
    # edit layer (and v_loss_layer for layer_module_tmp), before any work starts.
    MODULE_TEMPLATES: ClassVar[Tuple[str, ...]] = (
        "layer_module_tmp", "rewrite_module_tmp", "mlp_module_tmp", "attn_module_tmp")

    def validate_for_model(self, model) -> None:
        """Checks against a model, before any work starts: layer ranges, and every module
        template (:attr:`MODULE_TEMPLATES`, for every edit layer) and ``ln_f_module`` /
        ``lm_head_module`` naming a module of ``model``.

        Raises:
            HyperParamsError: a layer outside ``[0, num_layers)``, ``v_loss_layer`` before the
                last edit layer (the anchor's loss would be read at the anchor layer), or a template that
                names no module of ``model`` (the message names the field and the
                closest module names).
        """
        from .tracing import resolve_module

        n = num_layers(model)
        if n is not None:
            if max(self.layers) >= n:
                raise field_error(HyperParamsError, "layers", self.layers, f"the model has {n} layers (0..{n - 1})")
            if not 0 <= self.v_loss_layer < n:
                raise field_error(HyperParamsError, "v_loss_layer", self.v_loss_layer, f"must be in 0..{n - 1} (usually {n - 1})")
        if self.v_loss_layer < max(self.layers):
            raise field_error(HyperParamsError, "v_loss_layer", self.v_loss_layer,
                              f"must be at or after the last edit layer {max(self.layers)}: the anchor's NLL is read "
                              f"at this layer's output" + (f" (usually the model's last layer, {n - 1})" if n else ""))
        for name in self.MODULE_TEMPLATES:
            value = getattr(self, name)
            for tmp in [value] if isinstance(value, str) else value:  # PMET's rewrite_module_tmps: a list
                for layer in self.layers:
                    resolve_module(model, tmp.format(layer), name)
        resolve_module(model, self.layer_module_tmp.format(self.v_loss_layer), "layer_module_tmp")
        resolve_module(model, self.ln_f_module, "ln_f_module")
        lm = resolve_module(model, self.lm_head_module, "lm_head_module")
        if getattr(lm, "weight", None) is None:
            raise field_error(HyperParamsError, "lm_head_module", self.lm_head_module, "must name a module with a weight (the unembedding)")


def refresh_weight_problem(value) -> Optional[str]:
    """What is wrong with ``value`` as ``sequential_refresh_weight`` (the fix to name),
    or None for a positive finite number (a ``+refresh=W`` mode spec is checked here too)."""
    if not is_number(value) or value <= 0:
        return ("must be a positive finite number: the weight of the earlier edits' rows in the solve "
                "(1: as much as the new batch's rows, as plain +refresh; larger holds them more firmly), e.g. 4")
    return None


def is_number(x) -> bool:
    """A finite real number that is not a bool (NaN and infinities are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integer(x) -> bool:
    """An int that is not a bool (YAML's ``true`` is not a layer index or a seed)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_positive_integer(x) -> bool:
    """An :func:`is_integer` above 0 (a step count, a batch size, a length)."""
    return is_integer(x) and x > 0


def read_yaml(path: Union[str, Path]) -> Tuple[Dict[str, Any], str]:
    """Read a hyperparameter YAML (``.yaml`` appended when missing): ``(mapping, path)``.

    Raises:
        HyperParamsError: missing file, invalid YAML syntax, or a YAML that is not a mapping.
    """
    source = str(path)
    if not source.endswith((".yaml", ".yml")):
        source += ".yaml"
    try:
        with open(source) as stream:
            config = yaml.safe_load(stream)
    except FileNotFoundError:
        raise HyperParamsError(f"hparams file {source!r} does not exist; pass the path of a YAML file") from None
    except yaml.YAMLError as exc:
        raise HyperParamsError(f"{source}: not valid YAML ({' '.join(str(exc).split())}); fix the syntax") from None
    if not isinstance(config, dict):
        raise HyperParamsError(f"{source}: expected a mapping of hyperparameters, got {type(config).__name__}")
    return config, source
