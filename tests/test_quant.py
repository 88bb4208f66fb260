"""LoRA on quantized bases (QLoRA): torchao's Int8, Intx and NF4 weights, bitsandbytes' Linear4bit
(nf4, fp4) and Linear8bitLt. Each is checked against the quantized layer itself: its own output
plus ``s * (x A^T) B^T``; training moves the factors only; remove both ways; adapters on disk,
peft's QLoRA adapters included."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lora_inject as li
from lora_inject import _quant as quant

torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install lora_inject[quant])")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install lora_inject[quant])")
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: E402

IN, OUT = 256, 64


def quantized(kind: str, seed: int = 0) -> nn.Linear:
    """One Linear(IN, OUT) with a bias, quantized by ``kind``."""
    torch.manual_seed(seed)
    dense = nn.Linear(IN, OUT)
    if kind in ("int8", "int4"):
        quantize_(dense, Int8WeightOnlyConfig() if kind == "int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4))
        return dense
    if kind == "nf4":
        dense.weight = nn.Parameter(to_nf4(dense.weight.detach()), requires_grad=False)
        return dense
    if kind in ("bnb-nf4", "bnb-fp4"):
        layer = bnb.nn.Linear4bit(IN, OUT, quant_type=kind[4:], compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type=kind[4:])
    else:
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data, requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(dense.bias.data.clone())
    return layer.to("cpu")  # bitsandbytes quantizes as it moves


KINDS = ["int8", "int4", "nf4", "bnb-nf4", "bnb-fp4", "bnb-int8"]


def stored_bits(t: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a quantized weight is made of, to compare bit for bit."""
    if hasattr(t, "__tensor_flatten__") and quant.scheme(t) is not None and type(t).__module__.startswith("torchao"):
        names, _ = t.__tensor_flatten__()
        return [getattr(t, n).clone() for n in names]
    out = [t.data.clone()]
    for k in ("CB", "SCB"):
        if getattr(t, k, None) is not None:
            out.append(getattr(t, k).clone())
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        out.append(qs.absmax.clone())
    return out


def adapted(kind: str, **kw) -> tuple[nn.Module, nn.Module]:
    """(the quantized layer, a copy with LoRA on it whose factors are random)."""
    base = nn.Sequential(quantized(kind))
    model = li.inject(copy.deepcopy(base), "0", r=4, alpha=8, **kw)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return base, model


