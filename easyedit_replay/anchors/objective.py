"""The anchor objective: what one anchor minimizes, as one value, and its terms.

EasyEdit's ``compute_z`` (MEMIT, EMMET, AlphaEdit) and, with two sites, ``compute_zs``
(PMET): a delta is added to a module's output at the lookup token of every rewriting
prompt (context template + prompt + target tokens but the last) and of the KL prompt
``"{subject} is a"``; the loss of one request is

    nll_factor * mean_templates NLL(target_new | prompt)          (read at v_loss_layer
                                                                   through ln_f / lm_head)
    + kl_factor * KL(current || initial) on the KL prompt's next token
    + v_weight_decay * sum_sites |delta| / |h|^2

:class:`Objective` holds everything this loss and its optimizer depend on (the anchor
layer, the sites, the context templates, the hyperparameters, PMET's options); it is
also what the anchor cache keys (:mod:`easyedit_replay.anchors.store`). Here also:
the prompts as token rows (:class:`Row`), the read-out through ``ln_f`` and the
unembedding (:class:`Readout`), and one step's losses (:class:`Problem`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..batching import input_device, pad_id_of, pad_right, token_ids
from ..errors import RequestError
from ..model_info import max_positions
from ..prompts import EditRequest, escape_braces, flat_templates, lookup_index
from ..tracing import Trace, add_at_positions, resolve_module, run

EARLY_STOP_LOSS = 5e-2
# The hyperparameters the objective reads, by their EasyEdit names (compute_z's).
OBJECTIVE_FIELDS = ("v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                    "fact_token", "layer_module_tmp", "ln_f_module", "lm_head_module")


@dataclass(frozen=True)
class Objective:
    """The anchor objective of one layer: ``compute_z``'s inputs besides the model and the
    requests. Built by the algorithm (:meth:`~easyedit_replay.algorithms.base.Algorithm.anchor_objective`,
    which sets PMET's ``nll_factor`` and ``adaptive_nll``) or by :meth:`of`.

    Attributes:
        layer: the anchor layer (the last edit layer for spreading, the first for replay).
        sites: ``S`` formatted module names whose outputs receive the deltas, e.g.
            ``("model.layers.4",)`` (MEMIT) or the attention and MLP outputs (PMET).
        templates: context templates (``(("{}",), (...))``).
        v_num_grad_steps ... lm_head_module: the hyperparameters of
            :data:`OBJECTIVE_FIELDS`, as the YAML gives them.
        nll_factor: weight of the NLL term (PMET's ``nll_loss_factor``).
        adaptive_nll: PMET's rule: once the target is the argmax everywhere, the NLL
            weight drops to ``0.1 * nll_factor`` and a weighted KL term
            (``kl_factor * KL``) <= 0.01 stops the request (``pmet/compute_zs.py``).
        early_stop: a request stops once its loss is below this.
    """

    layer: int
    sites: Tuple[str, ...]
    templates: Tuple[Tuple[str, ...], ...]
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    fact_token: str
    layer_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    nll_factor: float = 1.0
    adaptive_nll: bool = False
    early_stop: float = EARLY_STOP_LOSS

    @classmethod
    def of(cls, hparams, layer: int, site_templates: Sequence[str], templates: Sequence[Sequence[str]],
           nll_factor: float = 1.0, adaptive_nll: bool = False) -> "Objective":
        """The objective at ``layer`` with the sites ``site_templates`` (module templates,
        e.g. ``[hparams.layer_module_tmp]``) formatted for it, the context ``templates``
        and the :data:`OBJECTIVE_FIELDS` of ``hparams`` (read as they are).

        Raises:
            AttributeError: ``hparams`` lacks one of :data:`OBJECTIVE_FIELDS`.
        """
        return cls(layer=int(layer), sites=tuple(t.format(layer) for t in site_templates),
                   templates=tuple(tuple(g) for g in templates), nll_factor=float(nll_factor),
                   adaptive_nll=bool(adaptive_nll), **{f: getattr(hparams, f) for f in OBJECTIVE_FIELDS})

    @property
    def loss_layer(self) -> int:
        """The layer whose output the NLL reads: ``max(v_loss_layer, layer)``."""
        return max(int(self.v_loss_layer), int(self.layer))

    @property
    def loss_name(self) -> str:
        """The loss layer's module name (``layer_module_tmp`` formatted)."""
        return self.layer_module_tmp.format(self.loss_layer)


def target_token_ids(tok, target: str) -> List[int]:
    """Token ids of ``target_new`` as ``compute_z`` builds them (no special tokens, a
    leading BOS/UNK dropped)."""
    ids = list(tok.encode(target, add_special_tokens=False))
    if ids and ids[0] in (tok.bos_token_id, tok.unk_token_id):
        ids = ids[1:]
    return ids


@dataclass
class Row:
    """One prompt of the objective as tokens: a rewriting prompt (one per context template)
    or the KL prompt of request ``request``; ``lookup`` is where the deltas are added,
    ``first`` marks the first context template (its state is the request's ``init``)."""

    request: int
    ids: List[int]
    lookup: int
    kl: bool
    first: bool
    target: List[int]


def build_rows(tok, requests: Sequence[EditRequest], templates, fact_token: str, max_pos: Optional[int]) -> List[Row]:
    """The rows of ``R`` requests, request-major: each request's rewriting prompts (context
    template + prompt + target tokens but the last), then its KL prompt ``"{subject} is a"``.

    Raises:
        RequestError: a target that tokenizes to nothing, a prompt too short for its
            target, or a row longer than the model's context ``max_pos``.

    Source: EasyEdit ``memit/compute_z.py`` (``rewriting_prompts``, ``kl_prompts``,
    ``lookup_idxs``).
    """
    rows: List[Row] = []
    for r, req in enumerate(requests):
        target = target_token_ids(tok, req.target_new)
        if not target:
            raise RequestError(f"requests[{r}].target_new = {req.target_new!r} tokenizes to no tokens; give a non-empty target")
        suffix = escape_braces(tok.decode(target[:-1]))
        for t, ctx in enumerate(flat_templates(templates)):
            prompt_t = ctx.format(req.prompt)
            full_t = prompt_t + suffix
            ids = token_ids(tok, full_t.format(req.subject))
            look = lookup_index(tok, full_t, req.subject, fact_token, prompt_end=prompt_t)
            if len(ids) < len(target) or not 0 <= look < len(ids):
                raise RequestError(f"requests[{r}]: prompt {req.text!r} is too short for target {req.target_new!r}")
            rows.append(Row(r, ids, look, False, t == 0, target))
        kl_t = "{} is a"
        ids = token_ids(tok, kl_t.format(req.subject))
        rows.append(Row(r, ids, lookup_index(tok, kl_t, req.subject, fact_token), True, False, target))
        longest = max(len(row.ids) for row in rows if row.request == r)
        if max_pos is not None and longest > max_pos:
            raise RequestError(
                f"requests[{r}]: a rewriting prompt has {longest} tokens, more than the model's "
                f"context of {max_pos}; shorten the prompt or the context templates"
            )
    return rows


def rows_by_request(tok, requests: Sequence[EditRequest], objective: Objective,
                    max_pos: Optional[int]) -> List[List[Row]]:
    """``R`` lists of :func:`build_rows`' rows, one per request (its rewriting prompts and its
    KL prompt). Raises as :func:`build_rows`."""
    rows = build_rows(tok, requests, objective.templates, objective.fact_token, max_pos)
    return [[row for row in rows if row.request == r] for r in range(len(requests))]


def renumbered(rows_of: Sequence[Sequence[Row]], requests: Sequence[int]) -> List[Row]:
    """The rows of ``requests`` (indices into ``rows_of``), renumbered ``0..len(requests)-1``
    in that order (a chunk's rows)."""
    return [replace(row, request=j) for j, r in enumerate(requests) for row in rows_of[r]]


class Readout:
    """``ln_f_module`` and ``lm_head_module``: :meth:`logits` ``[..., d] -> [..., V]`` float32,
    as ``compute_z`` reads the output distribution from a hidden state."""

    def __init__(self, ln_f, head):
        self.ln_f, self.weight, self.bias = ln_f, head.weight, getattr(head, "bias", None)

    @classmethod
    def of(cls, model, ln_f_module: str, lm_head_module: str) -> "Readout":
        """The read-out of ``model``. Raises HyperParamsError for a name that is no module."""
        return cls(resolve_module(model, ln_f_module, "ln_f_module"),
                   resolve_module(model, lm_head_module, "lm_head_module"))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Computed where the modules live: ``h`` moves to ``ln_f``'s device and the normed
        state to the unembedding's, never the other way (the unembedding of a 128k-vocabulary
        model is the largest matrix); float32 logits for half-precision models too
        (:mod:`easyedit_replay.precision`)."""
        norm_param = next(self.ln_f.parameters(), None)
        if norm_param is not None and norm_param.device.type != "meta":
            h = h.to(norm_param.device)
        out = self.ln_f(h).to(self.weight.device).float() @ self.weight.float().T
        return out if self.bias is None else out + self.bias.float()


@dataclass
class Batch:
    """The rows of one step's still-active requests, ``B`` of them, padded right.

    Attributes:
        rows: the ``B`` rows; ``live``: their indices in the chunk's rows (the
            :class:`~easyedit_replay.anchors.forward.LayerLoop` capture key).
        ids, mask: ``[B, T]`` token ids and attention mask on the input device.
        row_req, looks: ``[B]`` long (CPU): each row's request and lookup position.
    """

    rows: List[Row]
    live: Tuple[int, ...]
    ids: torch.Tensor
    mask: torch.Tensor
    row_req: torch.Tensor
    looks: torch.Tensor

    @classmethod
    def of(cls, rows: List[Row], active: torch.Tensor, pad: int, device) -> "Batch":
        """The rows of the requests with ``active[request]`` (``active [R]`` bool)."""
        live = tuple(i for i, row in enumerate(rows) if active[row.request])
        batch = [rows[i] for i in live]
        ids, mask = pad_right([row.ids for row in batch], pad, device)
        return cls(batch, live, ids, mask, torch.tensor([row.request for row in batch]),
                   torch.tensor([row.lookup for row in batch]))

    @property
    def first(self) -> List[int]:
        """Rows of each request's first context template (they record ``init``)."""
        return [i for i, row in enumerate(self.rows) if row.first]

    @property
    def kl_idx(self) -> List[int]:
        """Rows of the KL prompts (``K`` of them, one per active request)."""
        return [i for i, row in enumerate(self.rows) if row.kl]

    def requests_of(self, idx: List[int]) -> List[int]:
        """The request of each row in ``idx``."""
        return [self.rows[i].request for i in idx]

    def lookups_of(self, idx: List[int]) -> List[int]:
        """The lookup position of each row in ``idx``."""
        return [self.rows[i].lookup for i in idx]


