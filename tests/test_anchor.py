"""Batched anchor optimization equals optimizing each request alone."""

from __future__ import annotations

import torch

from easyedit_replay.anchors import Objective, optimize_anchors
from easyedit_replay.prompts import prepare_requests

from .test_core import with_fields


def test_batched_anchors_equal_per_request(model_tok, hparams, templates, demo_records):
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=12)
    reqs = prepare_requests(demo_records[:4])
    layer = hp.layers[0]
    objective = Objective.of(hp, layer, [hp.layer_module_tmp], templates)
    # cache=False: both must be optimized (the cache key leaves the chunk size out)
    batched = optimize_anchors(model, tok, reqs, objective, chunk_size=4, cache=False)
    alone = optimize_anchors(model, tok, reqs, objective, chunk_size=1, cache=False)
    steps = batched.steps.tolist()
    print("steps", steps, "nll", batched.nll.tolist())
    assert steps == alone.steps.tolist()
    assert min(steps) < hp.v_num_grad_steps  # at least one request stopped early ...
    assert max(steps) == hp.v_num_grad_steps  # ... while another ran to the end
    gap = (batched.delta - alone.delta).abs()
    diff, mean_diff = float(gap.max()), float(gap.mean())
    scale = float(alone.delta.abs().max())
    print(f"|delta batched - delta alone|: max {diff:.3e}, mean {mean_diff:.3e} (max |delta| {scale:.2f})")
    # Measured on SmolLM2 (2-core CPU): max 5.8e-3 = 1.1e-3 * max|delta|; the batched forward
    # pass rounds differently and Adam's normalized steps carry that into later steps.
    assert diff < 1e-2 * scale
    assert mean_diff < 1e-3 * scale
    assert torch.allclose(batched.init, alone.init, rtol=1e-5, atol=1e-4)
    assert torch.allclose(batched.nll, alone.nll, rtol=1e-3, atol=1e-4)


def test_chunks_hold_requests_of_similar_length(model_tok, hparams, templates, monkeypatch):
    """Requests go into chunks ordered by their longest prompt row (less padding), and each
    request still gets its own anchor back in request order."""
    from easyedit_replay.anchors import loop

    model, tok = model_tok
    short = {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"}
    long = {"prompt": "The old stone bridge over the river in the middle of Paris is in", "subject": "Paris",
            "target_new": "Spain"}
    reqs = prepare_requests([long, short, long, short])
    chunks = []

    def fake_chunk(spec, rows, n_req, progress, layer_loop):
        chunks.append(sorted({len(row.ids) for row in rows if not row.kl}))
        # each request's anchor is its longest row length, so the order of the result is visible
        lengths = [max(len(row.ids) for row in rows if row.request == j) for j in range(n_req)]
        delta = torch.tensor(lengths, dtype=torch.float32)[None, :, None].expand(1, n_req, 4).contiguous()
        return delta.clone(), delta, torch.zeros(n_req), torch.ones(n_req, dtype=torch.long), None

    monkeypatch.setattr(loop, "optimize_chunk", fake_chunk)
    monkeypatch.setattr(loop, "hidden_size", lambda model: 4)
    objective = Objective.of(hparams, hparams.layers[0], [hparams.layer_module_tmp], templates)
    res = optimize_anchors(model, tok, reqs, objective, chunk_size=2, cache=False, fast_loop=False)
    assert len(chunks) == 2 and max(chunks[0]) < min(chunks[1])  # the two short requests first
    got = res.delta[0, :, 0].tolist()
    assert got[0] == got[2] > got[1] == got[3]  # back in request order
