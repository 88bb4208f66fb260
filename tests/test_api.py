"""The public API's semantics: atomicity, named adapters, merging, state dicts, and what survives."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_unchanged, randomize, snapshot
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm

import lora_inject as li
from lora_inject import LoRA

# -- helpers ---------------------------------------------------------------------------------


def mlp(dtype=torch.float64) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(6, 5), act=nn.ReLU(), norm=nn.LayerNorm(5), fc2=nn.Linear(5, 4),
        fc3=nn.Linear(4, 3, bias=False),
    )).to(dtype)


def adapted(model: nn.Module) -> set[str]:
    return {name for name, _ in li.named_loras(model)}


def lora_of(module: nn.Module, tensor: str = "weight") -> LoRA:
    return next(p for p in module.parametrizations[tensor] if isinstance(p, LoRA))


def delta(lora: LoRA, name: str) -> torch.Tensor:
    """The update of adapter ``name`` in float64, computed here for a Linear weight (out, in)."""
    A, B = lora.lora_A[name].double(), lora.lora_B[name].double()
    return lora.config[name]["alpha"] / lora.config[name]["r"] * (B @ A)


# -- atomicity ---------------------------------------------------------------------------------

class Boom(Exception):
    pass


def fail_in_rule(model, monkeypatch):
    """A rule whose per-module `factored` callable raises for the last matched module, fc3."""
    state = {}

    def factored(module):
        if module is model.fc3:
            state["b"] = sum("b" in lo.adapters for _, lo in li.named_loras(model))
            raise Boom
        return True

    rules = li.default_rules()
    rules[nn.Linear] = li.Rule(("weight",), factored=factored)
    return {"rules": rules}, state


def fail_in_add(model, monkeypatch):
    """``LoRA.add`` raises KeyboardInterrupt (a BaseException) for fc3."""
    state = {}
    real = LoRA.add

    def add(self, *args, **kwargs):
        if self.view.shape == tuple(model.fc3.weight.shape):
            state["b"] = sum("b" in lo.adapters for _, lo in li.named_loras(model))
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRA, "add", add)
    return {}, state


def fail_after_register(model, monkeypatch):
    """``register_parametrization`` registers LoRA on fc3, then raises."""
    state = {}
    real = parametrize.register_parametrization

    def register(module, tensor_name, p, *args, **kwargs):
        out = real(module, tensor_name, p, *args, **kwargs)
        if module is model.fc3:
            state["b"] = sum("b" in lo.adapters for _, lo in li.named_loras(model))
            raise Boom
        return out

    monkeypatch.setattr(parametrize, "register_parametrization", register)
    return {}, state


@pytest.mark.parametrize("fail", [
    pytest.param(fail_in_rule, id="rule-raises"),
    pytest.param(fail_in_add, id="keyboard-interrupt"),
    pytest.param(fail_after_register, id="after-register"),
])
@pytest.mark.parametrize("first", [None, "a"], ids=["fresh", "second-adapter"])
def test_inject_failing_halfway_leaves_model_exactly_as_before(fail, first, monkeypatch):
    model = mlp()
    weight_norm(model.fc2)  # a parametrization that is not ours must come through too
    if first is not None:
        li.inject(model, "fc1", adapter=first, r=2)  # fc1 then gets a second adapter
        randomize(model, std=0.5, every=True)
    before = snapshot(model)
    x = torch.randn(3, 6, dtype=torch.float64)
    out = model(x)
    kwargs, state = fail(model, monkeypatch)
    with pytest.raises((Boom, KeyboardInterrupt)):
        li.inject(model, "fc", adapter="b", r=2, **kwargs)
    monkeypatch.undo()
    assert state["b"] >= 2  # it failed halfway: fc1 and fc2 had adapter "b" by then
    assert_unchanged(model, before)
    assert torch.equal(model(x), out)
    assert not hasattr(model.fc3, "parametrizations")


# -- named adapters ----------------------------------------------------------------------------

def two_adapters():
    model = mlp()
    li.inject(model, "fc", adapter="a", r=2, alpha=3.0)
    li.inject(model, "fc1", adapter="b", r=3, alpha=1.5)
    randomize(model, std=0.5, every=True)
    return model


def test_duplicate_adapter_name_raises_and_leaves_model_unchanged():
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter 'b' already exists on `fc1\.weight`"):
        li.inject(model, "fc", adapter="b")  # fc2 and fc3 would take it, fc1 has it
    assert_unchanged(model, before)


@pytest.mark.parametrize("factored", [True, False], ids=["factored", "merged"])
def test_two_adapters_add(factored):
    model = two_adapters()
    lora = lora_of(model.fc1)
    lora.factored = factored
    assert lora.active == ["a", "b"]
    W0 = model.fc1.parametrizations.weight.original.detach()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = F.linear(x, W0 + delta(lora, "a") + delta(lora, "b"), model.fc1.bias)
    torch.testing.assert_close(model.fc1(x), expected)


def test_activate_chooses_adapters():
    model = two_adapters()
    x = torch.randn(4, 6, dtype=torch.float64)
    lora = lora_of(model.fc1)
    W0 = model.fc1.parametrizations.weight.original.detach().clone()
    base = F.linear(x, W0, model.fc1.bias)
    for names, deltas in [("b", ["b"]), (["a"], ["a"]), (("a", "b"), ["a", "b"]), ([], [])]:
        assert li.activate(model, names) is model
        assert lora.active == deltas
        expected = F.linear(x, W0 + sum((delta(lora, n) for n in deltas), torch.zeros_like(W0)),
                            model.fc1.bias)
        torch.testing.assert_close(model.fc1(x), expected)
    assert torch.equal(model.fc1(x), base)
    li.activate(model, "b")  # "b" lives on fc1 only: the others go inactive
    assert [(n, lo.active) for n, lo in li.named_loras(model)] == [
        ("fc1.weight", ["b"]), ("fc2.weight", []), ("fc3.weight", [])]


def test_disabled_restores_each_adapters_state_is_exception_safe_and_nests():
    model = two_adapters()
    x = torch.randn(4, 6, dtype=torch.float64)
    lora_of(model.fc1).active = ["b"]
    lora_of(model.fc2).active = []
    states = [(n, list(lo.active)) for n, lo in li.named_loras(model)]
    assert states == [("fc1.weight", ["b"]), ("fc2.weight", []), ("fc3.weight", ["a"])]
    out = model(x)
    with li.disabled(model) as m:
        assert m is model
        base = model(x)
        assert all(lo.active == [] for _, lo in li.named_loras(model))
        with li.disabled(model):
            assert torch.equal(model(x), base)
        assert all(lo.active == [] for _, lo in li.named_loras(model))  # the inner exit keeps it off
        assert torch.equal(model(x), base)
    assert [(n, lo.active) for n, lo in li.named_loras(model)] == states
    assert torch.equal(model(x), out)
    with pytest.raises(Boom):
        with li.disabled(model):
            raise Boom
    assert [(n, lo.active) for n, lo in li.named_loras(model)] == states
    li.remove(model, merge=False)
    assert torch.equal(model(x), base)  # disabled gave exactly the base model


@pytest.mark.parametrize("merge", [False, True])
def test_remove_one_adapter_leaves_the_other(merge):
    model = two_adapters()
    x = torch.randn(4, 6, dtype=torch.float64)
    lora = lora_of(model.fc1)
    W0 = model.fc1.parametrizations.weight.original.detach().clone()
    d_a, d_b = delta(lora, "a"), delta(lora, "b")
    li.remove(model, adapter="a", merge=merge)
    assert adapted(model) == {"fc1.weight"}  # fc2 and fc3 had only "a"
    assert type(model.fc2) is nn.Linear and type(model.fc3) is nn.Linear
    assert lora.adapters == ["b"] and lora.active == ["b"]
    assert [k for k in model.state_dict() if "lora_" in k] == [
        "fc1.parametrizations.weight.0.lora_A.b", "fc1.parametrizations.weight.0.lora_B.b"]
    W = W0 + d_a if merge else W0
    torch.testing.assert_close(model.fc1.parametrizations.weight.original, W)
    torch.testing.assert_close(model.fc1(x), F.linear(x, W + d_b, model.fc1.bias))


def test_merge_discards_inactive_adapters():
    model = two_adapters()
    lora = lora_of(model.fc1)
    W0 = model.fc1.parametrizations.weight.original.detach().clone()
    expected = W0 + delta(lora, "a")
    li.activate(model, "a")
    li.remove(model, merge=True)
    assert type(model.fc1) is nn.Linear
    torch.testing.assert_close(model.fc1.weight, expected)


# -- merge precision and refusal ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_is_summed_in_float32(dtype):
    model = nn.Sequential(nn.Linear(32, 16)).to(dtype)
    W0 = model[0].weight.detach().clone()
    li.inject(model, "0", r=4, alpha=8)
    lora = lora_of(model[0])
    with torch.no_grad():
        lora.lora_A["default"].normal_(0, 1)
        lora.lora_B["default"].normal_(0, 1e-3)
    A, B = lora.lora_A["default"].float(), lora.lora_B["default"].float()
    expected = (W0.float() + (B @ A) * 2.0).to(dtype)
    naive = W0 + ((B @ A) * 2.0).to(dtype)  # summed in the half dtype: rounds twice
    assert not torch.equal(naive, expected)  # the data tells the two apart
    assert torch.equal(model[0].weight, expected)  # the weight read while attached
    li.remove(model, merge=True)
    assert torch.equal(model[0].weight, expected)


def test_merge_refuses_non_finite_and_leaves_model_unchanged():
    model = mlp()
    li.inject(model, "fc", r=2)
    randomize(model, std=0.5, every=True)
    with torch.no_grad():
        lora_of(model.fc3).lora_B["default"][0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"remove\(\): merging adapter\(s\) \['default'\] into `fc3\.weight` "
                                         r"gives non-finite values"):
        li.remove(model, merge=True)
    assert_unchanged(model, before)  # fc1 and fc2, checked first, were not merged either
    li.remove(model, merge=False)
    assert type(model.fc3) is nn.Linear


def test_merge_refuses_half_precision_overflow():
    model = nn.Sequential(nn.Linear(2, 2)).half()
    with torch.no_grad():
        model[0].weight.fill_(60000.0)
    li.inject(model, "0", r=1)
    with torch.no_grad():
        lora_of(model[0]).lora_A["default"].fill_(100.0)
        lora_of(model[0]).lora_B["default"].fill_(100.0)  # 60000 + 1e4 > fp16 max
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`0\.weight` gives non-finite values.*overflow"):
        li.remove(model, merge=True)
    assert_unchanged(model, before)


# -- identity, order and foreign parametrizations ------------------------------------------------

@pytest.mark.parametrize("merge", [False, True])
def test_remove_keeps_parameter_objects_so_an_optimizer_stays_valid(merge):
    model = mlp()
    params = list(model.named_parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    li.inject(model, "", r=2)
    assert model.fc1.parametrizations.weight.original is params[0][1]  # W0 is fc1.weight itself
    randomize(model, std=0.5, every=True)
    li.remove(model, merge=merge)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in params]
    assert all(p is p0 for (_, p), (_, p0) in zip(model.named_parameters(), params))
    assert list(model.state_dict()) == keys
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    W = model.fc1.weight.detach().clone()
    model(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    assert not torch.equal(model.fc1.weight, W)  # the optimizer reached the model's own weight


class Mid(nn.Module):
    """A module whose adapted tensor sits between others, in parameter order."""

    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(torch.randn(3))
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.last = nn.Parameter(torch.randn(3))
        self.register_buffer("stat", torch.zeros(3))

    def forward(self, x):
        return (x + self.first) @ self.weight.T + self.last + self.stat


@pytest.mark.parametrize("merge", [False, True])
def test_remove_restores_parameter_and_state_dict_key_order(merge):
    model = nn.Sequential(Mid(), nn.Linear(3, 3), Mid())
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    assert keys == ["0.first", "0.weight", "0.last", "0.stat", "1.weight", "1.bias",
                    "2.first", "2.weight", "2.last", "2.stat"]
    rules = li.default_rules()
    rules[Mid] = li.Rule(("weight",))
    li.inject(model, "", r=2, rules=rules)
    assert adapted(model) == {"0.weight", "1.weight", "2.weight"}
    randomize(model, std=0.5, every=True)
    li.remove(model, merge=merge)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names


def linear_with(param_fn):
    model = nn.Sequential(nn.Linear(4, 4)).double()
    param_fn(model[0])
    return model


@pytest.mark.parametrize("foreign", [
    pytest.param(lambda m: weight_norm(m), id="weight_norm"),
    pytest.param(lambda m: orthogonal(m), id="orthogonal"),
])
def test_foreign_parametrization_registered_before_ours_survives_remove_without_merge(foreign):
    model = linear_with(foreign)
    W = model[0].weight.detach().clone()
    cls, plist = type(model[0]), model[0].parametrizations.weight
    originals = [p for n, p in plist.named_parameters() if n.startswith("original")]
    li.inject(model, "", r=2)
    randomize(model, std=0.5, every=True)
    assert not torch.equal(model[0].weight, W)
    li.remove(model, merge=False)
    assert type(model[0]) is cls and model[0].parametrizations.weight is plist
    assert [type(p) for p in plist] == [type(plist[0])] and not isinstance(plist[0], LoRA)
    assert [p for n, p in plist.named_parameters() if n.startswith("original")] == originals
    assert torch.equal(model[0].weight, W)


def test_weight_norm_before_ours_merges_through_its_right_inverse():
    model = linear_with(weight_norm)
    li.inject(model, "", r=2)
    randomize(model, std=0.5, every=True)
    expected = model[0].weight.detach().clone()
    li.remove(model, merge=True)
    assert [type(p).__name__ for p in model[0].parametrizations.weight] == ["_WeightNorm"]
    torch.testing.assert_close(model[0].weight, expected)


def test_orthogonal_before_ours_refuses_an_ill_defined_merge():
    model = linear_with(orthogonal)
    li.inject(model, "", r=2)
    randomize(model, std=0.5, every=True)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"cannot merge into `0\.weight`: the parametrization _Orthogonal "
                                           r"registered before LoRA .* ill-defined.*merge=False"):
        li.remove(model, merge=True)
    assert_unchanged(model, before)
    li.remove(model, merge=False)
    assert [type(p).__name__ for p in model[0].parametrizations.weight] == ["_Orthogonal"]


class Double(nn.Module):
    def forward(self, W):
        return 2 * W


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("foreign", [
    # With its default trivialization, orthogonal sets itself up in right_inverse, which torch
    # calls only for the first parametrization of a tensor; without it, it stacks.
    pytest.param(lambda m: orthogonal(m, use_trivialization=False), id="orthogonal"),
    pytest.param(lambda m: parametrize.register_parametrization(m, "weight", Double()), id="custom"),
])
def test_foreign_parametrization_registered_after_ours_survives_remove(foreign, merge):
    model = nn.Sequential(nn.Linear(4, 4)).double()
    W0 = model[0].weight.detach().clone()
    li.inject(model, "", r=2)
    randomize(model, std=0.5, every=True)
    foreign(model[0])
    plist = model[0].parametrizations.weight
    kind = type(plist[1])
    merged_view = model[0].weight.detach().clone()
    li.remove(model, merge=merge)
    assert [type(p) for p in model[0].parametrizations.weight] == [kind]
    if merge:  # ours was first in the chain, so W0 + ΔW goes into the original
        torch.testing.assert_close(model[0].weight, merged_view)
    else:
        assert torch.equal(model[0].parametrizations.weight.original, W0)


# -- state dicts -------------------------------------------------------------------------------

def test_lora_state_dict_has_exactly_the_lora_keys_and_loads_back():
    model = two_adapters()
    full = model.state_dict()
    lora_keys = [k for k in full if re.search(r"\.lora_[AB]\.", k)]
    assert len(lora_keys) == 8
    sd = li.lora_state_dict(model)
    assert list(sd) == lora_keys
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    assert list(li.lora_state_dict(model, adapter="b")) == [k for k in lora_keys if k.endswith(".b")]
    saved = {k: v.clone() for k, v in sd.items()}
    randomize(model, std=0.5, every=True)
    result = model.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(set(full) - set(lora_keys))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("base_first", [True, False], ids=["base-then-lora", "lora-then-base"])
def test_base_checkpoint_and_lora_checkpoint_load_in_either_order(base_first):
    torch.manual_seed(1)
    trained = mlp()
    base = {k: v.clone() for k, v in trained.state_dict().items()}  # keys such as "fc1.weight"
    li.inject(trained, "fc", r=2, alpha=4)
    randomize(trained, std=0.5, every=True)
    lora = {k: v.clone() for k, v in li.lora_state_dict(trained).items()}
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = trained(x)

    torch.manual_seed(2)
    model = mlp()  # other random weights
    li.inject(model, "fc", r=2, alpha=4)
    assert not torch.allclose(model(x), expected)
    lora_keys = set(li.lora_state_dict(model))
    for sd in ([base, lora] if base_first else [lora, base]):
        result = model.load_state_dict(sd, strict=False)
        assert result.unexpected_keys == []
        if sd is base:
            assert set(result.missing_keys) == lora_keys
    assert set(base) == {"fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias",
                         "fc3.weight"}
    assert torch.equal(model.fc1.parametrizations.weight.original, base["fc1.weight"])
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("bias, extra", [
    pytest.param("none", set(), id="none"),
    pytest.param("all", {"fc1.bias", "norm.bias", "fc2.bias"}, id="all"),
    pytest.param("lora_only", {"fc1.bias"}, id="lora_only"),
])
def test_mark_only_lora_as_trainable(bias, extra):
    model = mlp()
    li.inject(model, "fc1|fc3", r=2)  # fc3 has no bias
    ids = {id(p) for p in li.lora_parameters(model)}
    lora_names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert len(lora_names) == 4
    assert li.mark_only_lora_as_trainable(model, bias=bias) is model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names | extra


# -- targets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [
    pytest.param(r"fc[13]", id="str"),
    pytest.param(re.compile(r"fc[13]$"), id="pattern"),
    pytest.param(lambda name, m: isinstance(m, nn.Linear) and m.out_features != 4, id="callable"),
])
def test_targets_kinds(targets):
    model = mlp()
    li.inject(model, targets, r=2)
    assert adapted(model) == {"fc1.weight", "fc3.weight"}


def test_targets_str_is_searched_not_fullmatched():
    model = mlp()
    li.inject(model, "c2", r=2)
    assert adapted(model) == {"fc2.weight"}


@pytest.mark.parametrize("exclude", [
    pytest.param("fc2", id="str"),
    pytest.param(re.compile("2$"), id="pattern"),
    pytest.param(lambda name, m: m.out_features == 4, id="callable"),
])
def test_exclude_wins_over_targets(exclude):
    model = mlp()
    li.inject(model, "fc", exclude=exclude, r=2)
    assert adapted(model) == {"fc1.weight", "fc3.weight"}


def test_matched_modules_without_rules_are_skipped():
    model = mlp()
    li.inject(model, "", r=2)  # also matches the root Sequential, ReLU and LayerNorm
    assert adapted(model) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert type(model.norm) is nn.LayerNorm and type(model.act) is nn.ReLU


# -- dtype, device and init --------------------------------------------------------------------

def test_factors_follow_the_weight_or_the_dtype_option():
    model = mlp(torch.bfloat16)
    li.inject(model, "fc1", r=2)
    li.inject(model, "fc2", r=2, dtype=torch.float32)
    a1, b1 = li.lora_parameters(model.fc1)
    a2, b2 = li.lora_parameters(model.fc2)
    assert a1.dtype == b1.dtype == torch.bfloat16
    assert a2.dtype == b2.dtype == torch.float32
    assert model.fc2.weight.dtype == torch.bfloat16
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    li.remove(model)
    assert model.fc1.weight.dtype == model.fc2.weight.dtype == torch.bfloat16


def test_factors_live_on_the_weights_device():
    model = mlp().to("meta")
    li.inject(model, "fc", r=2)
    assert {p.device.type for p in li.lora_parameters(model)} == {"meta"}
    assert {p.dtype for p in li.lora_parameters(model)} == {torch.float64}


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_leaves_outputs_unchanged(init):
    model = nn.Sequential(nn.Linear(256, 8), nn.Linear(8, 4))  # float32: bit for bit
    x = torch.randn(3, 256)
    out = model(x)
    li.inject(model, "", r=4, init=init)
    assert torch.equal(model(x), out)
    lora = lora_of(model[0])
    A, B = lora.lora_A["default"], lora.lora_B["default"]
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) == A.numel()
    if init == "gaussian":  # A ~ N(0, 1/r), as peft
        torch.testing.assert_close(A.std().item(), 1 / 4, rtol=0.1, atol=0)
    else:  # Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        assert A.abs().max() <= 1 / 16 and A.abs().max() > 0.9 / 16


def test_rank_above_min_dim_warns_and_still_works():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    W0 = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"r=4 exceeds min\(out, in\) of \['0\.weight'\]"):
        li.inject(model, "0", r=4, alpha=2)
    randomize(model, std=0.5, every=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = F.linear(x, W0 + delta(lora_of(model[0]), "default"), model[0].bias)
    torch.testing.assert_close(model(x), expected)


# -- it stays an ordinary module -----------------------------------------------------------------

@pytest.mark.parametrize("factored", [True, False], ids=["factored", "merged"])
def test_parametrize_cached_still_works(factored):
    model = mlp()
    li.inject(model, "fc", r=2)
    randomize(model, std=0.5, every=True)
    for _, lora in li.named_loras(model):
        lora.factored = factored
    x = torch.randn(4, 6, dtype=torch.float64)
    out = model(x)
    with parametrize.cached():
        cached = model(x)
        assert model.fc1.weight is model.fc1.weight  # computed once inside the block
    torch.testing.assert_close(cached, out, rtol=0, atol=0)
    cached.sum().backward()
    assert all(p.grad is not None for p in li.lora_parameters(model))


def test_deepcopy_of_an_injected_model():
    model = mlp()
    li.inject(model, "fc", r=2)
    randomize(model, std=0.5, every=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    out = model(x)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), out)
    assert not ({id(p) for p in li.lora_parameters(clone)} & {id(p) for p in li.lora_parameters(model)})
    with torch.no_grad():
        for p in li.lora_parameters(clone):
            p.add_(1.0)
    assert torch.equal(model(x), out)
    li.remove(clone, merge=True)  # the original keeps its adapters, its class and its outputs
    assert type(clone.fc1) is nn.Linear
    assert adapted(model) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert torch.equal(model(x), out)
    li.remove(model, merge=False)
    assert type(model.fc1) is nn.Linear


def test_user_hooks_survive_inject_and_remove():
    model = mlp()
    calls = []
    handles = [
        model.fc1.register_forward_pre_hook(lambda m, a: calls.append("pre")),
        model.fc1.register_forward_hook(lambda m, a, o: calls.append("post")),
        model.fc1.register_full_backward_hook(lambda m, gi, go: calls.append("backward")),
    ]
    hooks = (list(model.fc1._forward_pre_hooks), list(model.fc1._forward_hooks),
             list(model.fc1._backward_hooks), list(model.fc1._load_state_dict_pre_hooks))
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    li.inject(model, "fc1", r=2)
    model(x).sum().backward()
    assert calls == ["pre", "post", "backward"]
    li.remove(model, merge=True)
    assert (list(model.fc1._forward_pre_hooks), list(model.fc1._forward_hooks),
            list(model.fc1._backward_hooks), list(model.fc1._load_state_dict_pre_hooks)) == hooks
    calls.clear()
    model(x).sum().backward()
    assert calls == ["pre", "post", "backward"]
    for h in handles:
        h.remove()


class Tagged(nn.Linear):
    """A Linear subclass with its own attribute and forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "mine"

    def forward(self, x):
        return super().forward(x) * 2


