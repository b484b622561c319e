"""Metrics for the standalone comparison (EasyEdit's definitions where it has one).

- efficacy: teacher-forced token accuracy of ``target_new`` after the edit prompt
  (EasyEdit's ``rewrite_acc``: the text ``prompt + " " + target`` is tokenized as
  one string and each target token must be the argmax given the tokens before it),
  and the share of edits where P(new) > P(true), probabilities being per-token
  means of the log-likelihood (the MEMIT paper's efficacy score).
- generalization: the same two numbers on the rephrased prompt.
- specificity: share of the locality prompt's teacher-forced token predictions
  (on ``locality_ground_truth``) unchanged against the unedited model
  (EasyEdit's ``locality`` score).
- fluency: n-gram entropy of short greedy generations (MEMIT paper, eq. in §5.2:
  weighted average of bi- and tri-gram entropies; 2/3 and 4/3 weights).

The paper's metrics (Liu et al., ICML 2026, section 6; their code's
``evals/counterfact.py`` and ``experiments/locality_exp_{kl,topk}.py``):

- Success (``*_win``): P(new) > P(true), teacher-forced (above).
- Accuracy (``*_exact``): exact match of ``target_new`` under greedy generation.
  Greedy decoding of the target's ``k`` tokens reproduces them iff every target
  token is the argmax given the prompt and the target tokens before it, so this
  is computed exactly as ``1[every teacher-forced target token is the argmax]``
  (what the authors' code does), without a generation pass.
- DKL (``locality_dkl``): ``KL(p_unedited || p_edited)`` of the next-token
  distributions at the end of the neighbourhood (locality) prompt; lower is better.
- Top-k (``locality_top1/5/10``): ``|top_k(unedited) & top_k(edited)| / k`` of the
  next tokens at the end of the neighbourhood prompt; higher is better.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .batching import input_device, pad_id_of, pad_left, pad_right, token_ids


@dataclass
class Scored:
    """Teacher-forced scores of one ``(prompt, target)`` pair."""

    acc: float            # share of target tokens that are the argmax
    logprob: float        # mean log-probability per target token
    predictions: List[int]


def score_targets(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[Scored]:
    """Teacher-forced scores of ``targets`` after ``prompts`` (EasyEdit's tokenization:
    ``prompt + " " + target.lstrip()`` as one text)."""
    items = []
    for p, t in zip(prompts, targets):
        full = token_ids(tok, p + " " + t.lstrip())
        n_prompt = len(token_ids(tok, p))
        n_prompt = min(n_prompt, len(full) - 1)
        items.append((full, max(n_prompt, 1)))
    dev = input_device(model)
    pad = pad_id_of(tok)
    out: List[Scored] = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            ids, mask = pad_right([c[0] for c in chunk], pad, dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, -1)
            for b, (full, n_prompt) in enumerate(chunk):
                pos = torch.arange(n_prompt - 1, len(full) - 1, device=logp.device)
                labels = torch.tensor(full[n_prompt:], device=logp.device)
                lp = logp[b, pos]
                preds = lp.argmax(-1)
                out.append(Scored(
                    float((preds == labels).float().mean()),
                    float(lp.gather(1, labels[:, None]).mean()),
                    preds.tolist(),
                ))
    return out


def token_batches(tok, prompts: Sequence[str], batch_size: int):
    """Yield the token ids (``List[List[int]]``) of ``prompts`` in chunks of ``batch_size``."""
    for start in range(0, len(prompts), batch_size):
        yield [token_ids(tok, p) for p in prompts[start: start + batch_size]]


def next_token_logprobs(model, tok, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``[N, V]`` float32 log-probabilities of the next token after each prompt (its last
    token; prompts right-padded, read at each prompt's own last position)."""
    dev = input_device(model)
    pad = pad_id_of(tok)
    rows = []
    with torch.no_grad():
        for seqs in token_batches(tok, prompts, batch_size):
            ids, mask = pad_right(seqs, pad, dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            last = torch.tensor([len(s) - 1 for s in seqs], device=logits.device)
            picked = logits[torch.arange(len(seqs), device=logits.device), last].float()
            rows.append(torch.log_softmax(picked, -1).cpu())
    return torch.cat(rows, 0) if rows else torch.empty(0, 0)


TOP_KS = (1, 5, 10)


def distribution_shift(before: torch.Tensor, after: torch.Tensor) -> Dict[str, float]:
    """The paper's specificity without ground truth, for one prompt.

    Args:
        before / after: ``[V]`` next-token log-probabilities of the unedited and the
            edited model.

    Returns:
        ``{"locality_dkl": KL(before || after) in nats, "locality_top1": ..,
        "locality_top5": .., "locality_top10": ..}`` (overlap share of the top-k sets).
    """
    dkl = float((before.exp() * (before - after)).sum())
    out = {"locality_dkl": dkl}
    for k in TOP_KS:
        a = set(before.topk(k).indices.tolist())
        b = set(after.topk(k).indices.tolist())
        out[f"locality_top{k}"] = len(a & b) / k
    return out


def greedy_generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 32) -> List[str]:
    """Greedy continuations (the decoded new text only), batched with the KV cache.

    Prompts are left-padded here whatever the tokenizer's ``padding_side``.
    """
    dev = input_device(model)
    pad = pad_id_of(tok)
    texts = []
    with torch.no_grad():
        for seqs in token_batches(tok, prompts, batch_size):
            ids, mask = pad_left(seqs, pad, dev)
            width = ids.shape[1]
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, pad_token_id=pad)
            texts += [tok.decode(row[width:], skip_special_tokens=True) for row in out]
    return texts


