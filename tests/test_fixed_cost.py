"""The fixed cost of an adapted layer: the adapted weight kept between forwards, and the cheaper of
the factored and merged forms chosen per call. Each is a shortcut, so each test checks that it
never changes what a forward computes: after an optimizer step, a new scaling, a swapped factor,
a move to another dtype, a copy, a ``functional_call`` and inference mode."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from _helpers import delta, randomize
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import lora_inject as li


def _layer(make=lambda: nn.Linear(6, 5), r=2, **kwargs):
    layer = make()
    li.inject(layer, "", r=r, alpha=2 * r, **kwargs)
    li.mark_only_lora_as_trainable(layer)
    randomize(layer)
    return layer


def _lora(layer):
    return next(lora for _, lora in li.named_loras(layer))


def _merged_reference(layer, x):
    """The plain layer with the hand-merged weight, on ``x``."""
    lora = _lora(layer)
    plain = copy.deepcopy(li.remove(copy.deepcopy(layer), merge=False))
    with torch.no_grad():
        plain.weight.add_(delta(lora, plain.weight.dtype).to(plain.weight.dtype))
    return plain(x)


def test_the_weight_is_kept_between_forwards_and_follows_an_optimizer_step():
    layer = _layer()
    assert layer.weight is layer.weight  # the same value object while nothing it holds changed
    x = torch.randn(4, 6)
    opt = torch.optim.SGD(li.lora_parameters(layer), lr=0.5)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(layer(x), _merged_reference(layer, x))


def test_a_kept_weight_is_made_again_when_an_adapter_changes():
    layer = _layer(make=lambda: nn.Linear(6, 5))
    lora = _lora(layer)
    x = torch.randn(4, 6)
    first = layer.weight
    lora.set_scaling("default", alpha=9.0)  # a new scaling
    assert layer.weight is not first
    torch.testing.assert_close(layer(x), _merged_reference(layer, x))
    lora.lora_B["default"] = nn.Parameter(torch.randn(5, 2))  # a factor swapped for another tensor
    torch.testing.assert_close(layer(x), _merged_reference(layer, x))
    li.inject(layer, "", r=3, alpha=3, adapter="other")  # a second adapter, active with the first
    randomize(layer)
    torch.testing.assert_close(layer(x), _merged_reference(layer, x))
    li.activate(layer, "other")
    torch.testing.assert_close(layer(x), _merged_reference(layer, x))
    with li.disabled(layer):
        torch.testing.assert_close(layer(x), li.remove(copy.deepcopy(layer), merge=False)(x))


def test_a_kept_weight_follows_dropout_and_the_dtype():
    layer = _layer(dropout=0.5)
    x = torch.randn(64, 6)
    layer.eval()
    want = _merged_reference(layer, x)
    torch.testing.assert_close(layer(x), want)
    layer.train()  # dropout at work now: the branch differs from the merged weight's
    assert not torch.allclose(layer(x), want)
    layer.eval()
    layer.double()  # W0 and the factors change dtype in place
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer(x.double()), _merged_reference(layer, x.double()))


def test_a_copy_makes_its_own_weight():
    layer = _layer()
    layer(torch.randn(2, 6))
    twin = copy.deepcopy(layer)
    assert twin.weight is not layer.weight
    with torch.no_grad():
        _lora(twin).lora_B["default"].zero_()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), _merged_reference(layer, x))
    torch.testing.assert_close(twin(x), li.remove(copy.deepcopy(twin), merge=False)(x))


def test_a_weight_of_swapped_in_tensors_is_not_kept():
    """functional_call swaps other tensors in for one call: a weight holding them is not kept, so
    that none of them outlives the call, and the next forward reads the module's own again."""
    layer = _layer()
    x = torch.randn(3, 6)
    state = {k: v.detach().clone() * 2 for k, v in layer.state_dict().items()}
    out = functional_call(layer, state, (x,))
    lora = _lora(layer)
    kept = lora.made
    held = [] if kept is None else [kept._w0, *(t for term in kept._terms for t in (term.A, term.B))]
    assert not any(t is v for t in held for v in state.values())
    twice = copy.deepcopy(layer)
    twice.load_state_dict(state)
    torch.testing.assert_close(out, twice(x))
    torch.testing.assert_close(layer(x), _merged_reference(layer, x))


def test_a_weight_made_in_inference_mode_does_not_serve_training():
    layer = _layer()
    x = torch.randn(3, 6)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()  # would fail on an inference tensor kept from the block
    assert all(p.grad is not None for p in li.lora_parameters(layer))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _convolutions(layer, x, grad):
    with torch.set_grad_enabled(grad), _Ops() as ops:
        out = layer(x)
        if grad:
            out.sum().backward()
    return sum(n.startswith("convolution.") for n in ops.names), out


@pytest.mark.parametrize("channels, r, side, grad, count", [
    (32, 8, 16, False, 1), (32, 8, 16, True, 1), (32, 8, 1, False, 3), (8, 4, 1, False, 1), (8, 4, 1, True, 1)],
    ids=["16x16-no-grad", "16x16-grad", "one-pixel", "small-no-grad", "small-grad"])
def test_a_conv_runs_in_its_cheaper_form(channels, r, side, grad, count):
    """On a 16x16 image a conv costs fewer multiply-adds on ``W0 + s * B @ A`` than in three
    convs, in training too: it runs once. On one output pixel the factored form is cheaper: three
    convs; unless the merge costs less than the op it saves (8 channels, 2304 multiply-adds).
    Either way it equals the plain layer with the merged weight."""
    layer = _layer(make=lambda: nn.Conv2d(channels, channels, 3, padding=1), r=r)
    x = torch.randn(1, channels, side, side)
    convolutions, out = _convolutions(layer, x, grad)
    assert convolutions == count
    torch.testing.assert_close(out, _merged_reference(layer, x))


