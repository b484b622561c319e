"""The ``replay_joint`` construction (issue 16, item 3): the edit shared across layers by
one solve through the Jacobians of the layers between the edits.

``replay_capacity`` (:class:`~easyedit_replay.targets.shares.Capacity`) shares the replayed residual under
the paper's additive assumption: a change delivered at layer ``l_j`` arrives unchanged
at ``l_n``. Here the change travels through the network instead. With

- ``r = z^{l_n} - h^{l_n}`` the replayed final-layer residual of a request (``[d]``;
  ``z^{l_n}`` from replay's ``l_1`` anchor, ``h^{l_n}`` the unedited state),
- ``J_j = d h^{l_n} / d h^{l_j}`` the Jacobian of the residual stream at the lookup
  token from the output of block ``l_j`` to the output of block ``l_n`` on the unedited
  model (``J_n = I``; only the layers ``l_1..l_n`` are differentiated),
- ``q_j`` the update rule's capacity at ``l_j`` for the request's key
  (``Algorithm.capacity``: one key's solve realizes ``q/(1+q)`` of a requested change
  at a regularizer cost ``|d|^2 / q`` for a delivered change ``d``),

the joint objective ``sum_j |d_j|^2 / q_j + |sum_j J_j d_j - r|^2`` (the capacity rule's
objective with the Jacobians in place of the identity) is minimized by

    d_j = q_j J_j^T mu,     (I + sum_j q_j J_j J_j^T) mu = r.

``mu`` is found per request by conjugate gradients on that symmetric positive definite
system (matrix-free: ``J^T v`` by a backward pass, ``J u`` by the double-backward
trick), preconditioned with ``1 / (1 + sum_j q_j)`` and started from the additive
solution ``r / (1 + Q)`` (with every ``J_j = I`` it is exact at once: the capacity rule).

The plan becomes per-layer targets: ``t_j`` is the state at the output of block ``l_j``
when ``d_1..d_j`` are added at the lookup tokens of blocks ``l_1..l_j`` (one no-grad
forward pass, not linearized). Layer ``l_j`` (``j < n``) takes ``(1 + q_j) / q_j`` of
its local residual ``t_j - h^{l_j}_cur`` (what its solve must be asked for to realize
it); the last layer takes its full residual to ``z^{l_n}``, as every construction does.
With one edit layer it is replay (and onelayer) on that layer.

Cost: per chunk of requests one forward pass through blocks ``0..l_n`` kept for the
backward, then per conjugate-gradient iteration one backward and one double-backward
pass through ``l_1..l_n``; ``JointPlan.seconds`` and ``.iterations`` report it
(docs/method.md, "Sharing the replayed residual"; measured costs in docs/results.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from ..batching import input_device, pad_id_of, pad_right, token_ids
from ..errors import HyperParamsError
from ..prompts import EditRequest
from ..reads import bare_probes
from ..tracing import Trace, add_at_positions, run


@dataclass
class JointPlan:
    """The joint solve's result for ``R`` requests.

    Attributes:
        deltas: ``{l_j: [R, d]}`` float32 planned change ``d_j`` at the output of block
            ``l_j``, for every edit layer but the last.
        trajectory: ``{l_j: [R, d]}`` the planned state ``t_j`` at the output of block
            ``l_j`` (model dtype), the targets of layers ``l_1..l_{n-1}``.
        iterations: the most conjugate-gradient iterations any chunk ran.
        relative_residual: the largest relative residual ``|M mu - r| / |r|`` over
            requests at the end, as conjugate gradients' running estimate (not
            recomputed; NaN if the solve broke down: ``Joint.prepare`` refuses it).
        seconds: wall time of the whole plan (solve + trajectory pass).
    """

    deltas: Dict[int, torch.Tensor] = field(default_factory=dict)
    trajectory: Dict[int, torch.Tensor] = field(default_factory=dict)
    iterations: int = 0
    relative_residual: float = 0.0
    seconds: float = 0.0

    def info(self) -> dict:
        """The plan's cost as plain numbers: ``{"iterations", "relative_residual",
        "seconds"}`` (stored in :attr:`Targets.info` with a ``joint_`` prefix)."""
        return {"iterations": self.iterations, "relative_residual": self.relative_residual,
                "seconds": self.seconds}


def _math_attention():
    """Double backward through attention needs the math SDPA kernel (the fused CPU kernels
    have no second derivative)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def conjugate_gradients(apply, b: torch.Tensor, precond: torch.Tensor, x0: torch.Tensor, tol: float,
                        max_iter: int):
    """Preconditioned conjugate gradients for ``R`` independent SPD systems at once.

    Args:
        apply: ``[R, d] -> [R, d]``, the rows' matrices times the rows of its argument.
        b: ``[R, d]`` right-hand sides; ``x0``: ``[R, d]`` start.
        precond: ``[R]`` scalar preconditioner per row (an approximate inverse).
        tol: stop when every row's ``|b - A x| / |b|`` is below it.

    Returns:
        ``(x [R, d], iterations, relative residual [R])``. A row that has converged
        stops moving.
    """
    x = x0.clone()
    res = b - apply(x)
    scale = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    z = res * precond[:, None]
    p = z.clone()
    rz = (res * z).sum(-1)
    it = 0
    rel = res.norm(dim=-1) / scale
    while it < max_iter and bool((rel >= tol).any()):
        active = (rel >= tol).to(b.dtype)
        ap = apply(p)
        alpha = active * rz / (p * ap).sum(-1).clamp_min(torch.finfo(b.dtype).tiny)
        x = x + alpha[:, None] * p
        res = res - alpha[:, None] * ap
        z = res * precond[:, None]
        rz_new = (res * z).sum(-1)
        p = z + (rz_new / rz.clamp_min(torch.finfo(b.dtype).tiny))[:, None] * p
        rz = rz_new
        it += 1
        rel = res.norm(dim=-1) / scale
    return x, it, rel


