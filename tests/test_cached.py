"""cached(): merged weights reused across no-grad forwards, rebuilt whenever anything they read changes."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import lora_inject as li
from lora_inject import _call
from lora_inject.lora import LoRA


def model_and_input():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    li.inject(model, "", r=2, adapter="a")
    li.inject(model, r"^0$", r=3, adapter="b")
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    return model, torch.randn(5, 6, dtype=torch.float64)


def counting():
    return mock.patch.object(LoRA, "merged", autospec=True, side_effect=LoRA.merged)


def test_cached_forwards_equal_unmerged_ones_and_merge_once():
    model, x = model_and_input()
    with torch.no_grad():
        expected = model(x)
    with counting() as merged, torch.no_grad(), li.cached(model):
        for _ in range(3):
            torch.testing.assert_close(model(x), expected)
    assert merged.call_count == 2  # one per adapted tensor, not per forward
    assert _call.CURRENT.get() is None  # freed on exit: the cache was the call's


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: m[0].parametrizations.weight[0].lora_B["a"].add_(1.0), id="factor-in-place"),
    pytest.param(lambda m: m[2].parametrizations.weight.original.mul_(2.0), id="w0-in-place"),
    pytest.param(lambda m: setattr(m[2], "weight", torch.randn(4, 8, dtype=torch.float64)), id="w0-assigned"),
    pytest.param(lambda m: li.activate(m, "b"), id="activate"),
    pytest.param(lambda m: m.load_state_dict({k: v + 1 for k, v in li.lora_state_dict(m).items()}, strict=False),
                 id="load-state-dict"),
])
def test_cache_is_rebuilt_when_what_it_read_changes(change):
    model, x = model_and_input()
    with torch.no_grad(), li.cached(model):
        model(x)
        change(model)
        out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))  # what the model computes without the cache


def test_disabled_inside_cached_gives_the_base_model():
    model, x = model_and_input()
    with torch.no_grad(), li.disabled(model):
        base = model(x)
    with torch.no_grad(), li.cached(model):
        with_adapters = model(x)
        with li.disabled(model):
            torch.testing.assert_close(model(x), base)
        torch.testing.assert_close(model(x), with_adapters)


def test_forwards_with_gradients_do_not_use_the_cache():
    model, x = model_and_input()
    with li.cached(model):
        with torch.no_grad():
            model(x)
        model(x).sum().backward()
    grads = [p.grad for p in li.lora_parameters(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
