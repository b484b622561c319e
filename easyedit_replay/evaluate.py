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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .batching import input_device, pad_id_of, pad_left, pad_right, token_ids
from .model_info import accepts_logits_to_keep
from .experiments.metrics import metrics


@dataclass
class Scored:
    """Teacher-forced scores of one ``(prompt, target)`` pair."""

    acc: float            # share of target tokens that are the argmax
    logprob: float        # mean log-probability per target token
    predictions: List[int]


def position_logprobs(model, tok, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                      reduce: Callable[[int, torch.Tensor], object], batch_size: int = 32) -> List[object]:
    """Next-token log-probabilities of token sequences at chosen positions, batched.

    Sequences are sorted by length and right-padded in batches of ``batch_size``, so
    padding stays small; the unembedding runs only at the positions some row of the
    batch needs (``logits_to_keep`` with the union of the batch's positions, when the
    model's ``forward`` takes it; else at every position).

    Args:
        seqs: ``N`` token-id lists (unpadded).
        positions: per sequence, the positions ``p`` (``0 <= p < len``) whose next-token
            distribution is wanted.
        reduce: called as ``reduce(i, logp)`` with ``logp`` the ``[len(positions[i]), V]``
            float32 log-probabilities of sequence ``i`` (in the order of
            ``positions[i]``); its return value is kept (so the ``[P, V]`` tensors of
            all sequences never have to be held at once).

    Returns:
        ``[reduce(i, logp_i) for i in range(N)]`` in the input order.
    """
    dev = input_device(model)
    pad = pad_id_of(tok)
    keep = accepts_logits_to_keep(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: List[object] = [None] * len(seqs)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            ids, mask = pad_right([seqs[i] for i in chunk], pad, dev)
            if keep:
                cols = sorted({p for i in chunk for p in positions[i]})
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                               logits_to_keep=torch.tensor(cols, device=dev)).logits
                col_of = {p: j for j, p in enumerate(cols)}
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                col_of = None
            for b, i in enumerate(chunk):
                where = [col_of[p] for p in positions[i]] if col_of is not None else list(positions[i])
                picked = logits[b, torch.tensor(where, device=logits.device, dtype=torch.long)].float()
                out[i] = reduce(i, torch.log_softmax(picked, -1))
    return out


def _target_positions(tok, prompt: str, target: str) -> Tuple[List[int], int]:
    """EasyEdit's tokenization of a scored pair: the ids of ``prompt + " " + target.lstrip()``
    as one text and the number of leading ids that belong to the prompt (at least 1, at
    most ``len - 1``)."""
    full = token_ids(tok, prompt + " " + target.lstrip())
    n_prompt = min(len(token_ids(tok, prompt)), len(full) - 1)
    return full, max(n_prompt, 1)


def _scored(full: List[int], n_prompt: int, logp: torch.Tensor) -> Scored:
    """:class:`Scored` from ``logp [len(full) - n_prompt, V]`` at positions ``n_prompt - 1 ..``."""
    labels = torch.tensor(full[n_prompt:], device=logp.device)
    preds = logp.argmax(-1)
    return Scored(float((preds == labels).float().mean()), float(logp.gather(1, labels[:, None]).mean()),
                  preds.tolist())


