"""Adapters on disk at the edges: one adapter per directory whatever the format, models behind
compile's and other wrappers, arguments of the wrong kind, and peft's format where peft itself is
unusual (integer buffers, an exact target beside a layer filter, a MultiheadAttention copied whole).
peft is the oracle wherever its format is involved."""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from functools import partial

import peft
import pytest
import torch
from _helpers import assert_unchanged, snapshot
from _models import llama
from safetensors.torch import load_file
from torch import nn

import lora_inject as li
from lora_inject import inject, load_adapter, named_loras, save_adapter
from lora_inject.io import _files as files

FORMATS = ["lora_inject", "peft"]
OTHER = {"lora_inject": "peft", "peft": "lora_inject"}
FILES = {"lora_inject": ["adapter.json", "adapter.safetensors"],
         "peft": ["adapter_config.json", "adapter_model.safetensors"]}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Wrapper(nn.Module):
    """A wrapper that only adds a prefix, under any attribute name (DDP's is ``module``)."""

    def __init__(self, inner: nn.Module, name: str = "module") -> None:
        super().__init__()
        self.add_module(name, inner)
        self.name = name

    def forward(self, x):
        return getattr(self, self.name)(x)


def base() -> Net:
    torch.manual_seed(0)
    return Net().double()


def adapted(seed: int) -> Net:
    """The base with adapter ``default`` on fc1 and fc2, its factors drawn from ``seed``."""
    model = inject(base(), ["fc1", "fc2"], r=2, alpha=4.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, lora in named_loras(model):
            for p in [*lora.lora_A.values(), *lora.lora_B.values()]:
                p.normal_(0, 0.5)
    return model


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


X = torch.randn(3, 6, dtype=torch.float64)


# -- one adapter per directory -------------------------------------------------------------------
@pytest.mark.parametrize("first", FORMATS)
def test_a_save_over_the_other_format_leaves_only_the_new_adapter(first, tmp_path):
    old, new = adapted(1), adapted(2)
    save_adapter(old, tmp_path, format=first)
    save_adapter(new, tmp_path, format=OTHER[first])
    assert sorted(os.listdir(tmp_path)) == FILES[OTHER[first]]
    torch.testing.assert_close(run(load_adapter(base(), tmp_path), X), run(new, X), rtol=0, atol=1e-12)
    if OTHER[first] == "peft":  # and peft reads the same adapter
        theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path)).eval()
        torch.testing.assert_close(run(theirs, X), run(new, X))


@pytest.mark.parametrize("first", FORMATS)
def test_a_directory_holding_two_adapters_is_refused_naming_both(first, tmp_path):
    (tmp_path / "both").mkdir()
    for fmt, seed in ((first, 1), (OTHER[first], 2)):  # two saves, put together by hand
        save_adapter(adapted(seed), tmp_path / fmt, format=fmt)
        for f in FILES[fmt]:
            shutil.copy(tmp_path / fmt / f, tmp_path / "both" / f)
    model = base()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"two adapters: adapter\.json \+ adapter\.safetensors .* "
                                         r"adapter_config\.json \+ adapter_model\.safetensors .*Delete the files"):
        load_adapter(model, tmp_path / "both")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("first", FORMATS)
def test_a_failed_save_keeps_the_adapter_already_there(first, tmp_path, monkeypatch):
    old = adapted(1)
    save_adapter(old, tmp_path, format=first)
    real = files.write_atomic

    def fail_on_config(file, data):
        if file.endswith(".json"):
            raise OSError("disk full")
        real(file, data)

    monkeypatch.setattr("lora_inject.io.write_atomic", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted(2), tmp_path, format=OTHER[first])
    torch.testing.assert_close(run(load_adapter(base(), tmp_path), X), run(old, X), rtol=0, atol=1e-12)


# -- compiled and wrapped models -----------------------------------------------------------------
def compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


WRAPS = {
    "plain": lambda m: m,
    "compiled": compiled,
    "ddp-like": Wrapper,
    "compiled-ddp-like": lambda m: compiled(Wrapper(m)),
    "wrapper-of-another-name": lambda m: Wrapper(m, "net"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("into", list(WRAPS))
@pytest.mark.parametrize("source", list(WRAPS))
def test_save_and_load_see_through_wrappers(source, into, fmt, tmp_path):
    model = adapted(1)
    want = run(model, X)
    save_adapter(WRAPS[source](model), tmp_path, format=fmt)
    if fmt == "peft" and source != "wrapper-of-another-name":  # peft reads it into the bare model
        theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path)).eval()
        torch.testing.assert_close(run(theirs, X), want)
    plain = base()
    target = WRAPS[into](plain)
    if fmt == "peft" and source == "wrapper-of-another-name" and into != source:
        # peft's keys name the wrapper's child as a real module, as peft itself saves it
        snap = snapshot(plain)
        with pytest.raises(ValueError, match=r"no module `net\.fc1`"):
            load_adapter(target, tmp_path)
        assert_unchanged(plain, snap)
        return
    assert load_adapter(target, tmp_path) is target
    torch.testing.assert_close(run(target, X), want, rtol=0, atol=1e-12)
    assert sorted(k for k, _ in named_loras(plain)) == ["fc1.weight", "fc2.weight"]


