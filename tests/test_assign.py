"""Assigning to an adapted tensor never writes W0: functional_call with the model's own state dict
or a modified one, torch.nn.utils.stateless, load_state_dict(assign=True), and `layer.weight = t`.
The state dict's `p.weight` key is W0, so a plain tensor assigned there is the new W0; a value the
adapted tensor handed out puts back the very W0 it came from; another tensor's adapted weight is
refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_inject as li


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in ("gru", "ia3_gru"):  # the merged path
        model = nn.GRU(4, 3)
    else:  # the factored path
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    if kind.startswith("ia3"):  # IA³ scales the outputs, and the bias with them: both parametrized
        li.inject(model, "", kind="ia3")
    else:
        li.inject(model, "", r=2, alpha=4, dora=kind == "dora")
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    return model


def _out(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def _snapshot(model):
    return {k: (v, v.detach().clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _unchanged(model, snap) -> bool:
    now = dict([*model.named_parameters(), *model.named_buffers()])
    return now.keys() == snap.keys() and all(now[k] is t and torch.equal(t, c) for k, (t, c) in snap.items())


def _merged_by_hand(model, base=None):
    plain = copy.deepcopy(model)
    if base is not None:
        plain.load_state_dict(base)
    li.remove(plain, merge=True)
    return plain


KINDS = ["linear", "gru", "dora", "ia3", "ia3_gru"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", ["func", "stateless"])
def test_functional_call_with_the_models_own_state_dict_gives_its_outputs_and_changes_nothing(kind, call):
    model = _model(kind)
    x = torch.randn(5, 4)
    want = _out(model, x)
    snap = _snapshot(model)
    if call == "func":
        got = torch.func.functional_call(model, model.state_dict(), (x,))
    else:
        with pytest.warns(FutureWarning):
            got = torch.nn.utils.stateless.functional_call(model, model.state_dict(), (x,))
    got = got[0] if isinstance(got, tuple) else got
    assert torch.equal(got, want)
    assert _unchanged(model, snap)  # was: W0 left holding W0 + dW
    assert torch.equal(_out(model, x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_with_a_modified_state_dict_uses_it_then_puts_w0_back(kind):
    model = _model(kind)
    x = torch.randn(5, 4)
    sd = {k: v + 0.5 if not k.endswith(("lora_A.default", "lora_B.default")) else v
          for k, v in model.state_dict().items()}
    want = _out(_merged_by_hand(model, sd), x)
    before = _out(model, x)
    snap = _snapshot(model)
    got = torch.func.functional_call(model, sd, (x,))
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want)
    assert _unchanged(model, snap)
    assert torch.equal(_out(model, x), before)


def test_gradients_through_functional_call_reach_the_factors_as_in_the_model():
    model = _model("linear")
    x = torch.randn(5, 4)
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}  # the factors
    snap = _snapshot(model)
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(
        {k: v.detach() for k, v in params.items()})
    model(x).square().sum().backward()
    for k, v in params.items():
        torch.testing.assert_close(grads[k], v.grad)
    for p in params.values():
        p.grad = None
    assert _unchanged(model, snap)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_assign_with_its_own_state_dict_keeps_w0_and_outputs(kind):
    model = _model(kind)
    x = torch.randn(5, 4)
    want = _out(model, x)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(model.state_dict(), assign=True)
    assert torch.equal(_out(model, x), want)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in values.items())


def test_assigning_the_weight_it_handed_out_puts_back_the_same_w0():
    layer = _model("linear")[0]
    original = layer.parametrizations.weight.original
    w0 = original.detach().clone()
    w = layer.weight
    layer.weight = w  # was: W0 := W0 + dW
    assert layer.parametrizations.weight.original is original and torch.equal(original, w0)
    t = torch.randn(6, 4)
    layer.weight = t  # a plain tensor is the new W0, as the state dict's key says
    assert torch.equal(layer.parametrizations.weight.original, t) and torch.equal(original, w0)
    layer.weight = w  # the value read before puts that W0 back, the same tensor
    assert layer.parametrizations.weight.original is original and torch.equal(original, w0)


@pytest.mark.parametrize("kind", ["linear", "gru"])
def test_assigning_another_tensors_adapted_weight_is_refused_and_changes_nothing(kind):
    a, b = _model(kind), _model(kind)
    snap = _snapshot(a)
    name = "weight_ih_l0" if kind == "gru" else "weight"
    target, other = (a, b) if kind == "gru" else (a[0], b[0])
    with pytest.raises(ValueError, match=r"lora_inject: assigning an adapted weight .* another LoRA-adapted"):
        setattr(target, name, getattr(other, name))
    assert _unchanged(a, snap)


def test_assigning_a_tensor_of_another_shape_or_dtype_is_refused_and_changes_nothing():
    model = _model("linear")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"has shape \(6, 4\); assigning one of shape \(4, 6\)"):
        model[0].weight = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"W0 is torch.float32, got a tensor of torch.float64"):
        model[0].weight = torch.zeros(6, 4, dtype=torch.float64)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("modified", [False, True])
def test_functional_call_leaves_the_callers_dict_holding_its_own_tensors(kind, modified):
    # torch writes what it reads back on exit into the caller's dict: it must read the state
    # dict's tensor (W0), not the adapted weight, so the dict still loads anywhere afterwards.
    model = _model(kind)
    x = torch.randn(5, 4)
    sd = {k: v + 0.5 if modified else v for k, v in model.state_dict().items()}
    given = {k: (v, v.clone()) for k, v in sd.items()}
    snap = _snapshot(model)
    want = _out(_merged_by_hand(model, sd), x)
    for _ in range(2):  # the same dict twice, as a loop over batches does
        got = torch.func.functional_call(model, sd, (x,))
        torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want)
    assert sd.keys() == given.keys()
    assert all(sd[k] is t and type(t) is type(c) and torch.equal(t, c) for k, (t, c) in given.items())
    assert _unchanged(model, snap)
    copy.deepcopy(model).load_state_dict(sd)  # was: refused as another LoRA's adapted weight


def test_assigning_a_bias_that_ia3_scales_checks_it_as_the_weight():
    model = _model("ia3")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"has shape \(6,\); assigning shape \(1,\) to it is refused"):
        model[0].bias = torch.zeros(1)  # was: taken, then broadcast in the forward
    with pytest.raises(ValueError, match=r"has shape \(6,\); assigning None to it is refused"):
        model[0].bias = None  # was: AttributeError
    assert _unchanged(model, snap)


def test_assigning_an_nn_parameter_to_the_adapted_tensor_sets_w0():
    model = _model("linear")
    x = torch.randn(5, 4)
    new = nn.Parameter(torch.randn(6, 4), requires_grad=False)
    model[0].weight = new  # was: KeyError "attribute 'weight' already exists"
    assert model[0].parametrizations.weight.original is new
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    plain.load_state_dict(model.state_dict(), strict=False)
    li.inject(plain, "", r=2, alpha=4)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(_out(model, x), _out(plain, x))
