"""Second-moment (uncentered covariance) statistics of the rewrite modules' inputs.

``C = E[k k^T]`` over the tokens of a text corpus, for the input ``k`` of every
rewritten module, collected for ALL requested modules in ONE pass over the
corpus; each forward pass stops after the deepest module.

EasyEdit compatibility (``rome/layer_stats.py`` + ``util/runningstats.py``):

- cache file ``{stats_dir}/{model_name}/{ds_name}_stats/{module}_{precision}_mom2_{n}.npz``
  with ``model_name`` the last path component of ``model.config._name_or_path``;
- contents ``mom2.constructor``, ``mom2.count``, ``mom2.mom2`` (the running SUM of
  ``k k^T`` in ``precision``) and ``sample_size``; ``C = mom2 / count``;
- sample choice: the first ``n`` indices of ``range(len(corpus))`` shuffled by
  ``random.Random(1)``; texts tokenized with truncation at the statistics
  context length :func:`stats_length` (or ``mom2_batch_tokens``); tokens of all
  samples count.

So a user's existing EasyEdit statistics are reused, and ours load in EasyEdit.
Where our sample-length cap applies, the file name gets ``_t{N}`` before the
sample count, as EasyEdit intends (its code writes the literal text
``_t{batch_tokens}``, which no stock editor ever asks for).

Corpus sources (``mom2_dataset``):

- ``wikipedia``, ``wikitext``, ``wikitext2``: EasyEdit's Hugging Face datasets,
  through ``datasets`` when installed and online;
- a path to a ``.txt`` file or a folder of them: one sample per line, like the
  Hugging Face ``text``/``wikitext`` rows (empty lines included in the sampling,
  they contribute no tokens);
- ``bundled``: the offline default, shipped inside the package
  (``easyedit_replay/data/bundled_corpus.json``): 512 short English texts sampled
  once from SmolLM2-135M-Instruct (64 new tokens after one of 24 everyday openers,
  temperature 1, top-k 50, seed 0) by ``easyedit-replay make-corpus``. Needs no
  file, no network and no generation at run time; usable with any model;
- ``self_generated``: the same recipe run on the model being edited, cached as
  JSON beside the statistics (costs about a minute of sampling on a CPU for 256
  texts of SmolLM2).
"""

from __future__ import annotations

import json
import logging
import random
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .batching import input_device, pad_id_of, pad_left, pad_right, token_ids
from .errors import StatisticsError
from .files import atomic_write, atomic_write_text
from .model_info import max_positions
from .tracing import Trace, resolve_module, run

log = logging.getLogger(__name__)

CONSTRUCTOR = "easyeditor.util.runningstats.SecondMoment()"
HF_DATASETS = {
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
}
SELF_GENERATED = "self_generated"
BUNDLED = "bundled"
SELF_OPENERS = (
    "The", "In", "A", "It", "This", "He", "She", "They", "When", "After", "According to", "One of the",
    "During the", "Many people", "The city of", "Scientists", "In the early", "Although", "Today,",
    "The company", "Most", "Her", "His", "Our",
)
SELF_NEW_TOKENS = 64
# EasyEdit boxes None as this NaN so npz files need no pickle.
NULL_NUMPY_VALUE = np.array(struct.unpack(">d", struct.pack(">Q", 0xFFF8000000000002))[0], dtype=np.float64)

_MEMORY: Dict[tuple, torch.Tensor] = {}


# ----------------------------------------------------------------------------- names


def model_stats_name(model) -> str:
    """EasyEdit's ``model_name`` for the stats path: last component of ``_name_or_path``."""
    return str(getattr(model.config, "_name_or_path", "model")).rsplit("/")[-1]


