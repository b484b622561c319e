"""Reliability: one test per validation rule, malformed records never change a weight,
padding-side independence, concurrent statistics, half-precision edits."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from easyedit_replay.editor import apply_edit, compute_edit
from easyedit_replay.errors import HyperParamsError, NumericalError, ReplayError, RequestError
from easyedit_replay.algorithms import load_hparams
from easyedit_replay.prompts import prepare_requests

from .half_precision import reduced_copy
from .test_core import assert_unchanged, snapshot, with_fields

GOOD = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"}


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"layer": [3]}, "layer", "unknown field"),
        ({"layers": [5, 3]}, "layers", "strictly increasing"),
        ({"layers": []}, "layers", "non-empty"),
        ({"layers": [3, "4"]}, "layers", "integers"),
        ({"fact_token": "subject_middle"}, "fact_token", "must be one of"),
        ({"v_lr": 0}, "v_lr", "positive"),
        ({"v_num_grad_steps": -1}, "v_num_grad_steps", "positive integer"),
        ({"clamp_norm_factor": -2}, "clamp_norm_factor", "positive"),
        ({"mom2_update_weight": -1}, "mom2_update_weight", "non-negative"),
        ({"kl_factor": -0.1}, "kl_factor", "non-negative"),
        ({"mom2_n_samples": 0}, "mom2_n_samples", "positive integer"),
        ({"mom2_dtype": "float8"}, "mom2_dtype", "must be one of"),
        ({"mom2_dataset": "no_such_corpus"}, "mom2_dataset", "neither a known corpus"),
        ({"replay_share": "half"}, "replay_share", "must be one of"),
        ({"rewrite_module_tmp": "model.layers.mlp"}, "rewrite_module_tmp", "one {}"),
        ({"alg_name": "ROME_REPLAY"}, "alg_name", "not an easyedit-replay algorithm"),
        # bad input that loaded, or crashed later with an error naming no field
        ({"v_lr": float("nan")}, "v_lr", "positive"),
        ({"kl_factor": float("inf")}, "kl_factor", "non-negative"),
        ({"mom2_update_weight": "nan"}, "mom2_update_weight", "non-negative"),
        ({"model_name": 5}, "model_name", "must be the model's name"),
        ({"hparams_source": 3}, "hparams_source", "must be a string"),
        ({"context_seed": "x"}, "context_seed", "must be an integer"),
        ({"context_seed": 1.5}, "context_seed", "must be an integer"),
        ({"stats_dir": 5}, "stats_dir", "must be a folder path"),
        ({"stats_dir": __file__}, "stats_dir", "is a file"),
        ({"model_parallel": "no"}, "model_parallel", "true or false"),
        ({"mom2_adjustment": "maybe"}, "mom2_adjustment", "true or false"),
        ({"batch_size": 0}, "batch_size", "positive integer"),
        ({"max_length": "long"}, "max_length", "positive integer"),
        ({"layer_selection": "some"}, "layer_selection", "must be one of"),
        ({"alg_name": "MEMIT"}, "alg_name", "stock EasyEdit's MEMIT; set alg_name: MEMIT_REPLAY"),
        ({"alg_name": "memit_replay"}, "alg_name", "did you mean 'MEMIT_REPLAY'?"),
    ],
)
def test_hparams_rules(hparams, changes, field, message):
    config = {**hparams.to_dict(), **changes}
    with pytest.raises(HyperParamsError) as info:
        load_hparams(config)
    assert field in str(info.value) and message in str(info.value)


def test_hparams_missing_field(hparams):
    config = hparams.to_dict()
    del config["v_lr"]
    with pytest.raises(HyperParamsError, match=r"missing required field\(s\) \['v_lr'\]"):
        load_hparams(config)


def test_hparams_missing_file():
    with pytest.raises(HyperParamsError, match="does not exist"):
        load_hparams("no/such/file.yaml")


def test_hparams_yaml_syntax_error(tmp_path):
    """A YAML that does not parse raised yaml's ParserError, not a HyperParamsError naming the file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("alg_name: MEMIT_REPLAY\nlayers: [4, 5\n")
    with pytest.raises(HyperParamsError, match=f"{bad}: not valid YAML .*line 3"):
        load_hparams(bad)


