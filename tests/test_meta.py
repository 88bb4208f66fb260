"""Models built on the meta device: inject allocates nothing; to_empty, base weights, init_lora."""

from __future__ import annotations

import math

import pytest
import torch
from _models import llama
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora_inject as li

TARGETS = r"(q|k|v|o|gate|up|down)_proj"


class Allocations(TorchDispatchMode):
    """Count the bytes of every tensor an op returns on a device other than meta."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and not t.is_meta:
                self.bytes += t.untyped_storage().nbytes()
                self.ops.add(str(func))
        return out


def test_allocation_counter_sees_real_tensors():
    with Allocations() as seen:
        nn.Linear(8, 8)
    assert seen.bytes >= 8 * 8 * 4


def test_inject_into_a_llama_2_7b_shape_on_meta_allocates_nothing():
    layers, hidden, inter, r = 32, 4096, 11008, 16
    with torch.device("meta"):
        model = llama(head=True, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096)
    with Allocations() as seen:
        li.inject(model, TARGETS, r=r, alpha=2 * r)
    assert seen.bytes == 0, seen.ops
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    # q, k, v, o: (4096 -> 4096); gate, up: (4096 -> 11008); down: (11008 -> 4096)
    assert sum(p.numel() for p in li.lora_parameters(model)) == layers * r * (4 * 2 * hidden + 3 * (hidden + inter))
    assert len(list(li.named_loras(model))) == 7 * layers


@pytest.mark.slow
def test_to_empty_base_weights_and_init_lora_give_the_base_model_then_train():
    base = llama(head=True).double()
    with torch.device("meta"):
        model = llama(head=True).double()
    li.inject(model, TARGETS, r=4, alpha=8)
    model.to_empty(device="cpu")
    result = model.load_state_dict(base.state_dict(), strict=False)  # keys saved before injection
    lora_keys = set(li.lora_state_dict(model))
    assert set(result.missing_keys) == lora_keys and len(lora_keys) == 2 * 7 * 2
    assert result.unexpected_keys == []
    for name, buffer in base.named_buffers():  # not in a state dict (rotary inv_freq): set by hand
        model.get_buffer(name).copy_(buffer)
    assert li.init_lora(model) is model

    for name, lora in li.named_loras(model):
        A, B = lora.lora_A["default"], lora.lora_B["default"]
        assert torch.equal(B, torch.zeros_like(B))
        assert A.abs().max() <= 1 / math.sqrt(A.shape[1]) and A.abs().min() > 0  # Kaiming-uniform
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)

    originals = [n.removesuffix(".weight") + ".parametrizations.weight.original" for n, _ in li.named_loras(model)]
    w0 = {n: model.get_parameter(n).clone() for n in originals}
    li.mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(model.get_parameter(n), w) for n, w in w0.items())
    assert all(lora.lora_B["default"].abs().max() > 0 for _, lora in li.named_loras(model))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_lora_uses_each_adapters_init_or_the_one_given(init):
    model = nn.Sequential(nn.Linear(256, 8), nn.Linear(256, 8))
    li.inject(model, "0", r=4, init="gaussian", adapter="g")
    li.inject(model, "1", r=4, adapter="d")
    for p in li.lora_parameters(model):
        nn.init.constant_(p, 7.0)
    li.init_lora(model, adapter="g", init=init if init == "default" else None)
    (g,), (d,) = (lora for _, lora in li.named_loras(model[0])), (lora for _, lora in li.named_loras(model[1]))
    A = g.lora_A["g"]
    assert torch.equal(g.lora_B["g"], torch.zeros(8, 4))
    if init == "gaussian":  # N(0, 1/r): std 0.25 over 1024 samples
        assert A.abs().max() > 1 / 16 and abs(A.std().item() - 0.25) < 0.03
    else:  # Kaiming-uniform: within 1/sqrt(in) = 1/16
        assert A.abs().max() <= 1 / 16
    assert torch.equal(d.lora_A["d"], torch.full((4, 256), 7.0))  # not selected: untouched
    li.init_lora(model)
    assert torch.equal(d.lora_B["d"], torch.zeros(8, 4)) and d.lora_A["d"].abs().max() <= 1 / 16


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(init="pissa"), id="pissa"),
    pytest.param(dict(init="olora"), id="olora"),
    pytest.param(dict(dora=True), id="dora"),
    pytest.param(dict(init="pissa", dora=True), id="pissa-dora"),
])
def test_init_lora_redoes_the_inits_that_read_w0_after_the_base_weights_load(kwargs):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Conv1d(6, 4, 3)).double()

    eager = li.inject(build(), "", r=2, alpha=4, **kwargs)
    with torch.device("meta"):
        model = build()
    li.inject(model, "", r=2, alpha=4, **kwargs)
    model.to_empty(device="cpu")
    model.load_state_dict(build().state_dict(), strict=False)
    li.init_lora(model)
    want, got = li.lora_state_dict(eager), li.lora_state_dict(model)
    assert want.keys() == got.keys() and len(want) > 4  # the frozen copies or magnitudes are there
    kinds = {k.split(".")[-2] for k in want}
    assert kinds == {"lora_A", "lora_B"} | ({"lora_A0", "lora_B0"} if "init" in kwargs else set()) | (
        {"lora_magnitude"} if "dora" in kwargs else set())
    torch.testing.assert_close(got, want)
    for layer, x in ((0, torch.randn(3, 8)), (2, torch.randn(2, 6, 5))):
        x = x.double()
        torch.testing.assert_close(model[layer](x), eager[layer](x))
        with li.disabled(model):
            base = model[layer](x)
        torch.testing.assert_close(model[layer](x), base)  # unchanged at init


def test_init_lora_refuses_meta_tensors_and_bad_arguments_and_changes_nothing():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    li.inject(model, "", r=2)
    with pytest.raises(RuntimeError, match=r"init_lora\(\): .* meta device.*to_empty"):
        li.init_lora(model)
    model.to_empty(device="cpu")
    for p in li.lora_parameters(model):
        nn.init.constant_(p, 3.0)
    before = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"init_lora\(\): `init` must be one of .* got 'pissa'"):
        li.init_lora(model, init="pissa")
    with pytest.raises(ValueError, match=r"init_lora\(\): no adapter named 'nope'"):
        li.init_lora(model, adapter="nope")
    with pytest.raises(TypeError, match=r"init_lora\(\): `adapter` must be"):
        li.init_lora(model, adapter=3)
    lora = model[1].parametrizations.weight[0]
    lora.adapter("default").init = "bogus"  # as if loaded from a file with an unknown init
    with pytest.raises(ValueError, match=r"init_lora\(\): adapter 'default' on `1.weight` was made with "
                                         r"init='bogus'.*Pass `init=`"):
        li.init_lora(model)
    lora.adapter("default").init = "default"
    lora.add_module("lora_extra", nn.ParameterDict({"default": nn.Parameter(torch.ones(4))}))
    with pytest.raises(ValueError, match=r"init_lora\(\): adapter 'default' on `1.weight` also holds "
                                         r"\['lora_extra'\], which init_lora does not know"):
        li.init_lora(model)
    del lora.lora_extra
    after = li.lora_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    li.init_lora(model, init="default")
    assert all(torch.equal(lora.lora_B["default"], torch.zeros(4, 2)) for _, lora in li.named_loras(model))


def test_init_lora_keeps_a_pissa_adapters_own_init():
    model = li.inject(nn.Linear(6, 4), "", r=2, init="pissa")
    with pytest.raises(ValueError, match=r"init='pissa', which init_lora cannot replace.*Leave `init=None`"):
        li.init_lora(model, init="gaussian")
    with torch.device("meta"):
        meta = li.inject(nn.Linear(6, 4), "", r=2, init="pissa")
    meta.parametrizations.weight[0].to_empty(device="cpu")  # the factors are real, W0 is still meta
    with pytest.raises(RuntimeError, match=r"init_lora\(\): adapter 'default' on `weight` is on the meta"):
        li.init_lora(meta)


def _stack() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _trained_adapted(**kwargs) -> nn.Module:
    model = li.inject(_stack(), "", r=2, alpha=8, **kwargs)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    return model


@pytest.mark.parametrize("adapter_kwargs", [{}, {"dora": True}, {"rslora": True}])
def test_meta_build_then_assign_load_gives_real_scalings_that_move_and_compile(adapter_kwargs):
    real = _trained_adapted(**adapter_kwargs)
    with torch.device("meta"):
        model = _stack()
    li.inject(model, "", r=2, alpha=8, **adapter_kwargs)
    model.load_state_dict(real.state_dict(), assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])  # was: scale_* on meta
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), real(x), rtol=0, atol=0)
    model.to(torch.float64)  # was: "Cannot copy out of meta tensor"
    torch.testing.assert_close(model(x.double()), real.double()(x.double()))
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x.double()), model(x.double()))


def test_inject_on_meta_then_to_empty_and_load_gives_the_adapted_model():
    real = _trained_adapted()
    with torch.device("meta"):
        model = _stack()
    li.inject(model, "", r=2, alpha=8)
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), real(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind, kw", [("lora", dict(r=2)), ("loha", dict(r=2)), ("lokr", dict(r=2)),
                                      ("oft", dict(oft_block_size=2)), ("ia3", {}), ("vera", dict(r=2))])
@pytest.mark.parametrize("layer", ["linear", "embedding"])
def test_every_kind_runs_a_forward_on_meta(kind, kw, layer):
    """Shapes only, as a model is traced on meta before it is materialised."""
    with torch.device("meta"):
        module = nn.Linear(8, 8) if layer == "linear" else nn.Embedding(10, 8)
        li.inject(module, "", kind=kind, **kw)
        x = torch.randn(3, 8) if layer == "linear" else torch.zeros(3, dtype=torch.long)
        out = module(x)
    assert out.is_meta and out.shape == (3, 8)