def test_training_never_merges_a_weight_larger_than_the_activations():
    """In training the merged weight would be kept for backward: where it is larger than the
    layer's input and output together, the factored form runs, whatever it costs."""
    layer = _layer(make=lambda: nn.Conv2d(64, 64, 3, padding=1), r=16)
    x = torch.randn(1, 64, 8, 8)
    count, out = _convolutions(layer, x, True)
    assert count == 3
    count, _ = _convolutions(layer, x, False)  # without a gradient, merging pays here
    assert count == 1


def test_a_half_precision_conv_stays_factored():
    """In bfloat16 the merged weight would round the update away: the factored form keeps it."""
    layer = _layer(make=lambda: nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16), r=4, dtype=torch.bfloat16)
    count, _ = _convolutions(layer, torch.randn(1, 8, 8, 8, dtype=torch.bfloat16), False)
    assert count == 3


@pytest.mark.parametrize("features, r, rows, grad, count", [
    (256, 2, 4, False, 3), (256, 2, 4, True, 3), (64, 2, 4, False, 2), (64, 2, 4, True, 2),
    (256, 1, 2048, False, 2), (256, 1, 2048, True, 3), (256, 1, 1, False, 3)])
def test_a_linear_on_a_small_batch_stays_factored_unless_its_merge_costs_less_than_an_op(features, r, rows, grad,
                                                                                         count):
    """Four rows: W0, then A, then B (three products); a Linear(64, 64) merges in fewer
    multiply-adds (8192) than an op's fixed cost, then runs: two, with a gradient or without.
    A Linear(256, 256) at r=1 merges in as few, but writing and reading its merged weight costs
    more than an op: on one row it stays factored, on 2048 it merges, except in training, where
    its merged weight's gradient would cost 512 times the merge."""
    layer = _layer(make=lambda: nn.Linear(features, features), r=r)
    x = torch.randn(rows, features)
    with torch.set_grad_enabled(grad), _Ops() as ops:
        out = layer(x)
    assert sum(n.startswith(("addmm", "mm", "linear")) for n in ops.names) == count
    torch.testing.assert_close(out, _merged_reference(layer, x))


def test_merged_and_factored_forms_give_the_same_gradients():
    """In float64, where the two sums differ only in their last bits."""
    torch.manual_seed(0)
    small = _layer(make=lambda: nn.Conv2d(4, 6, 3, padding=1)).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    count, out = _convolutions(small, x, True)  # the merged weight: one conv forward
    assert count == 1
    merged_grads = [p.grad.clone() for p in li.lora_parameters(small)]
    lora = _lora(small)
    A, B, s = lora.lora_A["default"].detach(), lora.lora_B["default"].detach(), lora.adapter("default").scaling
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    w0 = small.parametrizations.weight.original
    h = F.conv2d(x, A.view(2, 4, 3, 3), padding=1)  # the factored form, by hand
    want = F.conv2d(x, w0, small.bias, padding=1) + s * F.conv2d(h, B.view(6, 2, 1, 1))
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(merged_grads, [A.grad, B.grad])


@pytest.mark.parametrize("make, x", [(lambda: nn.Linear(16, 16), torch.randn(5, 16)),
                                     (lambda: nn.Conv2d(16, 16, 3), torch.randn(1, 16, 3, 3))],
                         ids=["linear", "conv2d"])
def test_vmap_over_the_factors_without_a_gradient(make, x):
    """An ensemble of adapters on one shared W0, vmapped under no_grad: nothing is added in place
    into an output that lacks the batch dimension of the branch."""
    layer = make()
    li.inject(layer, "", r=2, alpha=4)
    ensemble = {k: torch.randn(3, *v.shape) for k, v in layer.named_parameters() if "lora_" in k}
    with torch.no_grad():
        got = torch.func.vmap(lambda p: functional_call(layer, p, (x,)))(ensemble)
    for i in range(3):
        want = functional_call(layer, {k: v[i] for k, v in ensemble.items()}, (x,))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)  # batched kernels: other last bits


def test_a_kept_weight_follows_a_data_swap_of_its_tensors():
    """Casting the factors through ``.data`` (as mixed-precision recipes do) keeps the objects but
    changes their storage: the kept weight is made again."""
    layer = li.inject(nn.Linear(16, 16).to(torch.bfloat16), "", r=4, alpha=8)
    randomize(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    layer(x)
    for p in li.lora_parameters(layer):
        p.data = p.data.float()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        plain = li.remove(copy.deepcopy(layer), merge=True)
    torch.testing.assert_close(out, plain(x), rtol=2e-2, atol=2e-2)


def test_no_tensor_outlives_its_place_in_the_module():
    """A kept weight holds no W0 that was assigned away, and no tensor that a ``functional_call``
    swapped in for one call once the layer has run again (until then it may: the documented
    limit of keeping the value)."""
    layer = li.inject(nn.Linear(64, 64), "", r=2, alpha=4)
    x = torch.randn(3, 64)
    layer(x)
    old = weakref.ref(layer.parametrizations.weight.original)
    layer.weight = torch.randn(64, 64)  # a new W0
    gc.collect()
    assert old() is None
    other = li.inject(nn.Linear(64, 64), "", r=2, alpha=4)
    params = dict(other.named_parameters())
    refs = [weakref.ref(p) for p in params.values()]
    functional_call(layer, params, (x,))
    del other, params
    layer(x)
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