@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"layers": [3, 30]}, "layers", "the model has 30 layers"),
        ({"v_loss_layer": 31}, "v_loss_layer", "must be in 0..29"),
        # read the anchor's loss at the anchor layer (EasyEdit's max(v_loss_layer, layer)), silently
        ({"v_loss_layer": 2}, "v_loss_layer", "must be at or after the last edit layer 8: the anchor's NLL is read "
                                              "at this layer's output (usually the model's last layer, 29)"),
        ({"rewrite_module_tmp": "model.layers.{}.mlp.down"}, "rewrite_module_tmp", "closest names"),
        ({"layer_module_tmp": "transformer.h.{}"}, "layer_module_tmp", "not a module"),
        ({"ln_f_module": "model.ln_f"}, "ln_f_module", "not a module"),
    ],
)
def test_hparams_against_the_model(model_tok, hparams, demo_records, changes, field, message):
    model, tok = model_tok
    before = snapshot(model)
    hp = with_fields(hparams, **changes)
    with pytest.raises(HyperParamsError) as info:
        apply_edit(model, tok, demo_records[:1], hp)
    assert field in str(info.value) and message in str(info.value)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({k: v for k, v in GOOD.items() if k != "subject"}, "subject", "add the 'subject' field"),
        ({**GOOD, "subject": "Louvre"}, "subject", "does not occur in the prompt"),
        ({**GOOD, "target_new": "   "}, "target_new", "non-empty"),
        ({**GOOD, "target_new": ""}, "target_new", "non-empty"),
        ({**GOOD, "prompt": 42}, "prompt", "must be a string"),
        ({**GOOD, "subject": ["Eiffel Tower"]}, "subject", "must be a string"),
        ({**GOOD, "prompt": "The {} and {} are"}, "prompt", "exactly once"),
        ({"subject": "Eiffel Tower", "src": "Where is the Eiffel Tower?", "alt": "Rome"}, "prompt",
         "a ZsRE record (src, alt): load the file with easyedit_replay.data.load_records"),
    ],
)
def test_request_rules(record, field, message):
    with pytest.raises(RequestError) as info:
        prepare_requests([GOOD, record])
    assert f"requests[1].{field}" in str(info.value) and message in str(info.value)


def test_requests_as_a_string_names_the_list():
    with pytest.raises(RequestError, match="requests is a str; pass a list of EasyEdit request dicts"):
        prepare_requests("The Eiffel Tower is located in the city of")


def test_subject_in_another_casing_is_accepted():
    (req,) = prepare_requests([{**GOOD, "subject": "eiffel tower"}])
    assert req.subject == "Eiffel Tower" and req.text == GOOD["prompt"]


def test_braces_in_prompts_are_escaped():
    (req,) = prepare_requests([{**GOOD, "prompt": "In {code} the Eiffel Tower is located in the city of"}])
    assert req.text == "In {code} the Eiffel Tower is located in the city of"


def test_prompt_longer_than_the_context(model_tok, hparams):
    model, tok = model_tok
    before = snapshot(model)
    long = {**GOOD, "prompt": "word " * 8200 + GOOD["prompt"]}
    with pytest.raises(RequestError, match="more than the model's context of 8192"):
        apply_edit(model, tok, [long], with_fields(hparams, v_num_grad_steps=1, layers=[3]))
    assert_unchanged(model, before)


def test_empty_request_list(model_tok, hparams):
    model, tok = model_tok
    with pytest.raises(RequestError, match="requests is empty"):
        apply_edit(model, tok, [], hparams)


_text = st.text(min_size=0, max_size=12)
_not_str = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.lists(_text, max_size=2), st.binary(max_size=4))