def score_targets(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[Scored]:
    """Teacher-forced scores of ``targets`` after ``prompts`` (EasyEdit's tokenization:
    ``prompt + " " + target.lstrip()`` as one text): one :class:`Scored` per pair."""
    items = [_target_positions(tok, p, t) for p, t in zip(prompts, targets)]
    return position_logprobs(
        model, tok, [full for full, _ in items], [range(n - 1, len(full) - 1) for full, n in items],
        lambda i, logp: _scored(items[i][0], items[i][1], logp), batch_size)


TOP_KS = (1, 5, 10)
SCORE_BATCH = 64  # sequences per forward pass of evaluate_records


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

    Prompts are sorted by length (so little padding) and left-padded here whatever the
    tokenizer's ``padding_side``; the texts come back in the input order.
    """
    dev = input_device(model)
    pad = pad_id_of(tok)
    seqs = [token_ids(tok, p) for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    texts: List[str] = [""] * len(seqs)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            ids, mask = pad_left([seqs[i] for i in chunk], pad, dev)
            width = ids.shape[1]
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, pad_token_id=pad)
            for i, row in zip(chunk, out):
                texts[i] = tok.decode(row[width:], skip_special_tokens=True)
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


@dataclass
class Evaluation:
    """What :func:`evaluate_records` measures on ``N`` records: ``rows``, one dict of metrics
    per record, and beside them ``locality_logp``, per record the ``[V]`` float32 next-token
    log-probabilities at the end of its locality prompt (None without one), which a later
    evaluation against this one compares with (DKL, top-k overlap)."""

    rows: List[dict]
    locality_logp: List[Optional[torch.Tensor]]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: Sequence[int]) -> "Evaluation":
        """The evaluation of the records ``idx`` (indices, in that order)."""
        return Evaluation([self.rows[i] for i in idx], [self.locality_logp[i] for i in idx])


def evaluate_records(model, tok, records: Sequence[dict], baseline: Optional[Evaluation] = None) -> Evaluation:
    """Per-edit metrics for canonical records (see :mod:`easyedit_replay.data`).

    Args:
        records: ``N`` dicts with ``prompt`` (subject filled in), ``target_new``,
            ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
            ``locality_ground_truth`` (the last three may be missing).
        baseline: the result of this function on the same records of the unedited
            model; when given, ``specificity`` compares locality predictions against it
            and ``locality_dkl``/``locality_top*`` its locality log-probabilities.

    Returns:
        :class:`Evaluation`: one row per record with ``efficacy_acc``,
        ``efficacy_win`` (P(new) > P(true), the paper's Success), ``efficacy_exact``
        (the paper's Accuracy), ``generalization_acc``, ``generalization_win``,
        ``generalization_exact``, ``locality_predictions``, ``specificity``,
        ``locality_dkl``, ``locality_top1/5/10`` (the last five None without
        baseline), ``logp_new`` and ``logp_true``; beside the rows the ``[V]``
        next-token log-probabilities at the end of each locality prompt.

    Source: EasyEdit ``compute_rewrite_quality_counterfact`` (``rewrite_acc``,
    ``locality``); the paper's ``evals/counterfact.py`` (Success, Accuracy) and
    ``experiments/locality_exp_{kl,topk}.py`` (DKL, top-k).
    """
    # Every scored pair of every record in one batched pass (sorted by length); the
    # locality prompt's next-token distribution is read from its scored pair when the
    # prompt's tokens are a prefix of the pair's (else from the prompt alone).
    seqs, positions, what = [], [], []

    def add(i, kind, ids, pos, n_prompt=0, next_at=None):
        seqs.append(ids), positions.append(pos), what.append((i, kind, ids, n_prompt, next_at))

    def add_pair(i, kind, prompt, target):
        full, n_prompt = _target_positions(tok, prompt, target)
        next_at = None
        if kind == "loc":
            alone = token_ids(tok, prompt)
            if len(alone) == n_prompt and full[:n_prompt] == alone:
                next_at = 0  # position n_prompt - 1 of the pair, the first one read
            else:
                add(i, "next", alone, [len(alone) - 1], next_at=0)
        add(i, kind, full, list(range(n_prompt - 1, len(full) - 1)), n_prompt, next_at)

    for i, r in enumerate(records):
        add_pair(i, "new", r["prompt"], r["target_new"])
        if r.get("ground_truth"):
            add_pair(i, "true", r["prompt"], r["ground_truth"])
        if r.get("rephrase_prompt"):
            add_pair(i, "reph_new", r["rephrase_prompt"], r["target_new"])
            if r.get("ground_truth"):
                add_pair(i, "reph_true", r["rephrase_prompt"], r["ground_truth"])
        if r.get("locality_prompt"):
            add_pair(i, "loc", r["locality_prompt"], r.get("locality_ground_truth") or "")

    def reduce(j, logp):
        i, kind, full, n_prompt, next_at = what[j]
        scored = _scored(full, n_prompt, logp) if kind != "next" else None
        return scored, (logp[next_at].cpu() if next_at is not None else None)

    results = position_logprobs(model, tok, seqs, positions, reduce, batch_size=SCORE_BATCH)
    got: Dict[tuple, tuple] = {}
    for (i, kind, *_), res in zip(what, results):
        got[(i, kind)] = res
    out, locality_logp = [], []
    for i, r in enumerate(records):
        new = got[(i, "new")][0]
        true = got[(i, "true")][0] if r.get("ground_truth") else None
        row = {
            "efficacy_acc": new.acc,
            "efficacy_win": float(new.logprob > true.logprob) if true is not None else None,
            "efficacy_exact": float(new.acc == 1.0),
            "logp_new": new.logprob,
            "logp_true": true.logprob if true is not None else None,
            "generalization_acc": None, "generalization_win": None, "generalization_exact": None,
            "locality_predictions": None, "specificity": None, "locality_dkl": None,
            **{f"locality_top{k}": None for k in TOP_KS},
        }
        next_logp = None
        if r.get("rephrase_prompt"):
            a = got[(i, "reph_new")][0]
            row["generalization_acc"] = a.acc
            row["generalization_win"] = float(a.logprob > got[(i, "reph_true")][0].logprob) if true is not None else None
            row["generalization_exact"] = float(a.acc == 1.0)
        if r.get("locality_prompt"):
            scored, next_logp = got[(i, "loc")]
            row["locality_predictions"] = scored.predictions
            next_logp = next_logp if next_logp is not None else got[(i, "next")][1]
        if baseline is not None and row["locality_predictions"] is not None:
            before = baseline.rows[i]["locality_predictions"]
            same = [a == b for a, b in zip(row["locality_predictions"], before)]
            row["specificity"] = sum(same) / len(same) if same else None
            row.update(distribution_shift(baseline.locality_logp[i], next_logp))
        out.append(row)
        locality_logp.append(next_logp)
    return Evaluation(out, locality_logp)


def mean(values) -> Optional[float]:
    """Mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


SUMMARY_KEYS = tuple(m.key for m in metrics("records"))  # what evaluate_records computes (the registry's group)


def summarize(rows: Sequence[dict]) -> Dict[str, Optional[float]]:
    """Means of the metrics over edits (None where a metric is missing everywhere)."""
    return {k: mean(r.get(k) for r in rows) for k in SUMMARY_KEYS}