@dataclass
class TargetNLL:
    """The NLL of the target tokens over one step's rewriting rows (``P`` target positions,
    ``n_rows`` rewriting rows, ``n_req`` requests)."""

    logp: torch.Tensor      # [P, V] log-probabilities at every target position
    owner: torch.Tensor     # [P] index of the rewriting row of each position
    lengths: torch.Tensor   # [n_rows] target length per rewriting row
    nll_row: torch.Tensor   # [n_rows] per-token NLL per rewriting row
    rew_req: torch.Tensor   # [n_rows] request of each rewriting row
    counts: torch.Tensor    # [n_req] rewriting rows per request
    nll_req: torch.Tensor   # [n_req] mean NLL over each request's rewriting rows


def target_nll_terms(batch: List[Row], h_loss: torch.Tensor, readout: Readout, n_req: int) -> TargetNLL:
    """NLL of the target tokens of the rewriting rows of ``batch``, read from ``h_loss`` (the
    loss layer's output, ``[B, T, d]``) through ``ln_f`` and the unembedding, as
    ``compute_z`` does (per-token mean per row, mean over each request's rows)."""
    rew = [i for i, row in enumerate(batch) if not row.kl]
    lab_rows, lab_pos, lab_tok, lab_owner = [], [], [], []
    for j, i in enumerate(rew):
        row = batch[i]
        n = len(row.target)
        start = len(row.ids) - n
        lab_rows += [i] * n
        lab_pos += list(range(start, start + n))
        lab_tok += row.target
        lab_owner += [j] * n
    dev = h_loss.device
    sel = h_loss[torch.tensor(lab_rows, device=dev), torch.tensor(lab_pos, device=dev)]
    logp = torch.log_softmax(readout.logits(sel).float(), dim=-1)
    tok_t = torch.tensor(lab_tok, device=logp.device)
    owner = torch.tensor(lab_owner, device=logp.device)
    tok_logp = logp.gather(1, tok_t[:, None])[:, 0]
    lengths = torch.tensor([len(batch[i].target) for i in rew], device=logp.device, dtype=logp.dtype)
    nll_row = -torch.zeros(len(rew), device=logp.device, dtype=logp.dtype).index_add(0, owner, tok_logp) / lengths
    rew_req = torch.tensor([batch[i].request for i in rew], device=logp.device)
    counts = torch.zeros(n_req, device=logp.device).index_add(0, rew_req, torch.ones_like(nll_row))
    nll_req = torch.zeros(n_req, device=logp.device).index_add(0, rew_req, nll_row) / counts.clamp(min=1)
    return TargetNLL(logp, owner, lengths, nll_row, rew_req, counts, nll_req)