@st.composite
def malformed_records(draw):
    """A record with at least one field broken in a way the editor must reject."""
    record = dict(GOOD)
    kind = draw(st.sampled_from(["drop", "type", "subject", "target", "placeholder"]))
    if kind == "drop":
        record.pop(draw(st.sampled_from(["prompt", "subject", "target_new"])))
    elif kind == "type":
        key = draw(st.sampled_from(["prompt", "subject", "target_new"]))
        record[key] = draw(_not_str)
    elif kind == "subject":
        record["subject"] = draw(_text.filter(lambda s: not s.strip() or s.lower() not in GOOD["prompt"].lower()))
    elif kind == "target":
        record["target_new"] = draw(st.sampled_from(["", " ", "\t", "\n  "]))
    else:
        record["prompt"] = draw(st.sampled_from(["{} {}", "{} and {} are in", "{}{}{}"])) + GOOD["prompt"]
    return record


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=malformed_records(), position=st.integers(0, 2))
def test_malformed_records_never_change_a_weight(model_tok, hparams, record, position):
    model, tok = model_tok
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in hparams.layers]
    before = {n: model.get_parameter(n).detach().clone() for n in names}
    batch = [dict(GOOD), dict(GOOD)]
    batch.insert(position, record)
    with pytest.raises(ReplayError):
        apply_edit(model, tok, batch, hparams)
    for n in names:
        assert torch.equal(model.get_parameter(n), before[n])


# ----------------------------------------------------------------------------- model and numerics


def test_unknown_device_is_refused_before_the_model_loads(monkeypatch):
    """``load_model(device="tpu")`` (``--device tpu``) loaded the model, then raised torch's
    RuntimeError; now a ModelLoadError naming the device, before any file is read."""
    import easyedit_replay.models as models
    from easyedit_replay.errors import ModelLoadError

    monkeypatch.setattr(models, "resolve_model_path", lambda name: pytest.fail("the model was looked up"))
    with pytest.raises(ModelLoadError, match=r"device 'tpu' is not a torch device .*pass e.g. 'cpu', 'cuda'"):
        models.load_model("smollm2-135m", device="tpu")


def test_left_padding_tokenizer_and_missing_pad_token(model_tok, hparams, templates, demo_records):
    model, tok = model_tok
    hp = with_fields(hparams, v_num_grad_steps=2, layers=[4, 6])
    reference = compute_edit(model, tok, demo_records[:2], hp, "replay", context_templates=templates).updates
    side, pad = tok.padding_side, tok.pad_token
    try:
        tok.padding_side = "left"
        left = compute_edit(model, tok, demo_records[:2], hp, "replay", context_templates=templates).updates
        tok.pad_token = None
        nopad = compute_edit(model, tok, demo_records[:2], hp, "replay", context_templates=templates).updates
    finally:
        tok.padding_side, tok.pad_token = side, pad
    for name, upd in reference.items():
        assert torch.allclose(left[name], upd, rtol=1e-5, atol=1e-9), name
        assert torch.allclose(nopad[name], upd, rtol=1e-5, atol=1e-9), name


def test_non_finite_update_is_caught_before_any_write(model_tok, hparams, templates, demo_records, monkeypatch):
    from easyedit_replay.algorithms.memit import MEMIT

    model, tok = model_tok
    before = snapshot(model)
    original = MEMIT.update
    monkeypatch.setattr(MEMIT, "update", lambda self, inp: original(self, inp) * float("nan"))
    first = f"model.layers.{hparams.layers[0]}.mlp.down_proj.weight"
    with pytest.raises(NumericalError, match=f"non-finite update of {first}"):
        apply_edit(model, tok, demo_records[:1], with_fields(hparams, v_num_grad_steps=1), context_templates=templates)
    assert_unchanged(model, before)


