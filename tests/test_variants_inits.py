"""``init="pissa"`` and ``init="olora"``: A and B from the SVD / QR of W0, as peft computes them,
with the initial factors kept frozen so that the weight is unchanged at init without writing W0;
``remove(merge=False)`` gives back the original W0 bit for bit."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import CASES, Case
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from transformers.pytorch_utils import Conv1D

import lora_inject as li

pytestmark = [
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
    pytest.mark.filterwarnings("ignore:.*exceeds min\\(out, in\\)"),
]

F64 = torch.float64
INITS = [pytest.param("pissa", id="pissa"), pytest.param("olora", id="olora")]
KINDS = [pytest.param(kind, id=kind) for kind in CASES]
FAST = settings(max_examples=max(2, settings.default.max_examples // 4))


@torch.no_grad()  # and so an RNN keeps no non-leaf weights that would stop a deepcopy
def run(model: nn.Module, case: Case) -> list[Tensor]:
    args, kwargs = tree_map(lambda t: t.to(F64) if isinstance(t, Tensor) and t.is_floating_point() else t,
                            (case.args, case.kwargs))
    return [t for t in tree_flatten(model(*args, **kwargs))[0] if isinstance(t, Tensor)]


def matrix(W: Tensor, transpose: bool) -> Tensor:
    return W.T if transpose else W.reshape(W.shape[0], -1)


# -- peft as the oracle ------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(9, 5)  # out < in
        self.tall = nn.Linear(5, 9)  # out > in

    def forward(self, x):
        return self.tall(torch.tanh(self.wide(x)))


def peft_model(base: nn.Module, init: str, **config) -> peft.PeftModel:
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=init, **config))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rslora", [pytest.param(False, id="lora"), pytest.param(True, id="rslora")])
def test_factors_and_residual_match_peft(init, rslora):
    base = Net()
    theirs = peft_model(base, init, r=3, lora_alpha=5, target_modules=["wide", "tall"], use_rslora=rslora)
    ours = li.inject(copy.deepcopy(base), "wide|tall", r=3, alpha=5.0, init=init, rslora=rslora)
    x = torch.randn(4, 9)
    torch.testing.assert_close(ours(x), base(x))
    torch.testing.assert_close(ours(x), theirs(x))
    for name in ("wide", "tall"):
        layer = theirs.base_model.model.get_submodule(name)
        lora = getattr(ours, name).parametrizations.weight[0]
        torch.testing.assert_close(lora.lora_A["default"], layer.lora_A["default"].weight)
        torch.testing.assert_close(lora.lora_B["default"], layer.lora_B["default"].weight)
        # peft's residual base weight is our W0 less the frozen initial update
        W0 = getattr(ours, name).parametrizations.weight.original
        s = lora.scaling["default"]
        torch.testing.assert_close(W0 - s * lora.lora_B0["default"] @ lora.lora_A0["default"],
                                   layer.base_layer.weight)
        assert torch.equal(W0, getattr(base, name).weight)  # W0 itself is never written


@pytest.mark.parametrize("init", INITS)
def test_gradients_match_peft_after_the_factors_move(init):
    base = Net().double()
    theirs = peft_model(copy.deepcopy(base).float(), init, r=2, lora_alpha=4, target_modules=["wide", "tall"]).double()
    ours = li.inject(copy.deepcopy(base), "wide|tall", r=2, alpha=4.0, init=init)
    with torch.no_grad():  # the same starting point in float64, then the same moves
        for name in ("wide", "tall"):
            layer = theirs.base_model.model.get_submodule(name)
            lora = getattr(ours, name).parametrizations.weight[0]
            W0 = getattr(ours, name).parametrizations.weight.original
            layer.base_layer.weight.copy_(W0 - 2.0 * lora.lora_B0["default"] @ lora.lora_A0["default"])
            for ours_t, theirs_t in ((lora.lora_A["default"], layer.lora_A["default"].weight),
                                     (lora.lora_B["default"], layer.lora_B["default"].weight)):
                ours_t.add_(torch.randn_like(ours_t) * 0.1)
                theirs_t.copy_(ours_t)
    x = torch.randn(6, 9, dtype=F64)
    want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want)
    want.square().sum().backward()
    got.square().sum().backward()
    for name in ("wide", "tall"):
        layer = theirs.base_model.model.get_submodule(name)
        lora = getattr(ours, name).parametrizations.weight[0]
        torch.testing.assert_close(lora.lora_A["default"].grad, layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(lora.lora_B["default"].grad, layer.lora_B["default"].weight.grad)


def test_pissa_on_conv1d_matches_peft_fan_in_fan_out():
    base = nn.Sequential(Conv1D(6, 8))  # weight (in=8, out=6)
    theirs = peft_model(base, "pissa", r=2, lora_alpha=2, target_modules=["0"], fan_in_fan_out=True)
    ours = li.inject(copy.deepcopy(base), "0", r=2, alpha=2.0, init="pissa")
    lora = ours[0].parametrizations.weight[0]
    torch.testing.assert_close(lora.lora_A["default"], theirs.base_model.model[0].lora_A["default"].weight)
    torch.testing.assert_close(lora.lora_B["default"], theirs.base_model.model[0].lora_B["default"].weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


# -- every rule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_every_rule_starts_from_w0_and_restores_it(kind, init, data):
    case = data.draw(CASES[kind], label="case")
    base = copy.deepcopy(case.model).to(F64)
    model = li.inject(copy.deepcopy(base), case.targets, r=case.r, alpha=abs(case.alpha), rules=case.rules,
                      init=init)
    for got, want in zip(run(model, case), run(base, case), strict=True):
        torch.testing.assert_close(got, want)
    loras = dict(li.named_loras(model))
    for a in case.adapted:
        lora = loras[a.key]
        W0 = matrix(getattr(base.get_submodule(a.module), a.tensor), a.transpose)
        A0, B0 = lora.lora_A0["default"], lora.lora_B0["default"]
        assert torch.equal(A0, lora.lora_A["default"]) and torch.equal(B0, lora.lora_B["default"])
        approx = lora.scaling["default"] * B0 @ A0
        if init == "pissa":  # the best rank-r approximation of W0
            U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
            torch.testing.assert_close(approx, (U[:, :case.r] * S[:case.r]) @ Vh[:case.r])
        else:  # the first r columns of Q times the first r rows of R
            Q, R = torch.linalg.qr(W0)
            torch.testing.assert_close(approx, lora.scaling["default"] * Q[:, :case.r] @ R[:case.r])
    with torch.no_grad():
        for lora in loras.values():
            lora.lora_B["default"].add_(torch.randn_like(lora.lora_B["default"]) * 0.1)
    merged = li.remove(copy.deepcopy(model), merge=True)
    for got, want in zip(run(merged, case), run(model, case), strict=True):
        torch.testing.assert_close(got, want)
    li.remove(model, merge=False)
    for a in case.adapted:
        assert torch.equal(getattr(model.get_submodule(a.module), a.tensor),
                           getattr(base.get_submodule(a.module), a.tensor))


def test_expert_weights_are_decomposed_expert_by_expert():
    model = nn.Module()
    model.weight = nn.Parameter(torch.randn(3, 6, 4, dtype=F64))
    li.inject(model, "", r=2, init="pissa", rules={nn.Module: li.Rule(("weight",), experts=True)})
    lora = model.parametrizations.weight[0]
    W0 = model.parametrizations.weight.original
    for e in range(3):
        U, S, Vh = torch.linalg.svd(W0[e], full_matrices=False)
        torch.testing.assert_close(lora.lora_B["default"][e] @ lora.lora_A["default"][e], (U[:, :2] * S[:2]) @ Vh[:2])
    torch.testing.assert_close(model.weight, W0)


# -- the frozen factors -------------------------------------------------------------------------------
def test_frozen_factors_are_buffers_the_size_of_the_adapter(tmp_path):
    base = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    model = li.inject(copy.deepcopy(base), r"^0$", r=2, init="pissa", dora=True)
    li.mark_only_lora_as_trainable(model)
    lora = model[0].parametrizations.weight[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [lora.lora_A["default"], lora.lora_B["default"], lora.lora_magnitude["default"]]
    buffers = dict(model.named_buffers())
    assert {k: tuple(v.shape) for k, v in buffers.items()} == {
        "0.parametrizations.weight.0.lora_A0.default": (2, 8), "0.parametrizations.weight.0.lora_B0.default": (6, 2),
        "0.parametrizations.weight.0.scale_default": ()}  # the scaling, for compile: not in the state dict
    assert "0.parametrizations.weight.0.scale_default" not in model.state_dict()
    x = torch.randn(5, 8)
    opt = torch.optim.SGD(li.lora_parameters(model), lr=0.1)
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    # our format keeps the frozen factors; peft's gets the rank-2r LoRA with the same update from W0
    li.save_adapter(model, tmp_path / "ours")
    loaded = li.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].parametrizations.weight[0].lora_A0["default"], lora.lora_A0["default"])
    li.save_adapter(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(theirs(x), model(x))
    assert theirs.base_model.model[0].r["default"] == 4


def test_r_above_min_pads_with_zeros():
    layer = nn.Linear(3, 5)
    with pytest.warns(UserWarning, match=r"r=4 exceeds min\(out, in\)"):
        li.inject(layer, "", r=4, init="pissa")
    lora = layer.parametrizations.weight[0]
    assert torch.equal(lora.lora_A["default"][3:], torch.zeros(1, 3))
    assert torch.equal(lora.lora_B["default"][:, 3:], torch.zeros(5, 1))
    x = torch.randn(2, 3)
    torch.testing.assert_close(layer(x), x @ layer.parametrizations.weight.original.T + layer.bias)


def test_pissa_needs_a_positive_alpha():
    with pytest.raises(ValueError, match=r"inject\(\): init='pissa' .* `alpha` must be positive, got -2"):
        li.inject(nn.Linear(4, 4), "", r=2, alpha=-2.0, init="pissa")
    assert math.isfinite(li.inject(nn.Linear(4, 4), "", r=2, alpha=-2.0, init="olora")(torch.randn(1, 4)).sum().item())