@dataclass
class StepLoss:
    """One step's losses: ``loss [R]`` (with gradient; 0 for finished requests), the target
    NLL terms, and ``kl [R]`` the unweighted KL per request."""

    loss: torch.Tensor
    nll: TargetNLL
    kl: torch.Tensor


class Problem:
    """The anchor problem of one chunk of ``R`` requests: its rows (per request, one per context
    template and one KL prompt, with lookup positions and target tokens) and the states the
    first forward pass records: ``init`` (``S`` x ``[R, d]``, model dtype: each site's output
    at the lookup token of the request's first context template) and ``kl_init`` (``[R, V]``
    float32: the KL prompt's next-token log-probabilities before editing)."""

    def __init__(self, objective: Objective, readout: Readout, rows: List[Row], n_req: int, pad: int, device):
        self.objective, self.readout, self.rows, self.n_req = objective, readout, rows, n_req
        self.pad, self.device = pad, device
        self.init: List[Optional[torch.Tensor]] = [None] * len(objective.sites)
        self.kl_init: Optional[torch.Tensor] = None

    def batch(self, active: torch.Tensor) -> Batch:
        """The rows of the requests with ``active [R]``."""
        return Batch.of(self.rows, active, self.pad, self.device)

    def edits(self, batch: Batch, delta: torch.Tensor) -> Dict[str, Callable]:
        """``{site: fn}`` adding ``delta [S, R, d]`` at each row's lookup token."""
        return {site: partial(self._edit, s, batch, delta) for s, site in enumerate(self.objective.sites)}

    def _edit(self, s: int, batch: Batch, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.init[s] is None:
            first = batch.first
            rec = torch.empty((self.n_req, h.shape[-1]), dtype=h.dtype, device=h.device)
            rec[batch.requests_of(first)] = h[first, batch.looks[first].to(h.device)].detach()
            self.init[s] = rec
        rows = torch.arange(len(batch.rows))
        return add_at_positions(h, rows, batch.looks, delta[s][batch.row_req.to(delta.device)])

    def losses(self, batch: Batch, kl_logits, h_loss, delta: torch.Tensor, factor: torch.Tensor) -> StepLoss:
        """``compute_z``'s loss per request from a forward pass's ``kl_logits [K, V]`` and
        ``h_loss [B, T, d]``: ``factor [R] * NLL + kl_factor * KL + v_weight_decay * sum_s
        |delta_s| / |init_s|^2``."""
        obj = self.objective
        kl_req = batch.requests_of(batch.kl_idx)
        kl_logp = torch.log_softmax(kl_logits.float(), dim=-1)
        if self.kl_init is None:
            self.kl_init = torch.empty((self.n_req, kl_logp.shape[-1]), dtype=kl_logp.dtype, device=kl_logp.device)
            self.kl_init[kl_req] = kl_logp.detach()
        nll = target_nll_terms(batch.rows, h_loss, self.readout, self.n_req)
        dev = nll.logp.device
        kl_val = (kl_logp.exp() * (kl_logp - self.kl_init[kl_req])).sum(-1)
        kl = torch.zeros(self.n_req, device=dev).index_add(0, torch.tensor(kl_req, device=dev), kl_val)
        wd = torch.zeros(self.n_req, device=dev)
        for s, init in enumerate(self.init):
            wd = wd + (delta[s].norm(dim=-1) / init.float().norm(dim=-1).to(delta.device) ** 2).to(dev)
        wd = obj.v_weight_decay * wd
        return StepLoss(factor.to(dev) * nll.nll_req + obj.kl_factor * kl + wd, nll, kl)


def pmet_signals(step: StepLoss, kl_factor: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """PMET's adaptive rule (``pmet/compute_zs.py``), ``[R]`` bool on the CPU each: ``argmax``
    (mean over rewriting prompts of the target's probability equals that of the argmax token,
    per-token means of log-probabilities) and ``kl_small`` (``kl_factor * KL <= 0.01``)."""
    nll = step.nll
    n_req, dev = len(nll.counts), nll.logp.device
    max_logp = nll.logp.detach().max(-1).values
    max_row = torch.zeros(len(nll.nll_row), device=dev).index_add(0, nll.owner, max_logp) / nll.lengths
    maxprob = torch.zeros(n_req, device=dev).index_add(0, nll.rew_req, max_row.exp())
    prob = torch.zeros(n_req, device=dev).index_add(0, nll.rew_req, (-nll.nll_row.detach()).exp())
    maxprob, prob = (maxprob / nll.counts.clamp(min=1)).cpu(), (prob / nll.counts.clamp(min=1)).cpu()
    kl_small = (kl_factor * step.kl.detach()).cpu() <= 0.01  # compute_zs: kl_loss (weighted) <= 0.01
    return maxprob == prob, kl_small


def target_nll(model, tok, requests: Sequence[EditRequest], hparams, templates: List[List[str]]) -> torch.Tensor:
    """``[R]`` the anchor objective's NLL term for the model as it is (no delta):
    per-token NLL of ``target_new`` over the rewriting prompts (context templates),
    read at ``v_loss_layer`` through ``ln_f_module``/``lm_head_module``.

    Compare with :attr:`~easyedit_replay.anchors.loop.AnchorResult.nll` to see how much of
    the optimized effect a weight update realizes.

    Raises:
        RequestError: as :func:`build_rows`.
        HyperParamsError: ``ln_f_module`` or ``lm_head_module`` names no module.
    """
    rows = build_rows(tok, requests, templates, hparams.fact_token, max_positions(model))
    rows = [row for row in rows if not row.kl]
    loss_name = hparams.layer_module_tmp.format(int(hparams.v_loss_layer))
    readout = Readout.of(model, hparams.ln_f_module, hparams.lm_head_module)
    ids, mask = pad_right([row.ids for row in rows], pad_id_of(tok), input_device(model))
    with torch.no_grad():
        trace = Trace(model, outputs=[loss_name], stop_when_done=True)
        run(model, trace, input_ids=ids, attention_mask=mask)
        nll = target_nll_terms(rows, trace.outputs[loss_name], readout, len(requests))
    return nll.nll_req.cpu()
