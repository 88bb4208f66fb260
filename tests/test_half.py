"""Half precision: fp32 factors on bf16/fp16 models train, merge in float32, and never touch W0."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import delta as lora_delta
from _models import gpt2
from torch import nn
from transformers import GPT2LMHeadModel

import lora_inject as li

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def adapted(dtype: torch.dtype) -> GPT2LMHeadModel:
    return li.inject(gpt2(head=True, dtype=dtype), "c_attn|c_proj|c_fc", r=4, alpha=8, dtype=torch.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_trained_fp32_adapters_merge_into_a_half_model_within_its_precision(dtype):
    model = adapted(dtype)
    li.mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 8))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert {p.dtype for p in li.lora_parameters(model)} == {torch.float32}
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        with li.disabled(model):
            base = model(ids).logits
        exact = copy.deepcopy(model).double()(ids).logits  # the same weights, in float64
        updates = {name: (lora_delta(lora, torch.float64), lora_w0(model, name).double())
                   for name, lora in li.named_loras(model)}
        merged_model = li.remove(copy.deepcopy(model), merge=True)
        merged = merged_model(ids).logits

    assert unmerged.dtype == merged.dtype == dtype
    tol = 2 * torch.finfo(dtype).eps * float(exact.abs().max())  # two units of the dtype at the outputs' scale
    assert float((unmerged.double() - base.double()).abs().max()) > 20 * tol  # the adapters matter
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tol)
    torch.testing.assert_close(merged.double(), exact, rtol=0, atol=tol)

    # Each merged weight is W0 + ΔW summed in float32 and rounded once: within half a unit of
    # the exact sum (plus float32's own rounding), as no sum in the half dtype would be.
    for name, (delta, w0) in updates.items():
        w = merged_model.get_parameter(name)
        assert w.dtype == dtype
        want = w0 + delta
        half_unit = want.abs() * torch.finfo(dtype).eps / 2 + torch.finfo(dtype).smallest_normal
        assert bool(((w.double() - want).abs() <= half_unit * 1.001).all()), name


def lora_w0(model: nn.Module, name: str) -> torch.Tensor:
    module, tensor = name.rsplit(".", 1)
    return model.get_submodule(module).parametrizations[tensor].original


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("factored", [True, False], ids=["factored", "merged"])
def test_w0_stays_bit_identical_over_1000_forwards_and_backwards(dtype, factored):
    # A Linear on both paths: half-precision convolutions on CPU can be very slow.
    layer = nn.Linear(8, 8).to(dtype)
    li.mark_only_lora_as_trainable(li.inject(layer, "", r=2, dtype=torch.float32))
    lora = layer.parametrizations.weight[0]
    lora.factored = factored  # False: the layer gets the materialised W0 + ΔW
    w0 = layer.parametrizations.weight.original
    before = w0.detach().clone()
    opt = torch.optim.SGD(li.lora_parameters(layer), lr=1e-2)
    x = torch.randn(4, 8).to(dtype)
    for step in range(1000):
        layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            _ = layer.weight.sum()  # reads the materialised weight too
            with torch.no_grad(), li.disabled(layer):
                layer(x)
    assert torch.equal(w0, before)
    assert w0.dtype == dtype and w0.grad is None
    delta = lora_delta(lora).detach()
    assert delta.abs().max() > 1e-3  # the adapter did train

    # What the test would catch: adding the update to W0 and subtracting it again in the half
    # dtype, once per forward, drifts W0.
    drifted = before.clone()
    for _ in range(100):
        drifted = (drifted + delta.to(dtype)) - delta.to(dtype)
    assert not torch.equal(drifted, before)


@pytest.mark.parametrize("dtype", HALF)
def test_unmerged_fast_path_keeps_small_updates_that_merging_into_half_rounds_away(dtype):
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():  # |W0| in [0.25, 0.5): the half dtype's spacing there is 2^-9 (bf16) or 2^-12 (fp16)
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(0.25, 0.5) * torch.randn(32, 64).sign())
    layer.to(dtype)
    li.inject(layer, "", r=4, alpha=4, dtype=torch.float32)
    lora = layer.parametrizations.weight[0]
    spacing = 2.0 ** (-9 if dtype == torch.bfloat16 else -12)
    with torch.no_grad():
        lora.lora_A["default"].normal_(std=1.0)
        lora.lora_B["default"].normal_(std=spacing / 5)  # ΔW ~ N(0, (0.4 spacing)^2): mostly under half
    w0 = layer.parametrizations.weight.original.detach().double()
    delta = lora_delta(lora, torch.float64).detach()
    assert float(((w0 + delta).to(dtype).double() == w0).double().mean()) > 0.5  # lost when rounded

    x = torch.randn(16384, 64).to(dtype)
    with torch.no_grad():
        with li.disabled(layer):
            base = layer(x).double()
        unmerged = layer(x).double()
        li.remove(layer, merge=True)
        merged = layer(x).double()
    assert layer.weight.dtype == dtype

    def update_error(out):  # the ΔW that the outputs reveal (least squares), against the float64 ΔW
        seen = torch.linalg.lstsq(x.double(), out - base).solution.t()
        return float((seen - delta).norm() / delta.norm())

    # The outputs are half precision too, so even the factored branch loses part of the update
    # where |x @ W0.T| is large; but most of it survives, and most of the merged one does not.
    assert update_error(unmerged) < 0.3
    assert update_error(merged) > 0.5


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layer", ["linear", "conv1d", "embedding", "conv2d"])
def test_half_factors_on_a_float32_base_run_in_float32(layer, dtype):
    """The branch runs in the wider dtype: half factors are upcast, not the input cast down to them,
    so the output and the gradients equal those of the float32 copies of the same factors."""
    torch.manual_seed(0)
    make = {"linear": lambda: nn.Linear(32, 16), "conv2d": lambda: nn.Conv2d(4, 8, 3),
            "embedding": lambda: nn.Embedding(20, 16), "conv1d": lambda: gpt2().h[0].attn.c_attn}[layer]
    x = {"linear": torch.randn(8, 32), "conv2d": torch.randn(2, 4, 6, 6),
         "embedding": torch.randint(0, 20, (8,)), "conv1d": torch.randn(8, 16)}[layer]
    half, wide = make(), None
    li.inject(half, "", r=4, alpha=8, dtype=dtype)
    with torch.no_grad():
        for p in li.lora_parameters(half):
            p.normal_(0, 0.5)
    wide = copy.deepcopy(half)
    for p in li.lora_parameters(wide):
        p.data = p.data.float()
    out, ref = half(x), wide(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(li.lora_parameters(half), li.lora_parameters(wide), strict=True):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, q.grad.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_half_factors_on_a_float32_base_give_peft_outputs(dtype, tmp_path):
    """peft upcasts half factors on load and computes in the base's float32: our export read by
    peft gives our outputs (they were 1e-3 apart while our branch ran in the factors' dtype)."""
    peft = pytest.importorskip("peft")
    base = gpt2(head=True)
    model = li.inject(copy.deepcopy(base), "c_attn|c_fc|wpe", r=4, alpha=8, dtype=dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.3)
    li.save_adapter(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = torch.randint(1, 40, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, theirs(x).logits, rtol=1e-6, atol=1e-6)