def context_length(model) -> int:
    """``npos`` as in EasyEdit's ``layer_stats`` (mistral: sliding window or 4096; qwen: <= 4096).

    Raises:
        StatisticsError: the config names no context length (``n_positions`` /
            ``max_position_embeddings``; :func:`~easyedit_replay.model_info.max_positions`).
    """
    config = model.config
    npos = max_positions(model)
    if npos is None:
        raise StatisticsError("cannot find the model's context length in its config (n_positions / max_position_embeddings)")
    model_type = getattr(config, "model_type", "") or ""
    if "mistral" in model_type:
        npos = getattr(config, "sliding_window", None) or 4096
    if "qwen" in model_type:
        npos = min(npos, 4096)
    return npos


def stats_length(model, hparams) -> int:
    """``npos`` of the statistics pass: :func:`context_length` capped at
    ``hparams.mom2_max_length`` (default 4096), the way EasyEdit caps Qwen's and
    Mistral's; it sets the truncation length and, with ``mom2_batch_tokens``, the
    ``_t{N}`` part of the file name. For a model whose config says 131072 positions
    (Llama-3.1/3.2) this is what keeps one long text from running as a single
    131072-token sequence (``heads * T^2`` attention scores under eager attention).

    Raises:
        StatisticsError: the config names no context length.
    """
    cap = getattr(hparams, "mom2_max_length", None)
    npos = context_length(model)
    return min(npos, int(cap)) if cap else npos


def known_corpus(mom2_dataset: str) -> bool:
    """Whether ``mom2_dataset`` names a corpus this module can read."""
    if mom2_dataset in HF_DATASETS or mom2_dataset in (SELF_GENERATED, BUNDLED):
        return True
    return Path(mom2_dataset).expanduser().exists()


def dataset_name(mom2_dataset: str) -> str:
    """The ``ds_name`` used in the cache path: EasyEdit's names unchanged; for a local
    path, its file or folder name (without ``.txt``)."""
    if mom2_dataset in HF_DATASETS or mom2_dataset in (SELF_GENERATED, BUNDLED):
        return mom2_dataset
    path = Path(mom2_dataset)
    return path.stem if path.suffix == ".txt" else path.name


def stats_path(stats_dir, model_name: str, ds_name: str, module: str, precision: str,
               sample_size: Optional[int], batch_tokens: Optional[int], npos: int) -> Path:
    """EasyEdit's cache file path for one module's second moment."""
    size_suffix = "" if sample_size is None else f"_{sample_size}"
    if batch_tokens is not None and batch_tokens < npos:
        size_suffix = f"_t{batch_tokens}" + size_suffix
    return Path(stats_dir) / model_name / f"{ds_name}_stats" / f"{module}_{precision}_mom2{size_suffix}.npz"


# ----------------------------------------------------------------------------- npz files


def save_second_moment(path: Path, count: int, mom2: torch.Tensor, sample_size: Optional[int]) -> None:
    """Write EasyEdit's npz layout atomically (temporary file + rename) under a file lock."""
    data = {
        "mom2.constructor": np.array(CONSTRUCTOR),
        "mom2.count": np.array(int(count)),
        "mom2.mom2": mom2.detach().cpu().numpy(),
        "sample_size": NULL_NUMPY_VALUE if sample_size is None else np.array(sample_size),
    }
    atomic_write(path, lambda tmp: np.savez(tmp, **data), suffix=".tmp.npz")


