"""LoftQ init on quantized bases: ``inject(..., init="loftq", dense=state_dict)`` starts the
adapter so that the quantized ``W0 + s * B @ A`` is the closest rank-r correction to the dense
weight, ``W0`` untouched. The oracles: the truncated SVD of ``dense - dequantize(W0)`` (the best
rank-r residual), and peft's LoftQ on the same quantized weight (``replace_lora_weights_loftq``'s
``_loftq_init_new``: peft's own decomposition of that residual, with peft's scaling)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_inject as li
from lora_inject import _quant as quant

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
from test_quant import stored_bits  # noqa: E402
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: E402

SCHEMES = ["bnb-nf4", "bnb-fp4", "torchao-nf4"]


def dense_mlp(seed: int = 0) -> nn.Sequential:
    """Weights like trained ones: a few strong directions and noise."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            out, inn = layer.weight.shape
            layer.weight.copy_(torch.randn(out, 6) @ torch.randn(6, inn) / 4 + 0.02 * torch.randn(out, inn))
    return model


def quantized(model: nn.Sequential, scheme: str) -> nn.Sequential:
    model = copy.deepcopy(model)
    for i in (0, 2):
        layer = model[i]
        if scheme == "torchao-nf4":
            layer.weight = nn.Parameter(to_nf4(layer.weight.detach()), requires_grad=False)
            continue
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, quant_type=scheme[4:],
                              compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type=scheme[4:])
        q.bias = nn.Parameter(layer.bias.data.clone())
        model[i] = q.to("cpu")
    return model


def residuals(model, dense_sd, i: int, r: int, s: float) -> tuple[float, float, float, float]:
    """(ours, the best rank-r one, peft's, the quantized weight's alone) for layer ``i``."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    W = dense_sd[f"{i}.weight"].double()
    W0 = quant.dense(model[i].parametrizations.weight.original).double()
    D = W - W0
    with torch.no_grad():
        ours = (W - model[i].weight.double()).norm()
    best = torch.linalg.svdvals(D)[r:].square().sum().sqrt()
    f = _low_rank_decomposition(D.float(), reduced_rank=r)  # what _loftq_init_new sets as lora_B, lora_A
    theirs = (D - s * (f["L"] @ f["R"]).double()).norm()  # peft's forward scales them by s
    return float(ours), float(best), float(theirs), float(D.norm())


@pytest.mark.parametrize("alpha", [4, 16], ids=["s=1", "s=4"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_loftq_starts_at_the_best_rank_r_correction(scheme, alpha):
    dense = dense_mlp()
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    model = quantized(dense, scheme)
    bits = [stored_bits(model[i].weight) for i in (0, 2)]
    li.inject(model, ["0", "2"], r=4, alpha=alpha, init="loftq", dense=sd)
    for i, before in zip((0, 2), bits, strict=True):  # W0 is never rewritten
        after = stored_bits(model[i].parametrizations.weight.original)
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        ours, best, theirs, plain = residuals(model, sd, i, 4, alpha / 4)
        assert ours <= 1.02 * best  # within 2% of the optimum (here: the optimum, up to rounding)
        assert ours <= theirs * (1 + 1e-5)  # never above peft's LoftQ on the same quantized weight
        assert ours < plain  # it corrects part of the quantization error (noise-like: rank r takes a part)
        if alpha != 4:  # peft sets the factors without the scaling: off by s
            assert ours < 0.9 * theirs
    x = torch.randn(8, 256)
    with torch.no_grad():
        err = (model(x) - dense(x)).norm()
        with li.disabled(model):
            err_plain = (model(x) - dense(x)).norm()
    assert err < err_plain


def test_peft_loftq_on_the_same_weight_on_a_gpu():
    """peft's function itself, where it can run (it computes on CUDA)."""
    if not torch.cuda.is_available():
        pytest.skip("peft's _loftq_init_new computes on CUDA; the CPU test above uses its decomposition")
    from peft.utils.loftq_utils import _loftq_init_new

    dense = dense_mlp()
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    model = li.inject(quantized(dense, "bnb-nf4"), ["0"], r=4, alpha=4, init="loftq", dense=sd)
    w = model[0].parametrizations.weight.original
    A, B = _loftq_init_new(w.cuda(), sd["0.weight"], num_bits=4, reduced_rank=4)
    W = sd["0.weight"].double()
    theirs = (W - quant.dense(w).double() - (B @ A).double().cpu()).norm()
    with torch.no_grad():
        assert (W - model[0].weight.double()).norm() <= theirs * (1 + 1e-5)


def test_a_loftq_adapter_trains_saves_and_loads_as_a_plain_lora(tmp_path):
    dense = dense_mlp()
    sd = dense.state_dict()
    model = li.inject(quantized(dense, "bnb-nf4"), ["0", "2"], r=4, alpha=8, init="loftq", dense=sd)
    lora = model[0].parametrizations.weight[0]
    assert lora.adapter("default").init == "default" and not hasattr(lora, "lora_A0")
    x = torch.randn(8, 256)
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in li.lora_parameters(model))
    li.save_adapter(model, tmp_path)
    fresh = li.load_adapter(quantized(dense, "bnb-nf4"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(dict(init="loftq"), ValueError, r"`dense` goes with init='loftq' .* got init='loftq', dense=None",
                 id="no-dense"),
    pytest.param(dict(dense={}), ValueError, r"`dense` goes with init='loftq' .* got init='default', dense=dict",
                 id="dense-without-loftq"),
    pytest.param(dict(init="loftq", dense={}, dora=True), ValueError, r"dora=True", id="dora"),
    pytest.param(dict(init="loftq", dense=[]), TypeError, r"`dense` must be a mapping .* got list", id="not-a-mapping"),
    pytest.param(dict(init="loftq", dense={"0.weight": torch.zeros(128, 256)}), ValueError,
                 r"`dense` lacks \['2\.weight'\] \(1 of the 2 adapted tensors\)", id="missing-key"),
    pytest.param(dict(init="loftq", dense={"0.weight": torch.zeros(256, 128), "2.weight": torch.zeros(128, 128)}),
                 ValueError, r"`dense\['0\.weight'\]` has shape \(256, 128\), but the weight has shape \(128, 256\)",
                 id="shape"),
    pytest.param(dict(init="loftq", alpha=-1.0, dense={}), ValueError, r"init='loftq' .* `alpha` must be positive",
                 id="alpha"),
])
def test_bad_loftq_calls_are_refused_and_change_nothing(call, error, match):
    from _helpers import assert_unchanged, snapshot

    model = quantized(dense_mlp(), "bnb-nf4")
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        li.inject(model, ["0", "2"], **{"r": 4, **call})
    assert_unchanged(model, snap)


def test_loftq_refuses_a_dense_target():
    dense = dense_mlp()
    with pytest.raises(ValueError, match=r"\['0\.weight'\] are not quantized, but LoftQ corrects a quantized W0"):
        li.inject(copy.deepcopy(dense), ["0"], r=4, init="loftq", dense=dense.state_dict())
