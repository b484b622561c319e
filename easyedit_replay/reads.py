"""Batched reads at lookup tokens, and keys averaged over context templates.

A :class:`Probe` is a text and the position of its lookup token
(:func:`~easyedit_replay.prompts.lookup_index`); :func:`read_at_lookup` reads module
outputs and inputs there in batched no-grad passes (optionally adding values at the
lookup token first: forward replay). :func:`template_probes` (every request in every
context template) and :func:`average_over_templates` give EasyEdit's keys
(``memit.compute_ks``); :func:`bare_probes` read at the bare prompts, where current
hidden states and targets are measured. Sequences are padded on the RIGHT whatever the
tokenizer's ``padding_side`` says, and lookup indices are positions in the unpadded
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .batching import input_device, pad_id_of, pad_right, token_ids
from .errors import RequestError
from .prompts import EditRequest, flat_templates, lookup_index
from .tracing import Trace, add_at_positions, run


@dataclass(frozen=True)
class Probe:
    """A text and the position (in its unpadded token sequence) to read at."""

    text: str
    index: int


def read_at_lookup(
    model,
    tok,
    probes: Sequence[Probe],
    outputs: Iterable[str] = (),
    inputs: Iterable[str] = (),
    add: Optional[Dict[str, torch.Tensor]] = None,
    batch_size: int = 64,
    compact: bool = True,
) -> Dict[str, torch.Tensor]:
    """Read module outputs/inputs at each probe's lookup token, in batched no-grad passes.

    Args:
        probes: ``N`` texts with lookup positions.
        outputs / inputs: module names to read (output hidden state / input).
        add: ``{module_name: values [N, d]}`` added to that module's output at each
            probe's lookup token before anything downstream runs (forward replay).
        batch_size: sequences per forward pass.
        compact: run each sequence only up to its lookup token (a causal model's
            state there does not depend on later tokens) and batch them longest
            first (little padding); float rounding only. False: whole sequences in
            the given order (``benchmarks/bench_reads.py`` compares the two).

    Returns:
        ``{"out:" + name: [N, d], "in:" + name: [N, d_in]}`` in the model's dtype, on
        the device where the module ran. The forward pass stops after the last
        module read. Identical probes are run once when ``add`` is None.

    Raises:
        RequestError: a lookup index lies outside its sequence.
    """
    outputs, inputs = list(outputs), list(inputs)
    if add is None:
        unique = list(dict.fromkeys(probes))
        where = {p: i for i, p in enumerate(unique)}
        order = [where[p] for p in probes]
    else:
        unique, order = list(probes), None
    pad = pad_id_of(tok)
    dev = input_device(model)
    seqs = [token_ids(tok, p.text) for p in unique]
    for p, s in zip(unique, seqs):
        if not 0 <= p.index < len(s):
            raise RequestError(f"lookup index {p.index} is outside the {len(s)} tokens of {p.text!r}")
    run_order = list(range(len(seqs)))
    if compact:  # rows are put back in order below
        seqs = [s[: p.index + 1] for p, s in zip(unique, seqs)]
        run_order.sort(key=lambda i: -len(seqs[i]))
    chunks: Dict[str, List[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(unique), batch_size):
            batch = run_order[start:start + batch_size]
            ids, mask = pad_right([seqs[i] for i in batch], pad, dev)
            rows = torch.arange(ids.shape[0])
            cols = torch.tensor([unique[i].index for i in batch])
            edits = {}
            for name, values in (add or {}).items():
                vals = values[torch.tensor(batch, device=values.device)]
                edits[name] = lambda h, v=vals: add_at_positions(h, rows, cols, v)
            trace = Trace(model, outputs=outputs, inputs=inputs, edits=edits, stop_when_done=True)
            run(model, trace, input_ids=ids, attention_mask=mask)
            for name in outputs:
                h = trace.outputs[name]
                chunks.setdefault("out:" + name, []).append(h[rows.to(h.device), cols.to(h.device)])
            for name in inputs:
                h = trace.inputs[name]
                chunks.setdefault("in:" + name, []).append(h[rows.to(h.device), cols.to(h.device)])
    back = torch.empty(len(run_order), dtype=torch.long)  # unique probe -> its row in the results
    back[torch.tensor(run_order, dtype=torch.long)] = torch.arange(len(run_order))
    index = back if order is None else back[torch.tensor(order, dtype=torch.long)]
    result = {k: torch.cat(v, 0) for k, v in chunks.items()}
    return {k: v[index.to(v.device)] for k, v in result.items()}




def average_over_templates(values: torch.Tensor, templates: List[List[str]]) -> torch.Tensor:
    """``[R * T, d]`` (request-major, templates in order) -> ``[R, d]``.

    EasyEdit's ``compute_ks`` averaging: the mean within each template group, then
    the mean of the group means.
    """
    sizes = [len(g) for g in templates]
    per = sum(sizes)
    v = values.reshape(-1, per, values.shape[-1])
    means, start = [], 0
    for size in sizes:
        means.append(v[:, start : start + size].mean(1))
        start += size
    return torch.stack(means, 0).mean(0)


def template_probes(tok, requests: Sequence[EditRequest], templates, fact_token: str) -> List[Probe]:
    """Probes for keys: every request in every context template (request-major)."""
    probes = []
    for r in requests:
        for t in flat_templates(templates):
            prompt = t.format(r.prompt)
            probes.append(Probe(prompt.format(r.subject), lookup_index(tok, prompt, r.subject, fact_token)))
    return probes


def bare_probes(tok, requests: Sequence[EditRequest], fact_token: str) -> List[Probe]:
    """Probes at the bare prompts (where current hidden states and targets are measured)."""
    return [Probe(r.text, lookup_index(tok, r.prompt, r.subject, fact_token)) for r in requests]
