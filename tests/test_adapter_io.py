"""save_adapter / load_adapter in our own format: exact round trips, in-place updates, atomic
writes, and a clear error with the model unchanged for every kind of bad input."""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
from _helpers import assert_unchanged, randomize, snapshot
from _models import bert, gpt2, llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from strategies import CASES
from torch import nn
from torch.nn.utils import parametrize

import lora_inject as li
from lora_inject import inject, load_adapter, named_loras, save_adapter


# -- shared helpers (test_peft_format.py uses them too) ----------------------------------------
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, (1, 3), stride=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv(x))).mean((-1, -2)))


def inputs(model: nn.Module) -> torch.Tensor:
    if isinstance(model, ConvNet):
        return torch.randn(2, 3, 6, 7)
    return torch.randint(0, model.config.vocab_size, (2, 7))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


# name: (build, [(targets, r, alpha, rslora), ...]); two calls give per-tensor r and alpha.
MODELS = {
    "gpt2": (gpt2, [("c_attn|c_fc", 4, 8.0, False), ("wpe", 2, 3.0, True)]),
    "llama": (llama, [("q_proj|v_proj|down_proj", 4, 8.0, False), ("embed_tokens", 2, 5.0, False)]),
    "bert": (bert, [("query|value", 4, 6.0, True), ("word_embeddings", 3, 3.0, False)]),
    "convnet": (ConvNet, [("^conv$", 2, 4.0, False), ("conv2|head", 3, 1.0, False)]),
}


def adapted(name: str, adapter: str = "default") -> tuple[nn.Module, nn.Module]:
    """A base model and a copy that carries ``adapter``, with random factors."""
    build, calls = MODELS[name]
    base = build()
    model = copy.deepcopy(base)
    for targets, r, alpha, rslora in calls:
        inject(model, targets, r=r, alpha=alpha, rslora=rslora, adapter=adapter)
    randomize(model)
    return base, model


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in MODELS])
def test_round_trip_into_fresh_model_is_exact(name, tmp_path):
    base, model = adapted(name)
    x = inputs(base)
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter.json", "adapter.safetensors"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert not torch.equal(outputs(loaded, x), outputs(base, x))
    saved, back = dict(named_loras(model)), dict(named_loras(loaded))
    assert saved.keys() == back.keys()
    for key, lora in saved.items():
        other = back[key]
        assert torch.equal(other.lora_A["default"], lora.lora_A["default"])
        assert torch.equal(other.lora_B["default"], lora.lora_B["default"])
        assert other.config == lora.config and other.scaling == lora.scaling
        assert (other.view, other.factored) == (lora.view, lora.factored)


def test_config_records_what_reinjection_needs(tmp_path):
    _, model = adapted("gpt2", adapter="task")
    save_adapter(model, tmp_path, adapter="task")
    config = json.loads((tmp_path / "adapter.json").read_text())
    assert (config["format"], config["version"], config["adapter"]) == ("lora_inject", li.__version__, "task")
    assert config["dtype"] == "float32" and sorted(config["targets"]) == ["c_attn|c_fc", "wpe"]
    loras = dict(named_loras(model))
    assert config["tensors"].keys() == loras.keys()
    for key, lora in loras.items():
        t, c = config["tensors"][key], lora.config["task"]
        assert (t["r"], t["alpha"], t["rslora"], t["targets"]) == (c["r"], c["alpha"], c["rslora"], c["targets"])
        assert t["shape"] == list(lora.view.shape)
        assert t["rule"] == {"transpose": lora.view.transpose, "experts": lora.view.experts, "factored": lora.factored}


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_every_layer_type(data):
    case = data.draw(st.sampled_from(sorted(CASES)).flatmap(lambda k: CASES[k]))
    base = copy.deepcopy(case.model)
    model = inject(case.model, case.targets, r=case.r, alpha=case.alpha, rules=case.rules)
    randomize(model)
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)
        loaded = load_adapter(base, d)
    with torch.no_grad():
        want, got = _flat(model(*case.args, **case.kwargs)), _flat(loaded(*case.args, **case.kwargs))
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert dict(named_loras(loaded)).keys() == dict(named_loras(model)).keys()


