"""Edit requests, lookup tokens and context templates: what is fed to the model.

Mirrors EasyEdit's request normalization (``prompt`` with ``{}``, a leading space on
``target_new``), ``repr_tools.get_words_idxs_in_templates`` (:func:`lookup_index`: the
lookup token) and ``memit.get_context_templates`` (:func:`sample_context_templates`:
five sampled prefixes, cached per process). Lookup indices are positions in the
unpadded sequence, so a caller's left-padding tokenizer cannot shift them. Reads at
the lookup token are in :mod:`easyedit_replay.reads`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .batching import input_device, pad_id_of, pad_right, token_ids
from .errors import RequestError, field_error

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
        RequestError: missing/non-string ``prompt``, ``subject`` or ``target_new`` (a
            ZsRE record, ``src``/``alt``, is named as one); empty ``target_new``; subject
            absent from the prompt.
    """
    where = f"requests[{index}]"
    if not isinstance(raw, dict):
        raise RequestError(f"{where} is a {type(raw).__name__}; each request must be a dict with prompt, subject, target_new")
    if "prompt" not in raw and "src" in raw and "alt" in raw:
        raise field_error(RequestError, "prompt", None, "this is a ZsRE record (src, alt): load the file with "
                          "easyedit_replay.data.load_records, or pass prompt=src and target_new=alt", where)
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
    """:func:`prepare_request` over a list (a single dict counts as a list of one).

    Raises:
        RequestError: an empty list, a string, or a malformed request (from :func:`prepare_request`).
    """
    if isinstance(requests, dict):
        requests = [requests]
    if isinstance(requests, str):
        raise RequestError("requests is a str; pass a list of EasyEdit request dicts "
                           "(prompt, subject, target_new), or one such dict")
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
    """Check injected context templates: a list of non-empty groups of strings with one ``{}``.

    Returns:
        The templates as a list of lists (each group copied).

    Raises:
        RequestError: not a non-empty list, a group that is a string or empty, or an entry
            that is not a string with exactly one ``{}``.
    """
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
    """The context templates of every group, in order (``[["{}"], ["A. {}", "B. {}"]]`` ->
    ``["{}", "A. {}", "B. {}"]``)."""
    return [t for group in templates for t in group]