def load_second_moment(path: Path, dim: Optional[int] = None, precision: Optional[str] = None,
                       sample_size: Optional[int] = None) -> Tuple[int, torch.Tensor]:
    """Read ``(count, mom2 sum)`` from an EasyEdit npz file, checking it.

    Raises:
        StatisticsError: unreadable file, missing keys, wrong shape (``[dim, dim]``),
            dtype other than ``precision``, non-positive count, non-finite values, or a
            ``sample_size`` other than the one asked for.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            count = int(data["mom2.count"])
            mom2 = np.array(data["mom2.mom2"])
            stored = data["sample_size"] if "sample_size" in data.files else None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise StatisticsError(f"statistics cache {path} is unreadable ({exc}); delete it to recompute") from exc
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or (dim is not None and mom2.shape[0] != dim):
        raise StatisticsError(f"statistics cache {path} holds a {mom2.shape} matrix, expected [{dim}, {dim}]; delete it to recompute")
    if precision is not None and str(mom2.dtype) != precision:
        raise StatisticsError(f"statistics cache {path} has dtype {mom2.dtype}, expected {precision}; delete it to recompute")
    if count <= 0 or not np.isfinite(mom2).all():
        raise StatisticsError(f"statistics cache {path} has count {count} or non-finite values; delete it to recompute")
    if stored is not None and sample_size is not None:
        stored_v = None if (stored.dtype == np.float64 and np.isnan(stored)) else int(stored)
        if stored_v != sample_size:
            raise StatisticsError(f"statistics cache {path} was computed for sample_size={stored_v}, not {sample_size}")
    return count, torch.from_numpy(mom2)


# ----------------------------------------------------------------------------- corpora


def sample_indices(n_items: int, sample_size: Optional[int]) -> List[int]:
    """EasyEdit's ``FixedRandomSubsetSampler(seed=1)``: shuffled ``range(n)``, first ``sample_size``."""
    if sample_size is None:
        return list(range(n_items))
    rng = random.Random(1)
    shuffled = list(range(n_items))
    rng.shuffle(shuffled)
    return shuffled[: min(sample_size, n_items)]


