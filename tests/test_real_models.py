"""Real models as researchers run them (issue 19): the YAMLs for the models users edit,
statistics memory on a 128k-context config, a model dispatched through accelerate's
hooks, tied heads, decoder layers that return a bare tensor, and scripts/gpu_check.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easyedit_replay.algorithms import load_hparams
from easyedit_replay.editor import compute_edit
from easyedit_replay.errors import HyperParamsError

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- YAMLs

ALGORITHMS = ("MEMIT_REPLAY", "PMET_REPLAY", "EMMET_REPLAY", "AlphaEdit_REPLAY")
# The models users run, with the architecture (real depth, tiny widths) their YAMLs are checked on.
USER_MODELS = {
    "llama3-8b": ("LlamaConfig", dict(num_hidden_layers=32, tie_word_embeddings=False)),
    "llama3.1-8b": ("LlamaConfig", dict(num_hidden_layers=32, tie_word_embeddings=False)),
    "llama3.2-3b": ("LlamaConfig", dict(num_hidden_layers=28, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(num_hidden_layers=28, tie_word_embeddings=False)),
    "mistral-7b": ("MistralConfig", dict(num_hidden_layers=32, tie_word_embeddings=False)),
    "gpt-j-6B": ("GPTJConfig", dict(n_layer=28, n_embd=16, n_head=2, rotary_dim=4, n_positions=64,
                                    tie_word_embeddings=False)),
}
TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
            max_position_embeddings=64)


def tiny_model(arch: str):
    import transformers

    config_name, changes = USER_MODELS[arch]
    base = {} if config_name == "GPTJConfig" else dict(TINY)
    config = getattr(transformers, config_name)(**{**base, **changes, "vocab_size": 64})
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", list(USER_MODELS))
def test_every_algorithm_has_a_yaml_with_its_source_for_the_models_users_run(arch):
    model = tiny_model(arch)
    for alg in ALGORITHMS:
        path = ROOT / "hparams" / alg / f"{arch}.yaml"
        assert path.exists(), f"missing {path}"
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any("EasyEdit" in line for line in header), f"{path}: no header saying where its values came from"
        hp = load_hparams(path)
        hp.validate_for_model(model)  # every template names a module of this architecture


@pytest.mark.parametrize("field", ["rewrite_module_tmp", "mlp_module_tmp", "attn_module_tmp"])
def test_validate_for_model_catches_a_template_that_names_no_module(field):
    model = tiny_model("llama3-8b")
    hp = load_hparams(ROOT / "hparams" / "MEMIT_REPLAY" / "llama3-8b.yaml")
    bad = hp.replace(**{field: "model.layers.{}.nowhere"})
    with pytest.raises(HyperParamsError, match=f"hparams.{field} resolves to 'model.layers.4.nowhere'"):
        bad.validate_for_model(model)


def test_validate_for_model_checks_pmet_rewrite_templates():
    model = tiny_model("qwen2.5-7b")
    hp = load_hparams(ROOT / "hparams" / "PMET_REPLAY" / "qwen2.5-7b.yaml")
    bad = hp.replace(rewrite_module_tmps=["model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.out_proj"])
    with pytest.raises(HyperParamsError, match="rewrite_module_tmps resolves to 'model.layers.4.self_attn.out_proj'"):
        bad.validate_for_model(model)


# ----------------------------------------------------------------------------- statistics memory

STATS_PEAK_BOUND_MB = 2500  # SmolLM2, mom2_max_length 4096 (default): measured 2.0 GB eager, 0.8 GB SDPA


def test_statistics_length_is_capped_and_the_file_name_stays_easyedit_s(model_tok, hparams):
    from easyedit_replay.stats import context_length, module_stats_path, stats_length

    model, _ = model_tok
    model = copy.copy(model)  # a shallow copy with its own config: the session model stays untouched
    model.config = copy.deepcopy(model.config)
    model.config.max_position_embeddings = 131072
    assert context_length(model) == 131072 and stats_length(model, hparams) == hparams.mom2_max_length == 4096
    assert stats_length(model, hparams.replace(mom2_max_length=1024)) == 1024
    name = module_stats_path(model, hparams, "model.layers.4.mlp.down_proj").name
    assert name == f"model.layers.4.mlp.down_proj_float32_mom2_{hparams.mom2_n_samples}.npz"
    assert "_t512_" in module_stats_path(model, hparams.replace(mom2_batch_tokens=512), "model.layers.4.mlp.down_proj").name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_statistics_peak_memory_on_a_131072_position_config(attn):
    """One 12000-token text on SmolLM2 with max_position_embeddings = 131072: before the cap it
    ran as one sequence (eager: 9 * 12000^2 float32 scores = 5.2 GB for one layer's attention);
    now peak RSS stays below the bound. The child runs under a 4 GiB address-space limit, so
    a regression fails here instead of exhausting the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "stats_memory_child.py"), "--tokens", "12000",
                          "--attn", attn, "--limit-gb", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_length"] == 4096
    assert result["files"] == ["model.layers.4.mlp.down_proj_float32_mom2_4.npz"]  # EasyEdit's name, no _t suffix
    assert result["peak_rss_mb"] < STATS_PEAK_BOUND_MB, result


# ----------------------------------------------------------------------------- devices


def _updates(model, tok, hp, record, templates, mode):
    plan = compute_edit(model, tok, [record], hp, mode, context_templates=templates)
    return plan.updates