def branch(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    lora = model[0].parametrizations.weight[0]
    A, B = lora.lora_A["default"], lora.lora_B["default"]
    return lora.scaling["default"] * (x @ A.T) @ B.T


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_the_quantized_layer_plus_the_branch(kind):
    base, model = adapted(kind)
    x = torch.randn(5, IN)
    assert tuple(model[0].weight.shape) == (OUT, IN) and model[0].weight.dtype == torch.float32
    with torch.no_grad():
        want = base(x) + branch(model, x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    out = model(xg)
    torch.testing.assert_close(out, base(x) + branch(model, x), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    lora = model[0].parametrizations.weight[0]
    assert lora.lora_A["default"].grad.abs().sum() > 0 and lora.lora_B["default"].grad.abs().sum() > 0
    # x's gradient is the one the dense dequantized layer gives
    dense = nn.Linear(IN, OUT)
    with torch.no_grad():
        dense.weight.copy_(model[0].weight._merged())
        dense.bias.copy_(base[0].bias.float())
    xd = x.clone().requires_grad_()
    dense(xd).square().sum().backward()
    torch.testing.assert_close(xg.grad, xd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_the_factors_only(kind):
    base, model = adapted(kind)
    before = stored_bits(model[0].parametrizations.weight.original)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} >= {id(p) for p in li.lora_parameters(model)}
    li.mark_only_lora_as_trainable(model)
    opt = torch.optim.SGD(li.lora_parameters(model), lr=0.1)
    factors = [p.clone() for p in li.lora_parameters(model)]
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, IN)).square().mean().backward()
        opt.step()
    after = stored_bits(model[0].parametrizations.weight.original)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert any(not torch.equal(a, b) for a, b in zip(factors, li.lora_parameters(model)))


@pytest.mark.parametrize("kind", KINDS)
def test_remove_without_merge_gives_back_the_very_tensor(kind):
    base, model = adapted(kind)
    stored = model[0].parametrizations.weight.original
    li.remove(model, merge=False)
    assert model[0].weight is stored and type(model[0]) is type(base[0])
    x = torch.randn(3, IN)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_in_the_same_scheme_and_reports_the_rounding(kind):
    base, model = adapted(kind)
    stored = model[0].parametrizations.weight.original
    merged = model[0].weight._merged().detach()
    with pytest.warns(li.RequantizationWarning, match=r"requantizing changed them by up to (\S+) of a weight's"
                                                     r" largest entry \(at `0\.weight`\)") as record:
        li.remove(model, merge=True)
    new = model[0].weight
    assert type(new) is type(stored) and new is not stored and type(model[0]) is type(base[0])
    for attr in ("block_size", "scaler_block_size", "target_dtype", "quant_type", "blocksize"):
        if hasattr(stored, attr):
            assert getattr(new, attr) == getattr(stored, attr)
    if hasattr(stored, "quant_state"):
        assert new.quant_state.blocksize == stored.quant_state.blocksize
        assert new.quant_state.quant_type == stored.quant_state.quant_type
    got = quant.dense(new)
    reported = float(str(record[0].message).split("up to ")[1].split(" ")[0])
    measured = float((got - merged).abs().max() / merged.abs().max())
    assert reported == pytest.approx(measured, rel=1e-2)
    # requantizing the merged weight rounds as quantizing it from scratch does
    fresh = quant.requantize(stored, merged)
    torch.testing.assert_close(got, quant.dense(fresh), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_a_dense_weight_keeps_the_update(kind):
    base, model = adapted(kind)
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = model(x)
    li.remove(model, merge=True, dequantize=True)
    assert type(model[0]) is nn.Linear and type(model[0].weight) is nn.Parameter
    assert model[0].weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4", "bnb-nf4"])
def test_dora_on_a_quantized_base_is_dora_on_its_dequantized_weight(kind):
    base, model = adapted(kind, dora=True)
    dense = nn.Sequential(nn.Linear(IN, OUT))
    with torch.no_grad():
        dense[0].weight.copy_(quant.dense(base[0].weight))
        dense[0].bias.copy_(base[0].bias.float())
    li.inject(dense, "0", r=4, alpha=8, dora=True)
    with torch.no_grad():
        for p, q in zip(li.lora_parameters(dense), li.lora_parameters(model)):
            p.copy_(q)
    x = torch.randn(5, IN, requires_grad=True)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)
    model(x).sum().backward()


@pytest.mark.parametrize("kind", ["int8", "int4", "nf4", "bnb-nf4", "bnb-int8"])
def test_adapter_round_trip_onto_quantized_and_dense_bases(kind, tmp_path):
    base, model = adapted(kind)
    li.save_adapter(model, tmp_path / "ours")
    li.save_adapter(model, tmp_path / "peft", format="peft")
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = model(x)
        for path in ("ours", "peft"):
            back = li.load_adapter(copy.deepcopy(base), tmp_path / path)
            torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
    # the factors don't depend on the base's storage: the same adapter onto the dense model
    dense = nn.Sequential(nn.Linear(IN, OUT))
    with torch.no_grad():
        dense[0].weight.copy_(quant.dense(base[0].weight))
        dense[0].bias.copy_(base[0].bias.float())
    li.load_adapter(dense, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(dense(x), want, rtol=1e-4, atol=1e-4)


def test_inject_after_a_forward_that_still_references_the_weight():
    """parametrize swaps a wrapper-subclass weight with itself, which torch refuses while an
    autograd graph holds it (NF4's linear saves it for backward)."""
    layer = quantized("nf4")
    stored = layer.weight
    x = torch.randn(3, IN, requires_grad=True)
    y = layer(x)  # the graph keeps `stored`
    model = li.inject(nn.Sequential(layer), "0", r=2)
    assert model[0].parametrizations.weight.original is stored
    y.sum().backward()  # the earlier graph still runs
    li.remove(model, merge=False)
    assert model[0].weight is stored


def _llama(bnb4: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    if bnb4:
        to_bnb4(model)
    return model.eval()


def to_bnb4(model: nn.Module, quant_type: str = "nf4") -> nn.Module:
    """Every Linear of the decoder layers as bitsandbytes' Linear4bit, in place."""
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      quant_type=quant_type, compute_dtype=torch.float32)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant_type)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data)
                setattr(parent, name, q.to("cpu"))
    model.is_loaded_in_4bit = True  # as transformers' quantizer marks it, which peft reads
    return model