def test_an_adapter_from_a_compiled_model_has_the_plain_paths(tmp_path):
    save_adapter(compiled(adapted(1)), tmp_path)
    save_adapter(compiled(adapted(1)), tmp_path / "peft", format="peft")
    assert sorted(load_file(tmp_path / "adapter.safetensors")) == [
        "fc1.weight.lora_A", "fc1.weight.lora_B", "fc2.weight.lora_A", "fc2.weight.lora_B"]
    assert all(k.startswith("base_model.model.fc") for k in load_file(tmp_path / "peft/adapter_model.safetensors"))


def test_a_swap_into_a_compiled_model_updates_its_adapter_in_place(tmp_path):
    save_adapter(adapted(2), tmp_path)
    model = adapted(1)
    params = [id(p) for p in model.parameters()]
    c = compiled(model)
    load_adapter(c, tmp_path)
    assert [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(run(c, X), run(adapted(2), X), rtol=0, atol=1e-12)


def test_a_real_name_is_kept_where_the_paths_fit(tmp_path):
    """A single child with a real name (``Net.body``) is not a wrapper to strip: the saved paths fit
    the model as they are, and the body's own ``fc1`` is not confused with the model's."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 8)  # the same name and shape as the body's, at the top
            self.body = Net()

        def forward(self, x):
            return self.body(x) + self.fc1(x)[:, :4]

    torch.manual_seed(0)
    model = Outer().double()
    inject(model, "body.fc1", r=2)
    with torch.no_grad():
        model.body.fc1.parametrizations.weight[0].lora_B["default"].normal_()
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = Outer().double()
    load_adapter(fresh, tmp_path)
    assert [k for k, _ in named_loras(fresh)] == ["body.fc1.weight"]
    torch.testing.assert_close(run(fresh, X), run(model, X), rtol=0, atol=1e-12)


# -- arguments of the wrong kind -----------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    pytest.param(lambda m, d: load_adapter(m, None), r"load_adapter\(\): `path` must be a str or os\.PathLike",
                 id="load-path-none"),
    pytest.param(lambda m, d: load_adapter(m, 3), r"load_adapter\(\): `path` .*got int", id="load-path-int"),
    pytest.param(lambda m, d: load_adapter(m, os.fsencode(d)), r"load_adapter\(\): `path` .*got bytes",
                 id="load-path-bytes"),
    pytest.param(lambda m, d: load_adapter(None, d), r"load_adapter\(\): `model` must be an nn\.Module",
                 id="load-model-none"),
    pytest.param(lambda m, d: load_adapter(m, d, adapter=1), r"load_adapter\(\): `adapter` must be a str",
                 id="load-adapter-int"),
    pytest.param(lambda m, d: load_adapter(m, d, dtype="float32"), r"load_adapter\(\): `dtype` must be",
                 id="load-dtype-str"),
    pytest.param(lambda m, d: save_adapter(m, None), r"save_adapter\(\): `path` must be a str or os\.PathLike",
                 id="save-path-none"),
    pytest.param(lambda m, d: save_adapter(m, os.fsencode(d) + b"x"), r"save_adapter\(\): `path` .*got bytes",
                 id="save-path-bytes"),
    pytest.param(lambda m, d: save_adapter(m, d / "x", format=["peft"]),
                 r"save_adapter\(\): `format` must be a str, one of .*got list", id="save-format-list"),
    pytest.param(lambda m, d: save_adapter(m, d / "x", adapter=None), r"save_adapter\(\): `adapter` must be a str",
                 id="save-adapter-none"),
    pytest.param(lambda m, d: save_adapter("model", d / "x"), r"save_adapter\(\): `model` must be an nn\.Module",
                 id="save-model-str"),
])
def test_an_argument_of_the_wrong_kind_is_named(call, match, tmp_path):
    model = adapted(1)
    save_adapter(model, tmp_path)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=match):
        call(model, tmp_path)
    assert_unchanged(model, snap)
    assert not (tmp_path / "x").exists()


def test_an_empty_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"load_adapter\(\): `path` must name a directory, got an empty string"):
        load_adapter(base(), "")


# -- peft's format at the edges ------------------------------------------------------------------
class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.bn(self.lin(x)))


def peft_saved(build, config: dict, path, train_steps: int = 0):
    """(base, peft model) with every trainable tensor random (and buffers moved by ``train_steps``
    forwards in train mode), saved by peft to ``path``."""
    torch.manual_seed(0)
    plain = build().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # peft notes that it saves a targeted lm_head whole
        theirs = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**config))
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.3)
        theirs.train()
        for _ in range(train_steps):
            theirs(torch.randn(8, 4))
        theirs.eval().save_pretrained(path)
    return plain, theirs


@pytest.mark.parametrize("steps", [0, 3])
def test_a_batchnorm_in_modules_to_save_is_carried_both_ways(steps, tmp_path):
    plain, theirs = peft_saved(Normed, dict(r=2, target_modules=["lin"], modules_to_save=["bn"]),
                               tmp_path / "peft", train_steps=steps)
    saved = load_file(tmp_path / "peft/adapter_model.safetensors")
    counter = saved["base_model.model.bn.num_batches_tracked"]
    assert counter.dtype == torch.int64 and int(counter) == steps
    x = torch.randn(5, 4)
    ours = load_adapter(copy.deepcopy(plain), tmp_path / "peft")
    torch.testing.assert_close(run(ours, x), run(theirs, x))
    assert torch.equal(ours.bn.num_batches_tracked, counter)  # copied exactly, not an update
    assert not any(k.startswith("bn.num_batches") for k, _ in named_loras(ours))
    save_adapter(ours, tmp_path / "back", format="peft")
    back = load_file(tmp_path / "back/adapter_model.safetensors")
    assert back["base_model.model.bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(back["base_model.model.bn.num_batches_tracked"], counter)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "back")).eval()
    torch.testing.assert_close(run(again, x), run(theirs, x))


def test_an_integer_factor_is_still_refused(tmp_path):
    plain, _ = peft_saved(Normed, dict(r=2, target_modules=["lin"]), tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved["base_model.model.lin.lora_A.weight"] = saved["base_model.model.lin.lora_A.weight"].long()
    from safetensors.torch import save_file
    save_file(saved, tmp_path / "adapter_model.safetensors")
    snap = snapshot(plain)
    with pytest.raises(TypeError, match=r"`base_model\.model\.lin\.lora_A\.weight` .* int64; LoRA factors must"):
        load_adapter(plain, tmp_path)
    assert_unchanged(plain, snap)


def test_an_exact_target_is_taken_beside_layers_to_transform_as_peft_does(tmp_path):
    config = dict(r=2, target_modules=["q_proj", "lm_head"], layers_to_transform=[1], layers_pattern="layers")
    tiny_llama = partial(llama, head=True, width=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40)  # vocabulary 40, as x below
    plain, theirs = peft_saved(tiny_llama, config, tmp_path / "peft")
    keys = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert "base_model.model.lm_head.lora_A.weight" in keys  # peft took lm_head despite the layer filter
    assert not any(".layers.0." in k for k in keys)
    x = torch.randint(0, 40, (2, 5))
    ours = load_adapter(copy.deepcopy(plain), tmp_path / "peft")
    assert sorted(k for k, _ in named_loras(ours)) == ["lm_head.weight", "model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(run(ours, x).logits, run(theirs, x).logits)
    save_adapter(ours, tmp_path / "back", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "back")).eval()
    torch.testing.assert_close(run(again, x).logits, run(theirs, x).logits)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.mha(x, x, x, need_weights=False)[0])


def test_a_multiheadattention_in_modules_to_save_is_written_back_as_peft_wrote_it(tmp_path):
    plain, theirs = peft_saved(Attention, dict(r=2, target_modules=["lin"], modules_to_save=["mha"]),
                               tmp_path / "peft")
    x = torch.randn(5, 2, 8)
    ours = load_adapter(copy.deepcopy(plain), tmp_path / "peft")
    torch.testing.assert_close(run(ours, x), run(theirs, x))
    save_adapter(ours, tmp_path / "back", format="peft")
    import json
    written = json.loads((tmp_path / "back/adapter_config.json").read_text())
    assert written["modules_to_save"] == ["mha"]
    assert sorted(load_file(tmp_path / "back/adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft/adapter_model.safetensors"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "back")).eval()
    torch.testing.assert_close(run(again, x), run(theirs, x))
    li.remove(ours, merge=False)
    torch.testing.assert_close(run(ours, x), run(plain, x), rtol=0, atol=0)