@pytest.mark.parametrize("mode", ["replay", "spread"])
def test_model_dispatched_with_offloaded_layers_edits_like_the_plain_one(model_tok, hparams, templates, demo_records,
                                                                         mode, tmp_path):
    """accelerate's ``dispatch_model``: layers 0-21 stay on the CPU, 22-29 are offloaded to
    disk (their weights are meta tensors loaded by accelerate's hooks at each call). The
    anchor loop, the replay pass and the layer loop run through those hooks."""
    from accelerate import dispatch_model

    model, tok = model_tok
    hp = hparams.replace(layers=[4, 5, 6], v_num_grad_steps=2, anchor_cache=False)
    plain = _updates(model, tok, hp, demo_records[0], templates, mode)
    dispatched = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i < 22 else "disk" for i in range(30)}}
    dispatched = dispatch_model(dispatched, device_map=device_map, offload_dir=str(tmp_path))
    assert dispatched.model.layers[25].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    got = _updates(dispatched, tok, hp, demo_records[0], templates, mode)
    assert got.keys() == plain.keys()
    for name in plain:
        assert torch.allclose(got[name], plain[name], rtol=1e-5, atol=1e-8), name


# ----------------------------------------------------------------------------- model families


def test_tied_lm_head_edits_like_the_embedding_it_shares(model_tok, hparams, templates, demo_records):
    """SmolLM2 ties ``lm_head.weight`` to ``model.embed_tokens.weight``; ``lm_head.weight``
    is then not a named parameter (EasyEdit #458). Either name gives the same edit, and the
    edit leaves the shared tensor and the tie alone."""
    model, tok = model_tok
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    hp = hparams.replace(layers=[4, 5], v_num_grad_steps=2, anchor_cache=False)
    via_embedding = _updates(model, tok, hp, demo_records[0], templates, "replay")
    before = model.lm_head.weight.detach().clone()
    via_head = _updates(model, tok, hp.replace(lm_head_module="lm_head"), demo_records[0], templates, "replay")
    assert via_head.keys() == via_embedding.keys()
    for name in via_head:
        assert torch.equal(via_head[name], via_embedding[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, before)


class _TupleBlock(torch.nn.Module):
    """A SmolLM2 decoder layer that returns ``(hidden,)``, as transformers 4.x layers do."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return (self.layer(*args, **kwargs),)


class _BareTensorLayer(torch.nn.Module):
    """Wraps a :class:`_TupleBlock` and returns a bare tensor (EasyEdit #637)."""

    def __init__(self, layer):
        super().__init__()
        self.block = _TupleBlock(layer)

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        assert isinstance(out, tuple)
        return out[0]


@pytest.mark.parametrize("layer_tmp", ["model.layers.{}", "model.layers.{}.block"])
def test_decoder_layers_returning_a_bare_tensor_or_a_tuple(model_tok, hparams, templates, demo_records, layer_tmp):
    """Every SmolLM2 layer wrapped: ``model.layers.{}`` returns a bare tensor,
    ``model.layers.{}.block`` a 1-tuple; with either as ``layer_module_tmp`` the edit equals
    the plain model's."""
    model, tok = model_tok
    # 32 statistics samples: the wrapped modules' names are new, so their statistics are computed
    hp = hparams.replace(layers=[4, 5], v_num_grad_steps=2, anchor_cache=False, mom2_n_samples=32)
    plain = _updates(model, tok, hp, demo_records[0], templates, "replay")
    wrapped = copy.deepcopy(model)
    wrapped.model.layers = torch.nn.ModuleList(_BareTensorLayer(layer) for layer in wrapped.model.layers)
    inner = "model.layers.{}.block.layer"
    hp_w = hp.replace(layer_module_tmp=layer_tmp, rewrite_module_tmp=inner + ".mlp.down_proj",
                      mlp_module_tmp=inner + ".mlp", attn_module_tmp=inner + ".self_attn")
    got = _updates(wrapped, tok, hp_w, demo_records[0], templates, "replay")
    for layer in hp.layers:
        a = plain[f"model.layers.{layer}.mlp.down_proj.weight"]
        b = got[f"model.layers.{layer}.block.layer.mlp.down_proj.weight"]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8), layer


# ----------------------------------------------------------------------------- scripts/gpu_check.py


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_clearly_without_cuda(monkeypatch, capsys):
    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.EXIT_NO_CUDA
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "torch.cuda.is_available() is False" in err and "--device cpu" in err


def test_gpu_check_cpu_path_prints_the_table(tmp_path, capsys):
    """The check's own code path on the CPU: one edit, 2 anchor steps, MEMIT replay in bf16
    against a float32 copy and an accelerate-dispatched copy."""
    gpu_check = _gpu_check()
    out = tmp_path / "gpu_check.txt"
    assert gpu_check.main(["--device", "cpu", "--n", "1", "--steps", "2", "--algs", "MEMIT", "--modes", "replay",
                           "--dispatch", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| MEMIT | replay |" in text and "| statistics | anchors | targets | layers | evaluate |" in text
    row = json.loads(text.split("```json\n")[1].split("\n```")[0])[0]
    assert row["dtype"] == "bfloat16" and set(row["seconds"]) == set(gpu_check.PHASES)
    assert row["seconds"]["anchors"] > 0 and row["dispatched"]["max_rel_diff"] < 1e-5
    assert row["reference"]["min_cosine"] > 0.5  # bf16 vs float32 (the tolerance test is in test_precision.py)