def test_peft_qlora_adapter_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = _llama(bnb4=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    theirs.eval().save_pretrained(tmp_path / "peft")
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = theirs(x).logits
        # on a copy: in eval mode bitsandbytes repacks a 4-bit weight in place for its CPU kernel
        assert (want - copy.deepcopy(base)(x).logits).abs().max() > 1e-2
        ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft")
        torch.testing.assert_close(ours(x).logits, want, rtol=1e-4, atol=1e-4)
    li.save_adapter(ours, tmp_path / "back", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=1e-4, atol=1e-4)


def test_the_core_imports_no_backend():
    code = ("import sys, torch, lora_inject as li; m = li.inject(torch.nn.Linear(4, 4), '', r=2); m(torch.randn(1, 4));"
            "print(sorted(k for k in ('torchao', 'bitsandbytes', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kind", ["int8", "bnb-nf4", "bnb-int8"])
def test_state_dict_keeps_the_base_keys(kind):
    base, model = adapted(kind)
    plain, ours = base.state_dict(), model.state_dict()
    assert set(plain) == {k for k in ours if ".lora_" not in k}
    for k, v in plain.items():  # the same tensors: quantized ones by their dense value
        assert type(ours[k]) is type(v) and torch.equal(quant.dense(ours[k]), quant.dense(v))


# -- quantized bases after real use ------------------------------------------------------------------

def _used_int8() -> nn.Module:
    """A Linear8bitLt after a forward: bitsandbytes has moved its scales to ``module.state``."""
    layer = quantized("bnb-int8")
    layer(torch.randn(2, IN))
    assert layer.weight.SCB is None and layer.state.SCB is not None
    return nn.Sequential(layer)


def _dense_of(layer: nn.Module) -> nn.Linear:
    """The dense dequantized layer a Linear8bitLt stands for, read from bitsandbytes' own state."""
    dense = nn.Linear(IN, OUT)
    with torch.no_grad():
        dense.weight.copy_(layer.state.CB.float() * layer.state.SCB.float().unsqueeze(1) / 127)
        dense.bias.copy_(layer.bias.float())
    return dense


@pytest.mark.parametrize("call", ["dora", "pissa", "weight", "merge"])
def test_a_linear8bitlt_that_ran_a_forward(call):
    model = _used_int8()
    dense = nn.Sequential(_dense_of(model[0]))
    kw = {"dora": dict(dora=True), "pissa": dict(init="pissa")}.get(call, {})
    li.inject(model, "0", r=4, alpha=8, **kw)
    li.inject(dense, "0", r=4, alpha=8, **kw)
    with torch.no_grad():
        for p, q in zip(li.lora_parameters(dense), li.lora_parameters(model)):
            if call == "pissa":  # both factored from the same W0
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)
            elif p.dim() > 1:
                p.normal_(0, 0.2)
            q.copy_(p)
    x = torch.randn(3, IN)
    with torch.no_grad():
        model(x)  # another forward through bitsandbytes' own kernel
        torch.testing.assert_close(model[0].weight.detach(), dense[0].weight, rtol=1e-5, atol=1e-5)
        want = dense(x)
        torch.testing.assert_close(model(x), want, rtol=1e-3, atol=1e-3)
    if call == "merge":
        with pytest.warns(li.RequantizationWarning):
            li.remove(model, merge=True)
        merged = dense[0].weight.detach()
        fresh = bnb.nn.Int8Params(merged.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        torch.testing.assert_close(quant.dense(model[0].weight), quant.dense(fresh), rtol=0, atol=0)
        with torch.no_grad():
            model(x)  # bitsandbytes' own forward on the requantized weight, which takes its scales
        assert torch.equal(model[0].state.CB, fresh.CB) and torch.equal(model[0].state.SCB, fresh.SCB)


def test_a_linear8bitlt_keeps_its_scales_through_forwards_with_adapters_off():
    model = li.inject(_used_int8(), "0", r=4)
    with torch.no_grad(), li.disabled(model):
        model(torch.randn(2, IN))  # bitsandbytes' forward sees W0 itself
    li.remove(model, merge=True, dequantize=True)
    assert type(model[0]) is nn.Linear


def _asymmetric_intx(seed: int = 0):
    from torchao.quantization import MappingType
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                mapping_type=MappingType.ASYMMETRIC)


