"""Sequential editing: what the earlier batches of a model edited, and the options that use it.

A model edited batch after batch (EasyEdit's ``sequential_edit``, ``scale --sequential``)
keeps, per model object (weak-keyed, like AlphaEdit's sequential cache), a record of
its committed batches (:class:`EditedBatch`): the requests, their context templates
and, for every rewritten weight, the key each request had at that weight's solve
(``[R, d_in]`` float32; 1536 floats per request and layer for SmolLM2). The record is
kept only when an option below needs it or :func:`track_sequential` asks for it
(``scale --sequential`` does, for the key-drift diagnostics). It follows the weights
as AlphaEdit's cache does: a batch whose weights are found back at their state before
it leaves the record, and weights back at their state before the first recorded
batch empty it (:func:`edited_batches`).

Options (hyperparameter fields, off by default; off is bit-identical to an edit made
without them):

``sequential_keys``
    ``stock``: each algorithm as shipped. ``edit_time``: the solve of MEMIT, EMMET and
    PMET also preserves the earlier batches' keys as read at their edit, ``G = sum
    K_old K_old^T`` added to the solve's key term (the FE authors' ``add_old_keys``,
    ``cache_c += K K^T`` per batch; AlphaEdit's stock cache already is this).
    ``rekeyed``: the earlier edits' keys are re-read on the current model at each
    site's solve, in the same forward pass as the batch's own keys (so with the
    earlier layers of this batch already written), and ``G`` is built from those; for
    AlphaEdit ``G`` replaces the sequential cache in the solve. Editing layer ``l``
    moves the keys that the layers after it see for every earlier subject; the
    earlier edits were solved for the old keys, and this protects the keys they
    have now.
``norm_anchor``
    NAS ("Norm Anchors Make Model Edits Last", arXiv 2602.02543; their
    ``compute_z``): the value the rewritten module must output for a target, ``v* =
    v0 + (t - h0)`` (``v0`` the module's current output and ``h0`` the target site's
    current state at the lookup token; PMET's targets are module outputs, so ``v* =
    t``), is rescaled to the norm anchor ``N`` of that layer, and set back to ``v0``
    (the request is not edited at that layer) when ``|v*| > 2 N``. Applied to every
    target a construction has: the anchor and each replayed target. ``N`` is the mean
    ``|v*|`` over the first batch the record holds (in a sequence edited with the
    option on from its start, the first batch, edited on the unedited model), leaving
    out the top 5% as NAS does; NAS estimates it once per model from anchors optimized
    for a sample of CounterFact rewrites with the same objective.

``sequential_refresh``
    Earlier edits restored (this project's design, from the diagnosis in
    ``docs/results.md``: later batches overwrite the values earlier edits wrote, most
    at the layers where a construction's updates are largest, and move the keys those
    edits were solved for). The record keeps, for every batch, the states its requests
    reached at each edit layer's block output once the batch was written (``[R, d]``
    per layer: the states at which the edit produced its target). Every later batch
    adds the earlier requests as rows of each layer's solve, with those states as
    their targets and the construction's own share and measure (replay: the state of
    each layer; spreading: the state at ``l_n``, divided over the layers left): the
    solve restores what drifted instead of holding it where it drifted to (as
    ``rekeyed`` does) or protecting keys that no longer arrive (``edit_time``). No
    anchor is optimized again. MEMIT, EMMET and AlphaEdit (block-output targets;
    AlphaEdit's cache holds the recorded earlier edits at their edit-time keys, so
    while their rows are in the solve only the cache's untracked part, the ``K K^T``
    of cached edits this record does not hold, stays in it:
    :func:`~easyedit_replay.algorithms.alphaedit.alphaedit_untracked`). PMET's targets
    are module outputs.
``sequential_refresh_weight``
    The weight ``w`` of those earlier rows (default 1: as much as the new batch's rows).
    Their keys and residuals enter the solve multiplied by ``sqrt(w)``, so its normal
    equations hold ``w K_old K_old^T`` and ``w R_old K_old^T``: MEMIT's ``(lambda C + K
    K^T + w K_old K_old^T)``, AlphaEdit's ``P (K K^T + w K_old K_old^T + U)``, EMMET's
    relaxation ``emmet_lambda / w`` for those rows (refused with ``emmet_lambda = 0``,
    where every row is an exact constraint and a weight cancels). ``w -> inf`` makes the
    earlier edits hard constraints, as AlphaEdit's null-space projection makes the
    preserved keys' outputs. At 1 nothing is multiplied (bit-identical to ``+refresh``).

The options compose with every target construction. ``replay_capacity`` and
``replay_joint`` size their shares from the rule's capacity without the protected keys.

Registered options (:data:`SEQUENTIAL_OPTIONS`) name these settings in a mode spec:
``replay+rekeyed`` is the replay construction with ``sequential_keys: rekeyed``
(``scale --sequential --modes spread,replay,replay+rekeyed``). An option may take one
number, which sets one more field (its ``param``): ``replay+refresh=4`` is
``sequential_refresh: true`` with ``sequential_refresh_weight: 4``; ``+refresh`` alone
leaves the weight at 1.

Where one more design plugs in: a hyperparameter field (off by default) plus a
:func:`register_sequential_option` (with ``param`` and ``check`` for a numeric value),
and its code at one of the two points where :func:`~easyedit_replay.editor.compute_edit`
consults this module: the targets
before the layer loop (:meth:`SequentialContext.adjust_targets`) or the earlier keys
a site's solve protects (:meth:`SequentialContext.protected`).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import HyperParamsError
from .hparams import refresh_weight_problem
from .prompts import EditRequest
from .reads import Probe, average_over_templates, bare_probes, read_at_lookup, template_probes
from .tracing import resolve_parameter

log = logging.getLogger(__name__)

Fingerprint = Tuple[float, float]
NAS_DROP_SHARE = 0.05   # NAS's upper-trimmed mean: the top 5% of |v*| left out
NAS_OUTLIER_FACTOR = 2.0  # NAS: |v*| above twice the norm anchor is not edited


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SequentialOption:
    """A named setting of sequential editing for mode specs (``"replay+rekeyed"``).

    Attributes:
        name: the suffix after ``+`` in a mode spec.
        overrides: hyperparameter fields and values it sets.
        summary: one line for help texts.
        param: the hyperparameter a spec ``+name=value`` sets to the number ``value``
            (``refresh=4``: ``sequential_refresh_weight``), empty if the option takes
            none. The option alone leaves it at its default.
        check: for an option with ``param``: what is wrong with a value (the fix to
            name), or None when it is valid.
    """

    name: str
    overrides: Mapping[str, Any]
    summary: str
    param: str = ""
    check: Optional[Callable[[float], Optional[str]]] = None


SEQUENTIAL_OPTIONS: Dict[str, SequentialOption] = {}


def register_sequential_option(option: SequentialOption) -> SequentialOption:
    """Make ``option`` usable in mode specs (``"<construction>+<option.name>"``, and
    ``"+<option.name>=<number>"`` when it has a ``param``).

    Raises:
        ValueError: a name with ``+``, ``=``, ``,``, ``/`` or spaces in it, no overrides,
            or a ``param`` that is not a hyperparameter with a numeric default (or that
            its overrides also set).
    """
    if not option.name or any(c in option.name for c in "+=,/ ") or not option.overrides:
        raise ValueError(f"SequentialOption({option.name!r}): a name without '+', '=', ',', '/' or spaces, "
                         f"and at least one hyperparameter override")
    if option.param and (not isinstance(_param_default(option.param), (int, float))
                         or option.param in option.overrides):
        raise ValueError(f"SequentialOption({option.name!r}).param = {option.param!r}: must name a "
                         f"hyperparameter with a numeric default that its overrides do not set")
    SEQUENTIAL_OPTIONS[option.name] = option
    return option


def _param_default(name: str) -> Any:
    """The dataclass default of hyperparameter ``name`` (None when there is none)."""
    from dataclasses import MISSING, fields

    from .hparams import ReplayHyperParams

    found = next((f.default for f in fields(ReplayHyperParams) if f.name == name), None)
    return None if found is MISSING else found


for _option in (
    SequentialOption("old_keys", {"sequential_keys": "edit_time"},
                     "earlier batches' keys as read at their edit kept in the solve (FE's add_old_keys)"),
    SequentialOption("rekeyed", {"sequential_keys": "rekeyed"},
                     "earlier edits' keys re-read on the current model at each solve and protected"),
    SequentialOption("norm_anchor", {"norm_anchor": True},
                     "targets rescaled to the layer's norm anchor (NAS)"),
    SequentialOption("refresh", {"sequential_refresh": True},
                     "earlier edits restored to the states they reached, as rows of every later solve "
                     "(refresh=W: those rows weighted W)",
                     param="sequential_refresh_weight", check=refresh_weight_problem),
):
    register_sequential_option(_option)


def format_number(value: float) -> str:
    """The canonical spelling of a mode spec's number: ``%g`` (``4.0`` -> ``4``, ``0.250`` ->
    ``0.25``, ``1e6`` -> ``1e06``: no ``+``, which separates options), or where ``%g``
    would round it the integer or ``repr`` (``1234567``, ``0.1234567``)."""
    value = float(value)
    short = f"{value:g}".replace("e+", "e")
    if float(short) == value:
        return short
    return str(int(value)) if value.is_integer() else repr(value).replace("e+", "e")


def _split_option(text: str) -> Tuple[SequentialOption, Optional[float]]:
    """``"refresh=4"`` -> ``(the refresh option, 4.0)``; ``"rekeyed"`` -> ``(..., None)``.

    Raises:
        ValueError: an unknown name, a value for an option without a parameter, or a
            value that is not a number or that the option's ``check`` refuses.
    """
    name, eq, raw = text.strip().partition("=")
    option = SEQUENTIAL_OPTIONS.get(name.strip())
    if option is None:
        raise ValueError(f"option {name.strip()!r} is not a sequential option; use one of {list(SEQUENTIAL_OPTIONS)}")
    if not eq:
        return option, None
    if not option.param:
        raise ValueError(f"option {option.name!r} takes no value; write '+{option.name}'")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"option {option.name}={raw.strip()!r}: not a number (e.g. {option.name}=4)") from None
    problem = option.check(value) if option.check else None
    if problem:
        raise ValueError(f"option {option.name}={raw.strip()}: {option.param} {problem}")
    return option, value


def parse_options(names: Sequence[str]) -> Dict[str, Any]:
    """The hyperparameter overrides of the registered options ``names`` (``"rekeyed"``,
    ``"refresh=4"``: an option's number sets its ``param``).

    Raises:
        ValueError: an unknown name, a value the option does not take or refuses, an
            option given twice, or two options that set one field differently.
    """
    out: Dict[str, Any] = {}
    seen = set()
    for text in names:
        option, value = _split_option(text)
        if option.name in seen:
            raise ValueError(f"option {option.name!r} is given twice; give it once")
        seen.add(option.name)
        sets = dict(option.overrides, **({option.param: value} if value is not None else {}))
        for key, value in sets.items():
            if key in out and out[key] != value:
                raise ValueError(f"options set {key} to both {out[key]!r} and {value!r}; keep one of them")
            out[key] = value
    return out


def option_spec(text: str) -> str:
    """The canonical spelling of one option of a mode spec (``" refresh = 4.0"`` ->
    ``"refresh=4"``; ``"refresh=1"``, the value the option alone means, -> ``"refresh"``).

    Raises:
        ValueError: as :func:`parse_options`.
    """
    option, value = _split_option(text)
    if value is None or value == _param_default(option.param):
        return option.name
    return f"{option.name}={format_number(value)}"


# ----------------------------------------------------------------------------- the record


def weight_fingerprint(weight: torch.Tensor) -> Fingerprint:
    """``(sum, sum of squares)`` of a weight in float64: tells a weight's states apart."""
    w = weight.detach().double()
    return float(w.sum()), float(w.pow(2).sum())


@dataclass
class EditedBatch:
    """One committed batch of a model's record.

    Attributes:
        requests: the batch's normalized requests (``R``).
        templates: the context templates its keys were averaged over.
        fact_token: the lookup-token rule of its keys.
        keys: ``{weight name: [R, d_in] float32}``, each request's key at that weight's
            solve (the earlier layers of the batch already written).
        before / after: weight fingerprints before and after the batch.
        states: ``{edit layer: [R, d] float32}`` the block-output states the requests
            reached once the batch was written (kept with ``sequential_refresh``).
    """

    requests: List[EditRequest]
    templates: List[List[str]]
    fact_token: str
    keys: Dict[str, torch.Tensor]
    before: Dict[str, Fingerprint]
    after: Dict[str, Fingerprint] = field(default_factory=dict)
    states: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _ModelRecord:
    batches: List[EditedBatch] = field(default_factory=list)
    origin: Dict[str, Fingerprint] = field(default_factory=dict)  # before the first recorded batch
    norm_reference: Dict[Tuple[int, str], float] = field(default_factory=dict)
    tracking: bool = False

    def clear(self) -> None:
        self.batches, self.origin, self.norm_reference = [], {}, {}


_RECORDS: "weakref.WeakKeyDictionary[Any, _ModelRecord]" = weakref.WeakKeyDictionary()


def track_sequential(model, on: bool = True) -> None:
    """Keep (``on``) or stop keeping the record of ``model``'s edits even when no option
    needs it (the key-drift diagnostics read it)."""
    _RECORDS.setdefault(model, _ModelRecord()).tracking = bool(on)


def reset_sequential_state(model=None) -> None:
    """Forget the record of ``model`` (of every model when None), tracking included."""
    if model is None:
        _RECORDS.clear()
    else:
        _RECORDS.pop(model, None)


def recorded_batches(model) -> int:
    """How many batches ``model``'s record holds as last committed (0: no record), without
    following the weights as :func:`edited_batches` does."""
    rec = _RECORDS.get(model)
    return 0 if rec is None else len(rec.batches)


def _fingerprints(model, names) -> Dict[str, Fingerprint]:
    return {name: weight_fingerprint(resolve_parameter(model, name)) for name in names}


def edited_batches(model) -> List[EditedBatch]:
    """The recorded batches whose edits ``model`` still carries, oldest first.

    Batches undone since (their weights back at their state before them) leave the
    record; weights back at their state before the first recorded batch empty it.
    Weights changed by something unrecorded keep the record as it is (as AlphaEdit's
    cache does).
    """
    rec = _RECORDS.get(model)
    if rec is None or not rec.batches:
        return []
    if _fingerprints(model, rec.origin) == rec.origin:
        rec.clear()
        return []
    keep = 0
    for k in range(len(rec.batches) - 1, -1, -1):
        batch = rec.batches[k]
        now = _fingerprints(model, batch.after)
        if now == batch.before and now != batch.after:
            continue  # undone
        if now != batch.after:
            log.debug("sequential record: the weights of batch %d changed since; keeping the record", k + 1)
        keep = k + 1
        break
    del rec.batches[keep:]
    if not rec.batches:
        rec.clear()
    return list(rec.batches)


@dataclass
class KeyProbes:
    """Key probes of several recorded batches in one list: each request in each context
    template of its batch, batch after batch (``groups``: ``(requests, templates)``)."""

    probes: List[Probe]
    groups: List[Tuple[int, List[List[str]]]]

    @classmethod
    def of(cls, tok, batches: Sequence[EditedBatch]) -> "KeyProbes":
        """The probes of ``batches`` in order (each request in each of its batch's context
        templates, at the batch's ``fact_token``; :func:`~easyedit_replay.reads.template_probes`),
        with one group ``(R, templates)`` per batch; :meth:`average` turns the
        ``[len(probes), d]`` reads into ``[sum R, d]`` keys."""
        probes, groups = [], []
        for b in batches:
            probes += template_probes(tok, b.requests, b.templates, b.fact_token)
            groups.append((len(b.requests), b.templates))
        return cls(probes, groups)

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """``[len(probes), d]`` reads -> ``[sum R, d]`` keys (mean over each batch's templates)."""
        out, start = [], 0
        for n, templates in self.groups:
            size = n * sum(len(g) for g in templates)
            out.append(average_over_templates(values[start:start + size], templates))
            start += size
        return torch.cat(out, 0)


def current_keys(model, tok, batch: EditedBatch) -> Dict[str, torch.Tensor]:
    """``{weight name: [R, d_in] float32}``: the keys of ``batch``'s requests on ``model`` as
    it is now, at every weight the batch recorded (one batched forward pass)."""
    probes = KeyProbes.of(tok, [batch])
    modules = {name: name[: -len(".weight")] for name in batch.keys}
    reads = read_at_lookup(model, tok, probes.probes, inputs=list(modules.values()))
    return {name: probes.average(reads["in:" + m]).float().cpu() for name, m in modules.items()}


def key_drift(model, tok) -> List[Dict[str, Dict[str, float]]]:
    """How far the keys of each recorded batch have moved since its edit.

    Returns:
        One dict per batch of :func:`edited_batches` (oldest first): ``{weight name:
        {"cosine": mean over requests of cos(k_then, k_now), "relative_change": mean
        |k_now - k_then| / |k_then|, "relative_change_max": its maximum}}``. With no
        edit since the batch, every cosine is 1 and every change 0 (float rounding).
    """
    out = []
    for batch in edited_batches(model):
        now = current_keys(model, tok, batch)
        stats = {}
        for name, then in batch.keys.items():
            then64, now64 = then.double(), now[name].double()
            change = (now64 - then64).norm(dim=-1) / then64.norm(dim=-1).clamp_min(1e-30)
            stats[name] = {"cosine": float(torch.nn.functional.cosine_similarity(then64, now64, dim=-1).mean()),
                           "relative_change": float(change.mean()), "relative_change_max": float(change.max())}
        out.append(stats)
    return out


# ----------------------------------------------------------------------------- one edit


def _trimmed_mean(values: torch.Tensor) -> float:
    """NAS's upper-trimmed mean: the mean without the ``floor(5%)`` largest values."""
    ordered = values.double().sort().values
    drop = int(math.floor(NAS_DROP_SHARE * ordered.numel()))
    return float(ordered[: ordered.numel() - drop].mean())


@dataclass
class SequentialContext:
    """What one :func:`~easyedit_replay.editor.compute_edit` takes from and gives to the
    model's record (:func:`prepare`); committed by :func:`commit` once the edit is applied.

    Attributes:
        keys_mode: ``hparams.sequential_keys``.
        norm_anchor: ``hparams.norm_anchor``.
        record: this batch joins the model's record once applied.
        reset: the record starts afresh with this batch (``reset_cache=True``).
        stock_keeps_old_keys: the rule's own solve already keeps the edit-time keys.
        batches: the earlier batches the model still carries.
        norm_reference: ``{(layer, target template): N}`` norm anchors in use.
        before: weight fingerprints before the edit (when recording).
        requests, templates, fact_token: this batch (set by :func:`prepare`).
        keys: this batch's ``{weight: [R, d_in]}`` keys (when recording).
        protected_keys: ``{weight: [m_old, d_in] float32}`` the earlier keys each solve
            protected.
        norms: the norm-anchor report ``{"layer/template": {...}}``.
    """

    keys_mode: str
    norm_anchor: bool
    record: bool
    reset: bool
    stock_keeps_old_keys: bool
    batches: List[EditedBatch]
    norm_reference: Dict[Tuple[int, str], float]
    before: Dict[str, Fingerprint]
    requests: List[EditRequest]
    templates: List[List[str]]
    fact_token: str
    keys: Dict[str, torch.Tensor] = field(default_factory=dict)
    protected_keys: Dict[str, torch.Tensor] = field(default_factory=dict)
    norms: Dict[str, Dict[str, float]] = field(default_factory=dict)
    refresh: bool = False
    states: Dict[int, torch.Tensor] = field(default_factory=dict)

    # -- hook 3: the earlier edits restored (``sequential_refresh``)
    def keep_states(self, states: Mapping[int, torch.Tensor]) -> None:
        """Record ``{edit layer: [R, d]}``, the block-output states this batch's requests
        reach once it is written (with ``refresh``)."""
        if self.record and self.refresh:
            self.states = {layer: h.detach().float().cpu() for layer, h in states.items()}

    def earlier_states(self, layers: Sequence[int]) -> Optional[Tuple[List[EditRequest], Dict[int, torch.Tensor]]]:
        """The earlier requests to restore and the states they reached right after their
        own batch: ``(requests, {layer: [R_old, d] float32})``, or None without
        ``refresh`` or earlier batches.

        Raises:
            HyperParamsError: an earlier batch has no state at one of ``layers`` (it was
                edited without ``sequential_refresh``, or at other layers).
        """
        if not self.refresh or not self.batches:
            return None
        out = {}
        for layer in layers:
            held = [b.states.get(layer) for b in self.batches]
            if any(h is None for h in held):
                raise HyperParamsError(f"sequential_refresh: an earlier batch of this model has no state at layer "
                                       f"{layer} (edited without sequential_refresh, or at other layers); edit the "
                                       f"sequence with sequential_refresh from its first batch, or pass "
                                       f"reset_cache=True")
            out[layer] = torch.cat(held, dim=0)
        return [r for b in self.batches for r in b.requests], out

    # -- hook 1: the targets
    def adjust_targets(self, model, tok, hparams, targets, sites) -> None:
        """Norm-anchored targets (``norm_anchor``; module docstring): rewrite
        ``targets.values`` in place. One forward pass over the bare prompts reads each
        target site's state ``h0`` and its rewritten module's output ``v0``.

        Args:
            targets: :class:`~easyedit_replay.targets.Targets`; ``values[(layer,
                template)]`` is ``[R, d]``.
            sites: the rule's :class:`~easyedit_replay.algorithms.base.Site` list.

        Source: NAS ``NAS/compute_z.py`` (``v_star = delta + v0``; rescaled to the mean
        norm, or ``v0`` when above twice it; ``target = (target_init - v0) + v_star``)
        and ``util/vstar_stats.py`` (the upper-trimmed mean).
        """
        if not self.norm_anchor:
            return
        rewrite_of = {s.target.template: s.rewrite_template for s in sites}
        names = {key: (key[1].format(key[0]), rewrite_of[key[1]].format(key[0])) for key in targets.values}
        reads = read_at_lookup(model, tok, bare_probes(tok, self.requests, self.fact_token),
                               outputs=list(dict.fromkeys(n for pair in names.values() for n in pair)))
        for key, target in list(targets.values.items()):
            h0 = reads["out:" + names[key][0]].float().to(target.device)
            v0 = reads["out:" + names[key][1]].float().to(target.device)
            value = v0 + (target.float() - h0)  # [R, d] what the rewritten module must output
            norm = value.norm(dim=-1)
            if key not in self.norm_reference:
                self.norm_reference[key] = _trimmed_mean(norm)
            anchor = self.norm_reference[key]
            kept = norm <= NAS_OUTLIER_FACTOR * anchor
            scaled = torch.where(kept[:, None], value * (anchor / norm.clamp_min(1e-30))[:, None], v0)
            targets.values[key] = (h0 - v0 + scaled).to(target.dtype)
            self.norms[f"{key[0]}/{key[1]}"] = {"norm_anchor": anchor, "value_norm_mean": float(norm.mean()),
                                                "value_norm_max": float(norm.max()),
                                                "not_edited": int((~kept).sum())}

    # -- hook 2: the protected keys
    def reread_probes(self, tok, weight_name: str) -> Optional[KeyProbes]:
        """The key probes of the earlier edits of ``weight_name`` to re-read with this
        site's keys (``rekeyed``), or None."""
        if self.keys_mode != "rekeyed":
            return None
        batches = [b for b in self.batches if weight_name in b.keys]
        return KeyProbes.of(tok, batches) if batches else None

    def protected(self, weight_name: str, reread: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[d_in, d_in]`` float64 ``G = K_old^T K_old`` the solve of ``weight_name``
        protects, or None for the rule's stock solve.

        Args:
            reread: ``[m_old, d_in]`` the earlier keys re-read now (``rekeyed``), else None.
        """
        if self.keys_mode == "stock" or (self.keys_mode == "edit_time" and self.stock_keeps_old_keys):
            return None
        if self.keys_mode == "rekeyed":
            old = reread
        else:
            stored = [b.keys[weight_name] for b in self.batches if weight_name in b.keys]
            old = torch.cat(stored, 0) if stored else None
        if old is None:
            return None
        self.protected_keys[weight_name] = old.float().cpu()
        old = old.double()
        return old.T @ old

    def keep_keys(self, weight_name: str, keys: torch.Tensor) -> None:
        """Record this batch's ``[R, d_in]`` keys of ``weight_name`` (when recording)."""
        if self.record:
            self.keys[weight_name] = keys.detach().float().cpu()


def prepare(model, hparams, rule, requests: List[EditRequest], templates, params: Mapping[str, torch.nn.Parameter],
            options: Optional[Mapping[str, Any]] = None) -> SequentialContext:
    """The :class:`SequentialContext` of one edit of ``model`` with ``hparams``.

    Args:
        rule: the :class:`~easyedit_replay.algorithms.base.Algorithm`.
        params: ``{weight name: parameter}`` the edit writes.
        options: the ``apply_*`` keyword arguments: ``sequential_edit=False`` keeps the
            batch out of the record, ``reset_cache=True`` starts the record afresh (as
            AlphaEdit's cache).
    """
    options = dict(options or {})
    rec = _RECORDS.get(model)
    reset = bool(options.get("reset_cache", False))
    record = options.get("sequential_edit", True) is not False and (
        hparams.sequential_keys != "stock" or hparams.norm_anchor or hparams.sequential_refresh
        or (rec is not None and rec.tracking))
    batches = [] if reset else edited_batches(model)
    reference = {} if reset or rec is None else dict(rec.norm_reference)
    before = _fingerprints(model, params) if record else {}
    return SequentialContext(hparams.sequential_keys, hparams.norm_anchor, record, reset, rule.keeps_edit_time_keys,
                             batches, reference, before, list(requests), templates, hparams.fact_token,
                             refresh=hparams.sequential_refresh)


def commit(model, ctx: Optional[SequentialContext]) -> None:
    """Add the applied edit of ``ctx`` to ``model``'s record (nothing unless recording)."""
    if ctx is None or not ctx.record:
        return
    rec = _RECORDS.setdefault(model, _ModelRecord())
    rec.batches = list(ctx.batches)  # batches undone before this edit stay out
    if not rec.batches:
        rec.clear()
    batch = EditedBatch(ctx.requests, ctx.templates, ctx.fact_token, dict(ctx.keys), dict(ctx.before),
                        _fingerprints(model, ctx.before), dict(ctx.states))
    for name, fp in batch.before.items():
        rec.origin.setdefault(name, fp)
    for key, value in ctx.norm_reference.items():
        rec.norm_reference.setdefault(key, value)
    rec.batches.append(batch)
