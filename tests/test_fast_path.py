"""The factored fast path agrees with the merged path, and its weight acts as W0 + s·B·A."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_inject as li
from lora_inject._factored import FactoredWeight as LoraWeight


def _conv1d_hf():
    return Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs; weight stored as (5, 7)


LAYERS = [
    pytest.param(lambda: nn.Linear(5, 7), lambda: torch.randn(3, 4, 5), id="linear"),
    pytest.param(_conv1d_hf, lambda: torch.randn(3, 4, 5), id="conv1d-transformers"),
    pytest.param(lambda: nn.Embedding(11, 6, padding_idx=2), lambda: torch.randint(0, 11, (3, 4)),
                 id="embedding"),
    pytest.param(lambda: nn.EmbeddingBag(11, 6, mode="sum"), lambda: torch.randint(0, 11, (3, 4)),
                 id="embedding-bag-sum"),
    pytest.param(lambda: nn.EmbeddingBag(11, 6, mode="mean"), lambda: torch.randint(0, 11, (3, 4)),
                 id="embedding-bag-mean"),
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), lambda: torch.randn(2, 4, 9),
                 id="conv1d"),
    pytest.param(lambda: nn.Conv2d(3, 5, (3, 2), padding="same", padding_mode="reflect"),
                 lambda: torch.randn(2, 3, 6, 5), id="conv2d-reflect-same"),
    pytest.param(lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), lambda: torch.randn(1, 2, 4, 5, 4), id="conv3d"),
]


def _adapted(make, dtype):
    layer = make().to(dtype)
    li.inject(layer, "", r=3, alpha=5, dtype=dtype)
    lora = next(lora for _, lora in li.named_loras(layer))
    with torch.no_grad():
        for p in li.lora_parameters(layer):
            p.normal_()
    return layer, lora


def _run(layer, x):
    out = layer(x)
    grads = torch.autograd.grad(out.float().square().sum(), list(li.lora_parameters(layer)))
    return out, grads


@pytest.mark.parametrize("make, inputs", LAYERS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.bfloat16, 3e-2)], ids=["f64", "bf16"])
def test_fast_path_matches_merged_path(make, inputs, dtype, tol):
    fast, lora = _adapted(make, dtype)
    assert lora.factored
    merged = copy.deepcopy(fast)
    next(lora for _, lora in li.named_loras(merged)).factored = False
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    assert isinstance(fast.weight, LoraWeight) and not isinstance(merged.weight, LoraWeight)
    out_fast, grads_fast = _run(fast, x)
    out_merged, grads_merged = _run(merged, x)
    scale = out_merged.float().abs().max().item() + 1
    torch.testing.assert_close(out_fast.float(), out_merged.float(), rtol=tol, atol=tol * scale)
    for gf, gm in zip(grads_fast, grads_merged):
        torch.testing.assert_close(gf.float(), gm.float(), rtol=tol, atol=tol * (gm.float().abs().max().item() + 1))


def test_fast_weight_is_w0_plus_update_under_any_other_op():
    layer, lora = _adapted(lambda: nn.Linear(5, 7), torch.float64)
    w0 = layer.parametrizations.weight.original
    expected = w0 + lora.scaling["default"] * lora.lora_B["default"] @ lora.lora_A["default"]
    w = layer.weight
    assert isinstance(w, LoraWeight) and w.shape == (7, 5) and w.dtype == torch.float64
    torch.testing.assert_close(w + 0, expected)
    torch.testing.assert_close(w.t(), expected.t())
    torch.testing.assert_close(w.sum(), expected.sum())
    torch.testing.assert_close(torch.linalg.norm(w), torch.linalg.norm(expected))
    torch.testing.assert_close(w.detach().clone(), expected.detach())
    assert type(w.detach().clone()) is torch.Tensor
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(x @ w.t(), x @ expected.t())
    # gradients reach the factors through a non-factored op too
    (grad_a,) = torch.autograd.grad(w.square().sum(), [lora.lora_A["default"]])
    (ref_a,) = torch.autograd.grad(expected.square().sum(), [lora.lora_A["default"]])
    torch.testing.assert_close(grad_a, ref_a)


def test_grouped_conv_takes_the_merged_path():
    layer = nn.Conv2d(4, 6, 3, groups=2).double()
    li.inject(layer, "", r=2)
    lora = layer.parametrizations.weight[0]
    assert not lora.factored and not isinstance(layer.weight, LoraWeight)


def test_dropout_acts_on_the_input_of_the_lora_branch():
    layer = nn.Linear(6, 4).double()
    li.inject(layer, "", r=2, alpha=2, dropout=0.5)
    lora = layer.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B["default"].normal_()
    A, B, w0 = lora.lora_A["default"], lora.lora_B["default"], layer.parametrizations.weight.original
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5)
    expected = F.linear(x, w0, layer.bias) + (dropped @ A.t()) @ B.t()
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, F.linear(x, w0 + B @ A, layer.bias))
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, w0 + B @ A, layer.bias))


def test_bf16_fast_path_keeps_updates_that_a_merged_bf16_weight_rounds_away():
    layer = nn.Linear(64, 32, bias=False)
    li.inject(layer, "", r=4, alpha=4, dtype=torch.float32)
    lora = layer.parametrizations.weight[0]
    with torch.no_grad():
        w = layer.parametrizations.weight.original
        w.copy_(torch.empty_like(w).uniform_(0.25, 0.5) * torch.randn_like(w).sign())
        lora.lora_A["default"].normal_(std=2.2e-2)
        lora.lora_B["default"].normal_(std=2.2e-2)  # |ΔW| ~ 1e-3: under half of bf16's spacing at |W0|
    layer.to(torch.bfloat16)
    w0 = layer.parametrizations.weight.original.detach().double()
    delta = (lora.lora_B["default"] @ lora.lora_A["default"]).detach().double()
    rounded_away = float(((w0 + delta).bfloat16().double() == w0).double().mean())
    assert rounded_away > 0.5

    x = torch.randn(4096, 64).bfloat16()
    with torch.no_grad(), li.disabled(layer):
        base = layer(x).double()
    with torch.no_grad():
        fast = layer(x).double()
    merged = (x @ (w0 + delta).bfloat16().t()).double()  # what a merged bf16 weight gives

    def effective_update(out):  # least squares: the ΔW that the layer's outputs reveal
        return torch.linalg.lstsq(x.double(), out - base).solution.t()

    def rel_error(out):
        return float((effective_update(out) - delta).norm() / delta.norm())

    assert rel_error(fast) < 0.2
    assert rel_error(merged) > 0.5


@pytest.mark.parametrize("make", [
    pytest.param(lambda: nn.Embedding(9, 4, max_norm=1.0), id="embedding-max-norm"),
    pytest.param(lambda: nn.Embedding(9, 4, scale_grad_by_freq=True), id="embedding-scale-grad"),
    pytest.param(lambda: nn.EmbeddingBag(9, 4, mode="max"), id="embedding-bag-max"),
    pytest.param(lambda: nn.Conv2d(4, 4, 3, groups=2), id="conv-groups"),
])
def test_lookups_without_a_factored_form_take_the_merged_path_and_refuse_dropout(make):
    layer = make()
    with pytest.raises(ValueError, match=r"`dropout`=0.1 needs a layer with a factored form"):
        li.inject(layer, "", r=2, dropout=0.1)
    li.inject(layer, "", r=2)
    assert not layer.parametrizations.weight[0].factored


@pytest.mark.parametrize("make", [
    pytest.param(lambda: nn.Linear(5, 7), id="linear"),
    pytest.param(lambda: nn.Linear(5, 7, bias=False), id="linear-no-bias"),
    pytest.param(_conv1d_hf, id="conv1d-transformers"),
])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_every_gradient_of_the_fast_path_matches_the_merged_path(make, dropout):
    fast = make().double()
    li.inject(fast, "", r=3, alpha=5, dropout=dropout)
    fast.eval()  # dropout off, so both paths compute the same function
    fast.parametrizations.weight.original.requires_grad_(True)  # W0 trains too, here
    with torch.no_grad():
        for p in li.lora_parameters(fast):
            p.normal_()
    merged = copy.deepcopy(fast)
    next(lora for _, lora in li.named_loras(merged)).factored = False
    grads, x0 = [], torch.randn(2, 3, 5, dtype=torch.float64)
    for layer in (fast, merged):
        x = x0.clone().requires_grad_(True)
        params = [x, *(p for p in layer.parameters())]
        out = layer(x)
        grads.append((out, torch.autograd.grad(out.sin().sum(), params)))
    (out_fast, g_fast), (out_merged, g_merged) = grads
    torch.testing.assert_close(out_fast, out_merged)
    assert len(g_fast) == len(g_merged) >= 4
    for a, b in zip(g_fast, g_merged):
        torch.testing.assert_close(a, b)


# -- the parametrization call: reading the weight skips parametrize's frames only where that changes nothing --
def test_reading_the_weight_runs_the_parametrization_s_hooks():
    # Hooks on the parametrization list, on LoRA, and global module hooks are all called, as
    # parametrize's own getter calls them.
    layer = li.inject(nn.Linear(5, 7), "", r=2)
    plist = layer.parametrizations.weight
    seen = []
    handles = [plist.register_forward_pre_hook(lambda m, args: seen.append("list")),
               plist[0].register_forward_hook(lambda m, args, out: seen.append("lora"))]
    layer(torch.randn(2, 5))
    assert seen == ["list", "lora"]
    for h in handles:
        h.remove()
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        layer(torch.randn(2, 5))
    finally:
        handle.remove()
    assert "LoRA" in seen and "ParametrizationList" in seen
    seen.clear()
    layer(torch.randn(2, 5))
    assert seen == []


def test_reading_the_weight_inside_parametrize_cached_reads_it_once():
    from torch.nn.utils import parametrize

    layer = li.inject(nn.Linear(5, 7), "", r=2)
    with parametrize.cached():
        first, second = layer.weight, layer.weight
        assert first is second
    before = layer.weight.detach()
    with torch.no_grad():  # outside the block, a read sees the adapter as it is now
        layer.parametrizations.weight[0].lora_B["default"].add_(1.0)
    assert not torch.equal(layer.weight.detach(), before)