def ngram_entropy(text: str, weights=((2, 2 / 3), (3, 4 / 3))) -> float:
    """MEMIT's fluency measure: weighted n-gram entropy (bits) of the words of ``text``."""
    words = text.split()
    total = 0.0
    for n, w in weights:
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        if count:
            total += w * -sum(c / count * math.log2(c / count) for c in grams.values())
    return total / sum(w for _, w in weights)


def evaluate_records(model, tok, records: Sequence[dict], baseline: Optional[List[dict]] = None) -> List[dict]:
    """Per-edit metrics for canonical records (see :mod:`easyedit_replay.data`).

    Args:
        records: dicts with ``prompt`` (subject filled in), ``target_new``,
            ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
            ``locality_ground_truth`` (the last three may be missing).
        baseline: the result of this function on the unedited model; when given,
            ``specificity`` compares locality predictions against it.

    Returns:
        One dict per record: ``efficacy_acc``, ``efficacy_win`` (P(new) > P(true),
        the paper's Success), ``efficacy_exact`` (the paper's Accuracy),
        ``generalization_acc``, ``generalization_win``, ``generalization_exact``,
        ``locality_predictions``, ``specificity``, ``locality_dkl``,
        ``locality_top1/5/10`` (the last five None without baseline), ``logp_new``,
        ``logp_true``, and ``_locality_logp`` (``[V]`` next-token log-probabilities at
        the end of the locality prompt; keys starting with ``_`` are not reported).
    """
    prompts = [r["prompt"] for r in records]
    new = score_targets(model, tok, prompts, [r["target_new"] for r in records])
    true = score_targets(model, tok, prompts, [r.get("ground_truth") or "" for r in records])
    reph = [r for r in records if r.get("rephrase_prompt")]
    reph_new = iter(score_targets(model, tok, [r["rephrase_prompt"] for r in reph], [r["target_new"] for r in reph]))
    reph_true = iter(score_targets(model, tok, [r["rephrase_prompt"] for r in reph], [r.get("ground_truth") or "" for r in reph]))
    loc = [r for r in records if r.get("locality_prompt")]
    loc_scores = iter(score_targets(model, tok, [r["locality_prompt"] for r in loc], [r.get("locality_ground_truth") or "" for r in loc]))
    loc_next = iter(next_token_logprobs(model, tok, [r["locality_prompt"] for r in loc]))
    out = []
    for i, r in enumerate(records):
        row = {
            "efficacy_acc": new[i].acc,
            "efficacy_win": float(new[i].logprob > true[i].logprob) if r.get("ground_truth") else None,
            "efficacy_exact": float(new[i].acc == 1.0),
            "logp_new": new[i].logprob,
            "logp_true": true[i].logprob if r.get("ground_truth") else None,
            "generalization_acc": None, "generalization_win": None, "generalization_exact": None,
            "locality_predictions": None, "specificity": None, "locality_dkl": None,
            **{f"locality_top{k}": None for k in TOP_KS}, "_locality_logp": None,
        }
        if r.get("rephrase_prompt"):
            a, b = next(reph_new), next(reph_true)
            row["generalization_acc"] = a.acc
            row["generalization_win"] = float(a.logprob > b.logprob) if r.get("ground_truth") else None
            row["generalization_exact"] = float(a.acc == 1.0)
        if r.get("locality_prompt"):
            row["locality_predictions"] = next(loc_scores).predictions
            row["_locality_logp"] = next(loc_next)
        if baseline is not None and row["locality_predictions"] is not None:
            before = baseline[i]["locality_predictions"]
            same = [a == b for a, b in zip(row["locality_predictions"], before)]
            row["specificity"] = sum(same) / len(same) if same else None
            row.update(distribution_shift(baseline[i]["_locality_logp"], row["_locality_logp"]))
        out.append(row)
    return out


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


SUMMARY_KEYS = ("efficacy_acc", "efficacy_win", "efficacy_exact", "generalization_acc", "generalization_win",
                "generalization_exact", "specificity", "locality_dkl", "locality_top1", "locality_top5",
                "locality_top10")


def summarize(rows: Sequence[dict]) -> Dict[str, Optional[float]]:
    """Means of the metrics over edits (None where a metric is missing everywhere)."""
    return {k: mean(r.get(k) for r in rows) for k in SUMMARY_KEYS}