@pytest.mark.parametrize("weight, factors", [
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.float64, None, id="fp64"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-model-fp32-factors"),
])
def test_dtypes_survive(weight, factors, tmp_path):
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(weight)
    model = inject(copy.deepcopy(base), "", r=2, alpha=3.0, dtype=factors)
    randomize(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded[0].parametrizations.weight[0].lora_A["default"].dtype == (factors or weight)
    x = torch.randn(3, 6, dtype=weight)
    assert torch.equal(loaded(x), model(x))


def test_load_into_model_with_that_adapter_updates_in_place(tmp_path):
    base, model = adapted("llama")
    save_adapter(model, tmp_path)
    target = copy.deepcopy(base)
    for targets, r, alpha, rslora in MODELS["llama"][1]:
        inject(target, targets, r=r, alpha=alpha + 1, rslora=not rslora)
    randomize(target, std=1.0)
    ids = [id(p) for p in target.parameters()]
    assert load_adapter(target, tmp_path) is target
    assert [id(p) for p in target.parameters()] == ids
    x = inputs(base)
    assert torch.equal(outputs(target, x), outputs(model, x))
    for (key, lora), (_, other) in zip(named_loras(model), named_loras(target)):
        assert other.scaling == lora.scaling and other.config["default"]["alpha"] == lora.config["default"]["alpha"]


def test_load_under_another_name_keeps_the_first(tmp_path):
    base, model = adapted("bert")
    save_adapter(model, tmp_path)
    twice = load_adapter(load_adapter(copy.deepcopy(base), tmp_path), tmp_path, adapter="again")
    assert all(lora.adapters == ["default", "again"] for _, lora in named_loras(twice))
    x = inputs(base)
    li.activate(twice, "again")
    assert torch.equal(outputs(twice, x), outputs(model, x))


def test_interrupted_save_leaves_the_old_files(tmp_path, monkeypatch):
    base, model = adapted("gpt2")
    save_adapter(model, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    randomize(model)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    load_adapter(copy.deepcopy(base), tmp_path)


# -- bad input: a clear error, and the model unchanged ------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """(base, adapted model, directory) with a GPT-2 adapter saved in our format."""
    base, model = adapted("gpt2")
    save_adapter(model, tmp_path)
    return base, model, tmp_path


def _refused(model, path, error, match, **kwargs):
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, path, **kwargs)
    assert_unchanged(model, snap)


def test_truncated_weights_name_the_first_tensor_cut(saved):
    base, _, path = saved
    blob = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(blob[:-50])
    _refused(copy.deepcopy(base), path, ValueError,
             r"truncated or corrupt: `wpe\.weight\.lora_B` \(F32, shape \[16, 2\]\) needs bytes")


@pytest.mark.parametrize("damage", [
    pytest.param(lambda b: b[:5], id="shorter-than-header-size"),
    pytest.param(lambda b: b[:8] + b"#" * 40 + b[48:], id="garbled-header"),
    pytest.param(lambda b: (10**9).to_bytes(8, "little") + b[8:], id="header-size-too-big"),
])
def test_corrupt_weights(saved, damage):
    base, _, path = saved
    (path / "adapter.safetensors").write_bytes(damage((path / "adapter.safetensors").read_bytes()))
    _refused(copy.deepcopy(base), path, ValueError, r"adapter\.safetensors is truncated or corrupt")


def test_weights_from_another_save(saved):
    base, model, path = saved
    randomize(model)
    other = path / "other"
    save_adapter(model, other)
    (path / "adapter.safetensors").write_bytes((other / "adapter.safetensors").read_bytes())
    _refused(copy.deepcopy(base), path, ValueError, r"does not match .*adapter\.json \(sha256 differs\)")


@pytest.mark.parametrize("missing, match", [
    pytest.param("adapter.json", r"it has adapter\.safetensors but its config is missing", id="config"),
    pytest.param("adapter.safetensors", r"weights .*adapter\.safetensors are missing", id="weights"),
])
def test_missing_file(saved, missing, match):
    base, _, path = saved
    os.remove(path / missing)
    _refused(copy.deepcopy(base), path, ValueError, match)


def test_adapter_from_a_deeper_model_names_the_unknown_module(tmp_path):
    _, model = adapted("gpt2")
    deeper = gpt2(layers=3)
    inject(deeper, "c_attn", r=2)
    save_adapter(deeper, tmp_path)
    _refused(gpt2(layers=2), tmp_path, ValueError,
             r"has `h\.2\.attn\.c_attn\.weight`, but the model has no module `h\.2\.attn\.c_attn`")


def test_adapter_from_a_wider_model_names_both_shapes(saved):
    _, _, path = saved
    _refused(gpt2(width=24), path, ValueError,
             r"`wpe\.weight` has shape \(32, 24\) in the model but \(32, 16\) in the adapter")


def test_adapter_on_another_layer_type(tmp_path):
    model = inject(nn.Sequential(nn.Conv1d(4, 4, 1)), "0", r=2)
    save_adapter(model, tmp_path)
    _refused(nn.Sequential(nn.Linear(4, 4)), tmp_path, ValueError,
             r"`0\.weight` was saved from a Conv1d, but `0` is a Linear")


def _rewrite_weights(path, change):
    from safetensors.torch import load_file

    tensors = load_file(path / "adapter.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter.safetensors")


def test_integer_factors_cannot_be_loaded(saved):
    base, _, path = saved
    key = "h.0.attn.c_attn.weight.lora_A"
    _rewrite_weights(path, lambda t: t.update({key: torch.ones(4, 16, dtype=torch.int64)}))
    _refused(copy.deepcopy(base), path, TypeError,
             r"`h\.0\.attn\.c_attn\.weight\.lora_A` .* has dtype int64 and shape \[4, 16\]; LoRA factors must be")


def test_unknown_dtype_in_config_cannot_be_loaded(saved):
    base, _, path = saved
    config = json.loads((path / "adapter.json").read_text())
    config["dtype"] = "float7"
    (path / "adapter.json").write_text(json.dumps(config))
    _refused(copy.deepcopy(base), path, TypeError, r"factors' dtype is 'float7', which cannot be loaded")


def test_factor_with_wrong_shape(saved):
    base, _, path = saved
    config = json.loads((path / "adapter.json").read_text())
    _rewrite_weights(path, lambda t: t.update({"h.1.mlp.c_fc.weight.lora_B": torch.zeros(64, 3)}))
    config["sha256"] = __import__("hashlib").sha256((path / "adapter.safetensors").read_bytes()).hexdigest()
    (path / "adapter.json").write_text(json.dumps(config))
    _refused(copy.deepcopy(base), path, ValueError,
             r"`h\.1\.mlp\.c_fc\.weight\.lora_B` has shape \(64, 3\), but r=4 on `h\.1\.mlp\.c_fc\.weight` "
             r"of shape \(16, 64\) needs \(64, 4\)")


def test_in_place_with_another_rank(saved):
    base, _, path = saved
    target = copy.deepcopy(base)
    inject(target, "c_attn|c_fc", r=2)
    inject(target, "wpe", r=2)
    _refused(target, path, ValueError, r"`h\.0\.attn\.c_attn\.weight` has r=4 in the saved adapter, more than "
             r"the slot's r=2\. Nothing was loaded")


def test_in_place_on_other_tensors(saved):
    base, _, path = saved
    target = inject(copy.deepcopy(base), "c_proj", r=2)
    _refused(target, path, ValueError, r"adapter 'default' also covers `h\.0\.attn\.c_proj\.weight`")


def test_failure_while_injecting_rolls_back(tmp_path):
    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))

    model = inject(inject(net(), "^0$", r=2), "^1$", r=3)  # two inject calls when loading
    save_adapter(model, tmp_path)
    tied = net()
    tied[2].weight = tied[1].weight  # layer 1 now shares its weight with a user that has a parametrization
    parametrize.register_parametrization(tied[2], "weight", nn.Identity())  # of its own: the second call fails
    _refused(tied, tmp_path, ValueError, r"one tensor shared with `2\.weight`, which has a parametrization")


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda m, p: save_adapter(m, p, format="onnx"), ValueError, r"`format` must be one of", id="format"),
    pytest.param(lambda m, p: save_adapter(m, p, adapter="nope"), ValueError, r"no adapter named 'nope'",
                 id="no-adapter"),
    pytest.param(lambda m, p: save_adapter("model", p), TypeError, r"`model` must be an nn.Module", id="save-model"),
    pytest.param(lambda m, p: load_adapter(m, p / "adapter.json"), ValueError, r"which is not a directory",
                 id="path-file"),
    pytest.param(lambda m, p: load_adapter(m, p / "none"), ValueError, r"which is not a directory", id="no-path"),
    pytest.param(lambda m, p: load_adapter(m, p, adapter="a-b"), ValueError, r"must be a Python identifier",
                 id="adapter-name"),
    pytest.param(lambda m, p: load_adapter(None, p), TypeError, r"`model` must be an nn.Module", id="load-model"),
    pytest.param(lambda m, p: load_adapter(m, p, adapter=1), TypeError, r"`adapter` must be a str, got int",
                 id="load-adapter-kind"),
    pytest.param(lambda m, p: save_adapter(m, p, adapter=1), TypeError, r"`adapter` must be a str, got int",
                 id="save-adapter-kind"),
])
def test_bad_arguments(saved, call, error, match):
    _, model, path = saved
    with pytest.raises(error, match=match):
        call(model, path)