def joint_plan(model, tok, requests: Sequence[EditRequest], hparams, z_last: torch.Tensor,
               capacity: Dict[int, torch.Tensor], layers: Sequence[int], template: str,
               chunk_size: int = 32, tol: float = 1e-4, max_iter: int = 100) -> JointPlan:
    """The joint plan of the module docstring.

    Args:
        requests: ``R`` prepared requests (their bare prompts are read).
        z_last: ``[R, d]`` the replayed target ``z^{l_n}`` at the output of block ``l_n``.
        capacity: ``{layer: [R]}`` the rule's capacity ``q`` at every edit layer
            (finite, >= 0).
        layers: the edit layers ``l_1 < ... < l_n`` (at least two).
        template: the block output template (``layer_module_tmp``); the targets live there.
        chunk_size: requests per forward pass (memory grows with it).
        tol / max_iter: conjugate-gradient stopping rule (relative residual per request).

    Returns:
        :class:`JointPlan`.

    Raises:
        ValueError: fewer than two layers or a missing layer in ``capacity``.
        HyperParamsError (a ValueError): a capacity that is not finite (EMMET with
            ``emmet_lambda = 0``).

    Source: our derivation (module docstring); the capacity ``q`` is
    ``Algorithm.capacity``; the joint objective is ``replay_capacity``'s with the
    Jacobians of the layers between the edits.
    """
    layers = list(layers)
    if len(layers) < 2:
        raise ValueError("joint_plan needs at least two edit layers")
    for layer in layers:
        if layer not in capacity:
            raise ValueError(f"joint_plan: no capacity for layer {layer}")
        if not bool(torch.isfinite(capacity[layer]).all()):
            raise HyperParamsError(f"alg_name {hparams.alg_name}: replay_joint needs a finite capacity at every "
                                   f"edit layer; layer {layer} has an infinite one (EMMET with emmet_lambda = 0 "
                                   f"delivers exactly): set emmet_lambda > 0 or use replay_capacity")
    from ..anchors import frozen_parameters

    started = time.perf_counter()
    earlier, last = layers[:-1], layers[-1]
    names = {l: template.format(l) for l in layers}
    probes = bare_probes(tok, requests, hparams.fact_token)
    seqs = [token_ids(tok, p.text)[: p.index + 1] for p in probes]  # causal: nothing after the lookup matters
    pad, dev = pad_id_of(tok), input_device(model)
    plan = JointPlan(deltas={l: [] for l in earlier})
    worst = []
    for start in range(0, len(requests), chunk_size):
        idx = list(range(start, min(start + chunk_size, len(requests))))
        ids, mask = pad_right([seqs[i] for i in idx], pad, dev)
        rows, cols = torch.arange(len(idx)), torch.tensor([probes[i].index for i in idx])
        q = {l: capacity[l][idx].to(device=dev, dtype=torch.float32) for l in layers}
        with frozen_parameters(model), torch.enable_grad(), _math_attention():
            width = model.config.hidden_size
            deltas = [torch.zeros(len(idx), width, device=dev, requires_grad=True) for _ in earlier]
            edits = {names[l]: (lambda h, x=x: add_at_positions(h, rows, cols, x)) for l, x in zip(earlier, deltas)}
            trace = Trace(model, outputs=[names[last]], edits=edits, detach=False, stop_when_done=True)
            run(model, trace, input_ids=ids, attention_mask=mask)
            final = trace.outputs[names[last]][rows.to(dev), cols.to(dev)].float()  # [r, d]
            probe = torch.zeros_like(final, requires_grad=True)
            pulled = torch.autograd.grad(final, deltas, grad_outputs=probe, create_graph=True)  # J_j^T probe

            def transpose(v):  # [r, d] -> [J_j^T v for j < n]
                return torch.autograd.grad(final, deltas, grad_outputs=v, retain_graph=True)

            def forward(us):  # [u_j] -> sum_j J_j u_j
                return torch.autograd.grad(pulled, probe, grad_outputs=list(us), retain_graph=True)[0]

            def apply(v):  # (I + sum_j q_j J_j J_j^T) v, with J_n = I
                pulled_v = transpose(v)
                return (1 + q[last])[:, None] * v + forward([q[l][:, None] * g for l, g in zip(earlier, pulled_v)])

            residual = z_last[idx].to(device=dev, dtype=torch.float32) - final.detach()
            total = sum(q.values())
            mu, iterations, rel = conjugate_gradients(apply, residual, 1 / (1 + total), residual / (1 + total)[:, None],
                                                      tol, max_iter)
            for l, g in zip(earlier, transpose(mu)):
                plan.deltas[l].append((q[l][:, None] * g).detach())
        plan.iterations = max(plan.iterations, iterations)
        worst.append(float(rel.max()))
    plan.deltas = {l: torch.cat(v, 0) for l, v in plan.deltas.items()}
    plan.relative_residual = float("nan") if any(w != w for w in worst) else max(worst)
    plan.trajectory = planned_trajectory(model, tok, probes, plan.deltas, names)
    plan.seconds = time.perf_counter() - started
    return plan


def planned_trajectory(model, tok, probes, deltas: Dict[int, torch.Tensor], names: Dict[int, str]
                       ) -> Dict[int, torch.Tensor]:
    """``{l_j: [R, d]}`` the state at the output of block ``l_j`` with every ``d_i``
    (``i <= j``) added at the lookup token of block ``l_i``: one no-grad forward pass."""
    from ..reads import read_at_lookup

    outputs = [names[l] for l in deltas]
    reads = read_at_lookup(model, tok, probes, outputs=outputs, add={names[l]: d for l, d in deltas.items()})
    return {l: reads["out:" + names[l]] for l in deltas}


__all__: List[str] = ["JointPlan", "conjugate_gradients", "joint_plan", "planned_trajectory"]