@pytest.mark.parametrize("asymmetric", [True, False])
def test_intx_requantizes_in_its_own_mapping(asymmetric):
    torch.manual_seed(0)
    config = _asymmetric_intx() if asymmetric else IntxWeightOnlyConfig(weight_dtype=torch.int4)
    model = nn.Sequential(nn.Linear(IN, OUT))
    quantize_(model, config)
    assert bool(model[0].weight.zero_point.any()) is asymmetric
    li.inject(model, "0", r=4, alpha=8)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.2)
    merged = model[0].weight.detach().detach()
    with pytest.warns(li.RequantizationWarning):
        li.remove(model, merge=True)
    # torchao's own quantization of W0 + ΔW with the same config is the oracle
    oracle = nn.Sequential(nn.Linear(IN, OUT))
    with torch.no_grad():
        oracle[0].weight.copy_(merged)
    quantize_(oracle, config)
    got, want = model[0].weight, oracle[0].weight
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.block_size == want.block_size and got.target_dtype == want.target_dtype


def test_a_refused_remove_leaves_every_layer_unchanged():
    from torch.nn.utils import parametrize
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    # the first layer's groups span its rows (a per-row block, which requantizes), the second's do not
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    quantize_(model, Int8WeightOnlyConfig(granularity=PerGroup(32)))
    li.inject(model, ["0", "2"], r=4)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.2)
    before = {k: stored_bits(v) if quant.scheme(v) else [v.clone()]
              for k, v in model.state_dict(keep_vars=True).items()}
    classes = [type(m) for m in model]
    plists = [id(m.parametrizations.weight) for m in (model[0], model[2])]
    originals = [m.parametrizations.weight.original for m in (model[0], model[2])]
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match=r"remove\(\): cannot merge into `2\.weight`: .*block_size=\[?\(?1, 32"
                                         r".*The model is unchanged; pass dequantize=True"):
        li.remove(model, merge=True)
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    for k, v in after.items():
        now = stored_bits(v) if quant.scheme(v) else [v]
        assert all(torch.equal(a, b) for a, b in zip(before[k], now)), k
    assert [type(m) for m in model] == classes
    assert all(parametrize.is_parametrized(m, "weight") for m in (model[0], model[2]))
    assert [id(m.parametrizations.weight) for m in (model[0], model[2])] == plists
    assert all(m.parametrizations.weight.original is o for m, o in zip((model[0], model[2]), originals))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    li.remove(model, merge=True, dequantize=True)  # the fix the message names
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
