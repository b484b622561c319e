"""Requests, lookup tokens, context templates, batched reads at lookup tokens, and keys.

Mirrors EasyEdit's ``repr_tools.get_words_idxs_in_templates`` (lookup index),
``memit.compute_ks`` (keys averaged over context templates) and
``memit.get_context_templates`` (five sampled prefixes, cached per process).
Sequences are always padded on the RIGHT here, whatever the tokenizer's
``padding_side`` says, and lookup indices are positions in the unpadded
sequence, so a caller's left-padding tokenizer cannot shift them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .batching import input_device, pad_id_of, pad_right, token_ids
from .errors import RequestError, field_error
from .tracing import Trace, add_at_positions, run

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")

# ----------------------------------------------------------------------------- requests


@dataclass
class EditRequest:
    """One edit, normalized.

    ``prompt`` holds exactly one ``{}`` where the subject goes (other braces are
    escaped), ``target_new`` carries the leading space EasyEdit's MEMIT adds.
    """

    prompt: str
    subject: str
    target_new: str
    ground_truth: Optional[str] = None
    case_id: Optional[object] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        """The bare prompt with the subject filled in."""
        return self.prompt.format(self.subject)


def escape_braces(s: str) -> str:
    """``s`` with ``{`` and ``}`` doubled, so that ``str.format`` gives ``s`` back."""
    return s.replace("{", "{{").replace("}", "}}")


def prepare_request(raw: dict, index: int = 0, leading_space: bool = True) -> EditRequest:
    """Validate and normalize one EasyEdit request dict.

    Accepts ``prompt`` with a ``{}`` placeholder or containing ``subject`` verbatim
    (or in another casing, in which case the prompt's casing becomes the subject).

    Raises:
        RequestError: missing/non-string ``prompt``, ``subject`` or ``target_new``;
            empty ``target_new``; subject absent from the prompt.
    """
    where = f"requests[{index}]"
    if not isinstance(raw, dict):
        raise RequestError(f"{where} is a {type(raw).__name__}; each request must be a dict with prompt, subject, target_new")
    for key in ("prompt", "subject", "target_new"):
        if key not in raw:
            raise field_error(RequestError, key, None, f"add the {key!r} field (EasyEdit request format)", where)
        if not isinstance(raw[key], str):
            raise field_error(RequestError, key, raw[key], "must be a string", where)
    prompt, subject, target = raw["prompt"], raw["subject"], raw["target_new"]
    if not subject.strip():
        raise field_error(RequestError, "subject", subject, "must name the subject that appears in the prompt", where)
    if not target.strip():
        raise field_error(RequestError, "target_new", target, "must be a non-empty string (the new object)", where)
    if not prompt.strip():
        raise field_error(RequestError, "prompt", prompt, "must be a non-empty string", where)
    gt = raw.get("ground_truth")
    if isinstance(gt, (list, tuple)):
        gt = gt[0] if gt else None
    if gt is not None and not isinstance(gt, str):
        raise field_error(RequestError, "ground_truth", gt, "must be a string (or a list of strings)", where)

    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise field_error(RequestError, "prompt", prompt, "must contain the placeholder {} exactly once", where)
        head, tail = prompt.split("{}")
        template = escape_braces(head) + "{}" + escape_braces(tail)
    else:
        pos = prompt.find(subject)
        if pos < 0:
            pos = prompt.lower().find(subject.lower())
            if pos < 0:
                raise field_error(
                    RequestError, "subject", subject,
                    f"does not occur in the prompt {prompt!r} in any casing; fix the subject or put {{}} where it goes",
                    where,
                )
            subject = prompt[pos : pos + len(subject)]
        template = escape_braces(prompt[:pos]) + "{}" + escape_braces(prompt[pos + len(subject) :])
    if leading_space and not target.startswith(" "):
        target = " " + target
    return EditRequest(template, subject, target, gt, raw.get("case_id"), raw)


def prepare_requests(requests: Sequence[dict], leading_space: bool = True) -> List[EditRequest]:
    """:func:`prepare_request` over a list; raises :class:`RequestError` for an empty list."""
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise RequestError("requests is empty; pass at least one EasyEdit request dict")
    return [prepare_request(r, i, leading_space) for i, r in enumerate(requests)]


# ----------------------------------------------------------------------------- tokens


def lookup_index(tok, template: str, subject: str, strategy: str, prompt_end: Optional[str] = None) -> int:
    """Position of the lookup token in ``tok(template.format(subject))``.

    Mirrors EasyEdit's ``get_words_idxs_in_templates``: ``subject_last`` is the
    last token of ``prefix + subject``; ``subject_first_after_last`` the token
    after it (the last subject token when nothing follows); ``subject_first`` the
    first subject token. ``last`` is the last token of the prompt: of
    ``prompt_end`` (the template without appended target tokens) when given.
    Indices are non-negative positions in the unpadded sequence (EasyEdit returns a
    negative index for ``subject_first``, which is only right under left padding).

    Raises:
        RequestError: the template does not contain ``{}`` exactly once.
        ValueError: unknown strategy.
    """
    if strategy == "last":
        return len(token_ids(tok, (prompt_end or template).format(subject))) - 1
    if template.count("{}") != 1:
        raise RequestError(f"template {template!r} must contain {{}} exactly once")
    prefix, suffix = template.split("{}")
    prefix, suffix = prefix.format(), suffix.format()  # unescape braces
    prefix_len = len(token_ids(tok, prefix))
    prompt_len = len(token_ids(tok, prefix + subject))
    if strategy == "subject_last":
        return prompt_len - 1
    if strategy == "subject_first_after_last":
        input_len = len(token_ids(tok, prefix + subject + suffix))
        return prompt_len - (1 if input_len == prompt_len else 0)
    if strategy == "subject_first":
        return prefix_len
    raise ValueError(f"fact_token={strategy!r} not recognized; use one of {FACT_TOKENS}")


# ----------------------------------------------------------------------------- reads


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


# ----------------------------------------------------------------------------- context templates

_TEMPLATE_CACHE: Dict[tuple, List[List[str]]] = {}
TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")


def sample_context_templates(model, tok, seed: int = 0, length: int = 10, top_k: int = 5) -> List[List[str]]:
    """EasyEdit's context templates: ``[["{}"], [5 sampled prefixes + ". {}"]]``.

    Mirrors ``memit_main.get_context_templates`` / ``generate_fast``: for each of
    "The", "Therefore", "Because", "I", "You", sample up to ``length`` tokens
    (prompt included) with top-``top_k`` sampling, decode, NFKD-normalize, replace
    ``"\\n\\n"`` by a space, blank out braces and append ``". {}"``. Sampling uses a
    private ``torch.Generator`` seeded with ``seed``, so the result is reproducible
    and independent of the global RNG. Cached per (model, seed) for the process.
    """
    key = (getattr(model.config, "_name_or_path", id(model)), id(model), seed, length, top_k)
    if key in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[key]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dev = input_device(model)
    seqs = [token_ids(tok, prefix) for prefix in TEMPLATE_PREFIXES]
    with torch.no_grad():
        # All prefixes advance together: one right-padded forward pass per sampled token.
        while any(len(s) < length for s in seqs):
            ids, mask = pad_right(seqs, pad_id_of(tok), dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for i, s in enumerate(seqs):
                if len(s) >= length:
                    continue
                probs = torch.softmax(logits[i, len(s) - 1].float().cpu(), dim=-1)
                top = torch.topk(probs, top_k)
                choice = torch.multinomial(top.values / top.values.sum(), 1, generator=gen)
                s.append(int(top.indices[choice]))
    out = []
    for s in seqs:
        text = tok.decode(s, skip_special_tokens=True)
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")
        out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    templates = [["{}"], out]
    _TEMPLATE_CACHE[key] = templates
    return templates


def validate_templates(templates) -> List[List[str]]:
    """Check injected context templates: a list of non-empty groups of strings with one ``{}``."""
    if not isinstance(templates, (list, tuple)) or not templates:
        raise RequestError("context_templates must be a non-empty list of lists of strings, e.g. [['{}'], ['The cat. {}']]")
    clean = []
    for g, group in enumerate(templates):
        if isinstance(group, str) or not group:
            raise RequestError(f"context_templates[{g}] must be a non-empty list of strings")
        for t in group:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise RequestError(f"context_templates[{g}] entry {t!r} must be a string with exactly one {{}}")
        clean.append(list(group))
    return clean


def flat_templates(templates: List[List[str]]) -> List[str]:
    return [t for group in templates for t in group]


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