def _local_lines(path: Path) -> List[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise StatisticsError(f"hparams.mom2_dataset = {str(path)!r}: the folder holds no .txt files")
    lines: List[str] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines.extend(line.rstrip("\n") for line in fh)
    return lines


def _hf_texts(name: str) -> List[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise StatisticsError(
            f"hparams.mom2_dataset = {name!r} needs the 'datasets' package and network access; "
            f"pip install datasets, or set mom2_dataset to a local .txt file or '{BUNDLED}'"
        ) from None
    repo, config = HF_DATASETS[name]
    try:
        ds = load_dataset(repo, config)["train"]
    except Exception as exc:  # offline, missing cache, ...
        raise StatisticsError(
            f"hparams.mom2_dataset = {name!r}: loading {repo}/{config} failed ({exc}); "
            f"set mom2_dataset to a local .txt file or '{BUNDLED}'"
        ) from exc
    return ds["text"]


def self_generated_texts(model, tok, n: int, cache_file: Optional[Path] = None, seed: int = 0,
                         new_tokens: int = SELF_NEW_TOKENS, batch_size: int = 64, progress: bool = True) -> List[str]:
    """``n`` texts sampled from ``model``: ``new_tokens`` tokens after one of
    :data:`SELF_OPENERS` (cycled), temperature 1, top-k 50, with ``generate`` and the
    KV cache. Sampling runs under ``torch.random.fork_rng`` seeded with ``seed``, so
    it is reproducible and leaves the caller's RNG untouched. Cached as JSON at
    ``cache_file`` so every layer's statistics use the same texts.
    """
    if cache_file is not None and Path(cache_file).exists():
        texts = json.loads(Path(cache_file).read_text())
        if isinstance(texts, list) and len(texts) == n:
            return texts
    dev = input_device(model)
    pad = pad_id_of(tok)
    prompts = [SELF_OPENERS[i % len(SELF_OPENERS)] for i in range(n)]
    texts: List[str] = []
    bar = _bar(progress, total=n, desc="sampling statistics corpus", unit="text")
    devices = [dev.index] if dev.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            batch = prompts[start : start + batch_size]
            seqs = [token_ids(tok, p) for p in batch]
            ids, mask = pad_left(seqs, pad, dev)  # every row continues from its last real token
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
            )
            for row, s in zip(out, seqs):
                texts.append(tok.decode(s + row[width:].tolist(), skip_special_tokens=True))
            bar.update(len(batch))
    bar.close()
    if cache_file is not None:
        atomic_write_text(Path(cache_file), json.dumps(texts))
    return texts


def bundled_texts() -> List[str]:
    """The texts of the bundled offline corpus (see the module docstring)."""
    from importlib import resources

    path = resources.files("easyedit_replay") / "data" / "bundled_corpus.json"
    return json.loads(path.read_text(encoding="utf-8"))["texts"]


def corpus_texts(mom2_dataset: str, model=None, tok=None, n_samples: Optional[int] = None,
                 stats_dir=None, progress: bool = True) -> List[str]:
    """All texts of the corpus named by ``mom2_dataset`` (before sampling).

    Raises:
        StatisticsError: unknown name or missing path (the message lists the choices).
    """
    if mom2_dataset == SELF_GENERATED:
        if model is None or tok is None or n_samples is None:
            raise StatisticsError("the self_generated corpus needs the model, its tokenizer and mom2_n_samples")
        cache = None
        if stats_dir is not None:
            cache = Path(stats_dir) / model_stats_name(model) / f"{SELF_GENERATED}_stats" / f"corpus_{n_samples}.json"
        return self_generated_texts(model, tok, n_samples, cache, progress=progress)
    if mom2_dataset == BUNDLED:
        return bundled_texts()
    if mom2_dataset in HF_DATASETS:
        return _hf_texts(mom2_dataset)
    path = Path(mom2_dataset).expanduser()
    if path.exists():
        return _local_lines(path)
    raise StatisticsError(
        f"hparams.mom2_dataset = {mom2_dataset!r} is neither a file/folder nor a known corpus; "
        f"use a path to a .txt file, one of {sorted(HF_DATASETS)}, '{BUNDLED}' or '{SELF_GENERATED}' (offline)"
    )


# ----------------------------------------------------------------------------- collection


def _bar(progress, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, **kwargs)


def collect_second_moments(model, tok, texts: Sequence[str], modules: Sequence[str], maxlen: int,
                           precision: str = "float32", tokens_per_batch: int = 4096,
                           progress: bool = True) -> Dict[str, Tuple[int, torch.Tensor]]:
    """One pass over ``texts`` for every module in ``modules``.

    Each text is tokenized (special tokens included, truncated to ``maxlen``); texts
    are sorted by length and packed into right-padded batches of at most
    ``tokens_per_batch`` tokens (one text per batch if longer); each forward pass
    stops after the deepest module. For each module: ``count`` = number of
    non-padding tokens, ``mom2`` = sum over them of ``k k^T`` in ``precision``.

    Returns ``{module: (count, mom2 [d_in, d_in])}`` (``mom2`` on the CPU, in ``precision``;
    the unnormalized sum, as EasyEdit's ``layer_stats`` accumulates it).

    Raises:
        HyperParamsError: a name in ``modules`` that is not a module of ``model``.
        StatisticsError: no text gave a token.
    """
    dtype = getattr(torch, precision)
    for name in modules:
        resolve_module(model, name, "rewrite_module_tmp")
    seqs = [tok.encode(t, truncation=True, max_length=maxlen) for t in texts]
    seqs = sorted((s for s in seqs if len(s) > 0), key=len, reverse=True)
    dev = input_device(model)
    pad = pad_id_of(tok)
    count = {m: 0 for m in modules}
    mom2: Dict[str, Optional[torch.Tensor]] = {m: None for m in modules}
    bar = _bar(progress, total=sum(len(s) for s in seqs), desc=f"statistics ({len(modules)} modules)",
               unit="tok", unit_scale=True)
    i = 0
    with torch.no_grad():
        while i < len(seqs):
            width = len(seqs[i])
            j = i + max(1, tokens_per_batch // width)
            batch = seqs[i:j]
            ids, mask = pad_right(batch, pad, dev)
            trace = Trace(model, inputs=list(modules), stop_when_done=True)
            run(model, trace, input_ids=ids, attention_mask=mask)
            for m in modules:
                x = trace.inputs[m]
                feats = x.reshape(-1, x.shape[-1])[mask.to(x.device).reshape(-1).nonzero()[:, 0]].to(dtype)
                if mom2[m] is None:
                    mom2[m] = torch.zeros((feats.shape[1], feats.shape[1]), dtype=dtype, device=feats.device)
                mom2[m] += feats.t().mm(feats)
                count[m] += feats.shape[0]
            bar.update(int(mask.sum()))
            i = j
    bar.close()
    if not seqs:
        raise StatisticsError("the statistics corpus produced no tokens; check mom2_dataset")
    return {m: (count[m], mom2[m].cpu()) for m in modules}


def module_stats_path(model, hparams, module: str, stats_dir=None) -> Path:
    """The cache file of ``module``'s second moment for ``hparams`` (``stats_dir``
    overrides ``hparams.stats_dir``): the statistics identity that derived caches
    (AlphaEdit's projections) are keyed by."""
    return stats_path(stats_dir or hparams.stats_dir, model_stats_name(model), dataset_name(hparams.mom2_dataset),
                      module, hparams.mom2_dtype, hparams.mom2_n_samples,
                      getattr(hparams, "mom2_batch_tokens", None), stats_length(model, hparams))


def second_moments(model, tok, hparams, modules: Sequence[str], stats_dir=None, force: bool = False,
                   progress: bool = True) -> Dict[str, torch.Tensor]:
    """``C = E[k k^T]`` (float32, CPU, ``[d_in, d_in]``) for each module, cached.

    Looks in memory, then in EasyEdit's cache files; computes every missing module
    in ONE pass over the corpus and writes their files. Uses ``hparams.mom2_dataset,
    mom2_n_samples, mom2_dtype, stats_dir, mom2_batch_tokens, mom2_max_length,
    mom2_tokens_per_batch``.

    Raises:
        StatisticsError: corpus unavailable, or a cache file with the wrong shape,
            dtype or sample size (delete it, or pass ``force=True``).

    Source: EasyEdit ``memit_main.get_cov`` + ``rome/layer_stats.layer_stats``.
    """
    stats_dir = stats_dir or hparams.stats_dir
    npos = stats_length(model, hparams)
    batch_tokens = getattr(hparams, "mom2_batch_tokens", None)
    maxlen = min(npos, batch_tokens) if batch_tokens else npos
    precision = hparams.mom2_dtype
    n = hparams.mom2_n_samples
    result: Dict[str, torch.Tensor] = {}
    missing: List[str] = []
    paths = {}
    for m in modules:
        paths[m] = module_stats_path(model, hparams, m, stats_dir)
        key = str(paths[m].resolve())  # the file's identity (model, corpus, module, dtype, sizes)
        if not force and key in _MEMORY:
            result[m] = _MEMORY[key]
            continue
        if not force and paths[m].exists():
            dim = _input_dim(model, m)
            count, total = load_second_moment(paths[m], dim, precision, n)
            result[m] = _MEMORY[key] = (total / count).float()
            log.info("loaded statistics %s", paths[m])
            continue
        missing.append(m)
    if missing:
        texts = corpus_texts(hparams.mom2_dataset, model, tok, n, stats_dir, progress)
        chosen = [texts[i] for i in sample_indices(len(texts), n)]
        collected = collect_second_moments(model, tok, chosen, missing, maxlen, precision,
                                           tokens_per_batch=getattr(hparams, "mom2_tokens_per_batch", 4096),
                                           progress=progress)
        for m, (count, total) in collected.items():
            save_second_moment(paths[m], count, total, n)
            result[m] = _MEMORY[str(paths[m].resolve())] = (total / count).float()
    return {m: result[m] for m in modules}


def _input_dim(model, module: str) -> Optional[int]:
    weight = getattr(resolve_module(model, module), "weight", None)
    if weight is None:
        return None
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    return weight.shape[0] if type(resolve_module(model, module)).__name__ == "Conv1D" else weight.shape[1]


def clear_memory_cache() -> None:
    """Forget statistics held in memory (files stay)."""
    _MEMORY.clear()
