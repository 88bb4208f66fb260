"""Kinds other than LoRA on quantized bases: the merged path reads the dequantized weight, the
quantized tensor itself is never written, and a merge requantizes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_inject as li
from lora_inject import _quant as quant
from lora_inject.kind import find_kind, merged

pytest.importorskip("torchao", reason="torchao is not installed (pip install lora_inject[quant])")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install lora_inject[quant])")

from test_quant import KINDS, quantized  # noqa: E402

F64 = torch.float64


@pytest.mark.parametrize("kind", ["ia3", "loha"])
@pytest.mark.parametrize("scheme", KINDS)
def test_kind_on_a_quantized_base(scheme, kind):
    layer = quantized(scheme)
    W = layer.weight
    li.inject(layer, "", kind=kind, **({} if kind == "ia3" else dict(r=2)))
    lora = layer.parametrizations.weight[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in lora.tensors("default").values():
            t.copy_(1 + 0.3 * torch.randn(t.shape, generator=gen) if kind == "ia3" else 0.3 * torch.randn(
                t.shape, generator=gen))
    x = torch.randn(3, W.shape[-1] if quant.scheme(W) is None else quant.shape(W)[1])
    rec = lora.adapter("default")
    params = {k: v.detach().to(F64) for k, v in lora.tensors("default").items()}
    step = [(find_kind(kind), params, rec.scaling, rec.options)]
    want_w = merged(quant.dense(W).to(F64), step, lora.view)
    b = layer.parametrizations.bias.original if hasattr(layer.parametrizations, "bias") else layer.bias
    want_b = b.detach().to(F64)
    if kind == "ia3":
        want_b = find_kind(kind).apply_bias(want_b, params, lora.view, rec.options)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x.to(F64), want_w, want_b).to(out.dtype))
    out.sum().backward()
    assert all(p.grad is not None for p in li.lora_parameters(layer))
    li.remove(layer, merge=False)
    assert layer.weight is W