@pytest.mark.parametrize("raised", [RuntimeError("a failure at the second layer"), KeyboardInterrupt()])
def test_failure_after_a_layer_was_written_restores_it(model_tok, hparams, templates, demo_records, monkeypatch,
                                                       raised):
    """An edit that fails at layer 5 after layer 4's update was written (an error, or Ctrl-C)
    leaves every weight bit-identical: the transaction, not only the checks before the write."""
    from easyedit_replay.algorithms.memit import MEMIT

    model, tok = model_tok
    before = snapshot(model)
    first = "model.layers.4.mlp.down_proj.weight"
    original, written = MEMIT.update, []

    def update(self, inp):
        if inp.step == 1:
            written.append(not torch.equal(model.get_parameter(first), before[first]))
            raise raised
        return original(self, inp)

    monkeypatch.setattr(MEMIT, "update", update)
    with pytest.raises(type(raised)):
        apply_edit(model, tok, demo_records[:1], with_fields(hparams, v_num_grad_steps=2, layers=[4, 5]),
                   context_templates=templates)
    assert written == [True]  # layer 4 was edited when layer 5 failed
    assert_unchanged(model, before)


def test_bf16_model_edits_with_finite_weights(model_tok, hparams, templates, demo_records, half_plan):
    """A bf16 edit (layers 3-5, 15 anchor steps, 2 demo edits) writes finite bf16 weights and
    raises each target's log-probability by more than a nat. On bf16's reduced path
    (tests/half_precision.py) the model is the truncated copy of ``reduced_copy`` (layers 0-8).
    Measured gains (nats): whole model 4.95 and 8.32; truncated copy 25.35 and 7.42 (native
    bf16), 25.08 and 7.30 (emulated)."""
    from easyedit_replay.evaluate import score_targets

    model, tok = model_tok
    layers = [3, 4, 5]
    changes = {}
    if half_plan.reduced("bfloat16"):
        model, changes = reduced_copy(model, layers)
    half = copy.deepcopy(model).to(torch.bfloat16)
    hp = with_fields(hparams, layers=layers, v_num_grad_steps=15, **changes)
    rec = demo_records[:2]
    pre = score_targets(half, tok, [r["prompt"] for r in rec], [r["target_new"] for r in rec])
    _, orig = apply_edit(half, tok, rec, hp, context_templates=templates, return_orig_weights=True)
    for name in orig:
        w = half.get_parameter(name)
        assert w.dtype == torch.bfloat16 and torch.isfinite(w).all() and not torch.equal(w, orig[name])
    post = score_targets(half, tok, [r["prompt"] for r in rec], [r["target_new"] for r in rec])
    print("bf16 edit: log P(target_new) gains", [round(b.logprob - a.logprob, 2) for a, b in zip(pre, post)])
    assert all(b.logprob > a.logprob + 1.0 for a, b in zip(pre, post))


# ----------------------------------------------------------------------------- caches


def test_two_processes_compute_the_same_statistics(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, torch
        from easyedit_replay.models import load_model
        from easyedit_replay.algorithms import load_hparams
        from easyedit_replay.cli import default_hparams_path
        from easyedit_replay.stats import second_moments
        hp = load_hparams(default_hparams_path(), stats_dir={str(tmp_path)!r}, mom2_n_samples=24, layers=[2])
        m, t = load_model()
        c = second_moments(m, t, hp, ["model.layers.2.mlp.down_proj"], progress=False)["model.layers.2.mlp.down_proj"]
        torch.save(c, sys.argv[1])
        """
    )
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"c{i}.pt")], env=env) for i in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".npz", ".tmp"))
    assert files == ["model.layers.2.mlp.down_proj_float32_mom2_24.npz"]
    from easyedit_replay.stats import load_second_moment

    (f,) = tmp_path.rglob("*.npz")
    count, mom2 = load_second_moment(f, 1536, "float32", 24)
    a, b = torch.load(tmp_path / "c0.pt"), torch.load(tmp_path / "c1.pt")
    assert torch.equal(a, b) and torch.equal(a, (mom2 / count).float())