def test_isinstance_attributes_and_forward_are_kept():
    model = nn.Sequential(Tagged(4, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    li.inject(model, "0", r=2)  # found through the MRO: Linear's rule
    randomize(model, std=0.5, every=True)
    m = model[0]
    assert isinstance(m, Tagged) and isinstance(m, nn.Linear) and m.tag == "mine"
    W = m.parametrizations.weight.original.detach() + delta(lora_of(m), "default")
    torch.testing.assert_close(model(x), 2 * F.linear(x, W, m.bias))
    li.remove(model)
    assert type(m) is Tagged and m.tag == "mine" and not hasattr(m, "parametrizations")


def test_disabled_keeps_what_was_removed_or_injected_inside_the_block():
    model = two_adapters()
    x = torch.randn(4, 6, dtype=torch.float64)
    with li.disabled(model):
        li.remove(model, adapter="b", merge=False)
    out = model(x)  # no KeyError: 'b' is not put back
    assert all("b" not in lo.active for _, lo in li.named_loras(model))
    expected = li.remove(copy.deepcopy(model), merge=True)(x)
    torch.testing.assert_close(out, expected)
    with li.disabled(model):
        li.inject(model, "fc", r=2, adapter="n")
    assert {n: lo.active for n, lo in li.named_loras(model)} == {
        "fc1.weight": ["a", "n"], "fc2.weight": ["a", "n"], "fc3.weight": ["a", "n"]}


def test_a_partial_merge_next_to_dora_is_refused_and_changes_nothing():
    model = mlp()
    li.inject(model, "fc1", adapter="a", r=2)
    li.inject(model, "fc1", adapter="b", r=2, dora=True)
    randomize(model, std=0.5, every=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    out, before = model(x), snapshot(model)
    for name in ("a", "b"):
        with pytest.raises(ValueError, match=rf"remove\(\): merging \['{name}'\] into `fc1.weight` while"):
            li.remove(model, adapter=name, merge=True)
        assert_unchanged(model, before)
        torch.testing.assert_close(model(x), out)
    li.remove(model, adapter=["a", "b"], merge=True)  # together: exact
    torch.testing.assert_close(model(x), out)


def test_inject_freezes_the_tensors_it_adapts_and_nothing_else_and_remove_thaws_them():
    model = mlp()
    model.fc3.weight.requires_grad_(False)  # the user's own choice, kept throughout
    li.inject(model, "fc1|fc2", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.bias", "norm.weight", "norm.bias", "fc2.bias",
                         *(n for n, _ in model.named_parameters() if ".lora_" in n)}
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already exists"):
        li.inject(model, "fc", r=2)  # fc1 and fc2 have it: refused, and fc3 stays as it was
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    li.remove(model)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"fc3.weight"}