def test_empty_directory(tmp_path):
    _refused(gpt2(), tmp_path, ValueError, r"it holds no adapter files")


def _saved_square(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4))
    li.inject(model, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    li.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _edit(path, change, *, redigest=True):
    file = path / "adapter.json"
    config = json.loads(file.read_text())
    change(config)
    if redigest:  # as a careful hand edit would: the digest then no longer catches it
        from lora_inject.io._ours import config_digest

        config["config_sha256"] = config_digest(config)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, must", [
    ("rslora", "false", "true or false"),
    ("dora", 0, "true or false"),
    ("r", 2.0, "a positive int"),
    ("alpha", "2", "a finite number"),
    ("dropout", 1.5, r"a number in \[0, 1\)"),
    ("init", "svd", "one of"),
    ("shape", [4, "4"], "a list of non-negative ints"),
    ("rule", {"transpose": "no", "experts": False, "factored": True}, "an object of three bools"),
])
def test_hand_edited_fields_are_refused_by_type_and_value(tmp_path, field, value, must):
    path = _saved_square(tmp_path)
    _edit(path, lambda c: c["tensors"]["0.weight"].__setitem__(field, value))
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4))
    with pytest.raises(ValueError, match=rf'"{field}" of `0.weight` in .*adapter.json must be {must}'):
        li.load_adapter(model, path)
    assert not hasattr(model[0], "parametrizations")


def test_a_flipped_transpose_on_a_square_weight_is_refused(tmp_path):
    path = _saved_square(tmp_path)
    _edit(path, lambda c: c["tensors"]["1.weight"]["rule"].__setitem__("transpose", False))
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4))
    with pytest.raises(ValueError, match=r"`1.weight` was saved with transpose=False.*rule for Embedding says "
                                         r"transpose=True"):
        li.load_adapter(model, path)
    assert not hasattr(model[0], "parametrizations")


def test_the_config_digest_catches_an_edit_of_the_config(tmp_path):
    path = _saved_square(tmp_path)
    _edit(path, lambda c: c["tensors"]["0.weight"].__setitem__("alpha", 7.0), redigest=False)
    with pytest.raises(ValueError, match=r"adapter.json does not match its own config_sha256"):
        li.load_adapter(nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4)), path)
