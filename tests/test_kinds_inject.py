"""Every kind of update (LoHa, LoKr, OFT, IA³, VeRA) injected into every layer type the rules reach.

The reference is the test's own: a float64 copy of the plain layer run through
``torch.func.functional_call`` with each adapted weight replaced by the weight the kind's math
(:func:`lora_inject.kind.merged`) makes of ``W0`` in the tensor's matrix view, and for a kind that
changes the bias (IA³) the bias the kind's ``apply_bias`` makes of it, with the bias the rule names.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import randomize_kind, run
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import CASES, Case
from torch import Tensor, nn

import lora_inject as li
from lora_inject import kind as kind_module
from lora_inject.kind import find_kind, merged
from lora_inject.rule import find_rule

F64 = torch.float64
KIND_NAMES = ["loha", "lokr", "oft", "ia3", "vera"]
CASE_NAMES = list(CASES)
FEW = settings(max_examples=max(2, settings.default.max_examples // 8))


# -- helpers -------------------------------------------------------------------------------------
def options(data, kind: str, case: Case) -> dict:
    """Arguments of ``inject`` for ``kind`` that fit every adapted tensor of ``case``."""
    if kind == "loha":
        return dict(r=case.r, alpha=case.alpha, use_effective_conv2d=data.draw(st.booleans(), label="effective"))
    if kind == "lokr":
        return dict(r=case.r, alpha=case.alpha, decompose_both=data.draw(st.booleans(), label="both"),
                    use_effective_conv2d=data.draw(st.booleans(), label="effective"))
    if kind == "oft":  # one block spans the rotated dimension of every tensor: no size to adjust
        return dict(r=1, oft_block_size=0, use_cayley_neumann=data.draw(st.booleans(), label="neumann"))
    if kind == "ia3":
        return dict(feedforward=data.draw(st.booleans(), label="feedforward"))
    return dict(r=case.r)


def inject(model, case: Case, kind: str, kw: dict, adapter="default"):
    return li.inject(model, case.targets, kind=kind, adapter=adapter, rules=case.rules, **kw)


def expected(model: nn.Module, base: nn.Module, case: Case, adapters) -> dict[str, Tensor]:
    """The weights (and biases) the adapters ``adapters`` of ``model`` make of ``base``'s, in
    float64, in the order given, by each kind's own math."""
    found = dict(li.named_loras(model))
    out = {}
    for a in case.adapted:
        module = base.get_submodule(a.module)
        lora = found[a.key]
        view = lora.view
        M = view.rows(getattr(module, a.tensor).detach().to(F64))
        bias_name = find_rule(module, case.rules).bias
        bias_name = bias_name(a.tensor) if bias_name is not None else None
        b = getattr(module, bias_name, None) if bias_name else None
        for name in adapters:
            rec = lora.adapter(name)
            kind = find_kind(rec.kind)
            params = {k: v.detach().to(F64) for k, v in lora.tensors(name).items()}
            M = merged(M, [(kind, params, rec.scaling, rec.options)], view)
            if b is not None and kind.apply_bias is not None:
                b = kind.apply_bias(b.detach().to(F64), params, view, rec.options)
        out[a.key] = view.stored(M)
        if b is not None and kind.apply_bias is not None:
            out[f"{a.module}.{bias_name}" if a.module else bias_name] = b
    return out


def assert_all_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype))


def loss_of(outputs, seed) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- every kind on every layer type -----------------------------------------------------------------
@pytest.mark.parametrize("layer", CASE_NAMES)
@pytest.mark.parametrize("kind", KIND_NAMES)
@FEW
@given(data=st.data())
def test_kind_on_layer(kind, layer, data):
    case = data.draw(CASES[layer], label="case")
    kw = options(data, kind, case)
    before = state(case.model)
    mha = case.model if isinstance(case.model, nn.MultiheadAttention) else None
    separate = any(a.tensor in ("q_proj_weight", "k_proj_weight", "v_proj_weight") for a in case.adapted)
    if kind == "ia3" and separate and mha.in_proj_bias is not None and not kw["feedforward"]:
        with pytest.raises(ValueError, match=r"kind='ia3'.*`in_proj_bias` has shape"):
            inject(case.model, case, kind, kw)  # q/k/v_proj_weight share one bias of 3 x their outputs
        assert not hasattr(case.model, "parametrizations")
        return
    model = inject(copy.deepcopy(case.model), case, kind, kw)
    assert sorted(k for k, _ in li.named_loras(model)) == sorted(a.key for a in case.adapted)
    assert all(lora.adapter("default").kind == kind for _, lora in li.named_loras(model))
    sd = model.state_dict()  # the base keys hold W0 (and the bias) as before; it loads back strictly
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    model.load_state_dict(sd)

    # identity at init: every kind's init is an exact identity, bit for bit
    assert_all_equal(run(model, case), run(copy.deepcopy(case.model), case))

    # the forward equals the plain layer with the kind's merged weight (and bias)
    randomize_kind(model, "default", case.seed)
    base = copy.deepcopy(case.model).to(F64)
    want = expected(model, base, case, ["default"])
    out = run(model, case)
    assert_all_close(out, run(base, case, F64, params=want))

    # gradients reach every trained tensor, and no base tensor
    loss_of(out, case.seed).backward()
    trained = list(li.lora_parameters(model))
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    for a in case.adapted:
        assert model.get_submodule(a.module).parametrizations[a.tensor].original.grad is None

    # remove(merge=True) writes the hand merge; remove(merge=False) gives back W0 bit for bit
    merged_model = li.remove(copy.deepcopy(model), merge=True)
    got = merged_model.state_dict()
    for key, w in want.items():
        torch.testing.assert_close(got[key], w.to(got[key].dtype))
    restored = li.remove(model, merge=False)
    after = restored.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(True for _ in li.named_loras(restored))


@pytest.mark.parametrize("layer", ["linear", "conv2d", "hf_conv1d", "embedding", "rnn"])
@pytest.mark.parametrize("kind", KIND_NAMES)
@FEW
@given(data=st.data())
def test_kind_at_a_strength(kind, layer, data):
    """A strength s (``activate(model, {name: s})``) takes each adapted tensor from W0 to
    W0 + s * (W1 - W0), W1 being what the adapter makes of it at full strength: a scaling of
    an additive update, a step of that size towards a multiplicative kind's weight; the bias
    that IA³ scales too moves the same way. ``remove(merge=True)`` merges at it."""
    case = data.draw(CASES[layer], label="case")
    s = data.draw(st.sampled_from([0.0, 0.5, -0.3, 1.7]), label="strength")
    model = inject(copy.deepcopy(case.model), case, kind, options(data, kind, case))
    randomize_kind(model, "default", case.seed)
    base = copy.deepcopy(case.model).to(F64)
    full = expected(model, base, case, ["default"])
    plain = dict(base.named_parameters())
    want = {k: torch.lerp(plain[k], w, s) for k, w in full.items()}
    li.activate(model, {"default": s})
    assert_all_close(run(model, case), run(base, case, F64, params=want))
    got = li.remove(model, merge=True).state_dict()
    for key, w in want.items():
        torch.testing.assert_close(got[key], w.to(got[key].dtype))


@pytest.mark.parametrize("layer", ["linear", "conv2d", "hf_conv1d", "rnn", "multihead_attention", "embedding"])
@FEW
@given(data=st.data())
def test_kinds_stack_in_injection_order(layer, data):
    case = data.draw(CASES[layer], label="case")
    first, second = data.draw(st.permutations(KIND_NAMES), label="kinds")[:2]
    model = copy.deepcopy(case.model)
    inject(model, case, first, options(data, first, case), adapter="first")
    inject(model, case, second, options(data, second, case), adapter="second")
    randomize_kind(model, "first", case.seed)
    randomize_kind(model, "second", case.seed + 1)
    base = copy.deepcopy(case.model).to(F64)
    want = run(base, case, F64, params=expected(model, base, case, ["first", "second"]))
    assert_all_close(run(model, case), want)
    li.activate(model, ["second", "first"])  # the order they were injected in, not activate's
    assert_all_close(run(model, case), want)
    with li.disabled(model):
        assert_all_equal(run(model, case), run(copy.deepcopy(case.model), case))
    li.activate(model, ["first"])
    assert_all_close(run(model, case), run(base, case, F64, params=expected(model, base, case, ["first"])))


def test_kind_with_lora_in_order():
    torch.manual_seed(0)
    layer, x = nn.Linear(6, 4), torch.randn(3, 6)
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    li.inject(layer, "", r=2, alpha=4, adapter="lora")
    li.inject(layer, "", kind="ia3", adapter="ia3")
    lora = layer.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B["lora"].normal_()
        lora.ia3_l["ia3"].normal_()
    A, B, scale = lora.lora_A["lora"], lora.lora_B["lora"], lora.ia3_l["ia3"]
    want = (W0 + 2 * B @ A) * scale  # LoRA first, then IA³ scales the rows of the sum
    torch.testing.assert_close(layer.weight, want)
    torch.testing.assert_close(layer(x), x @ want.T + b0 * scale[:, 0])
    with torch.no_grad(), li.cached(layer):
        first = layer(x)
        assert torch.equal(layer(x), first)
    li.remove(layer, merge=True)
    torch.testing.assert_close(layer.weight, want)
    torch.testing.assert_close(layer.bias, b0 * scale[:, 0])


def test_ia3_scales_the_bias_and_gives_it_back():
    torch.manual_seed(0)
    layer, x = nn.Linear(5, 3), torch.randn(2, 5)
    b0 = layer.bias
    li.inject(layer, "", kind="ia3")
    assert "bias" in layer.state_dict() and "parametrizations.bias.original" not in layer.state_dict()
    with torch.no_grad():
        layer.parametrizations.weight[0].ia3_l["default"].fill_(2.0)
    torch.testing.assert_close(layer(x), 2 * (x @ layer.parametrizations.weight.original.T + b0))
    li.remove(layer, merge=False)
    assert layer.bias is b0 and not hasattr(layer, "parametrizations")


def test_ia3_feedforward_is_a_selector():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    li.inject(model, r"^(0|2)$", kind="ia3", feedforward=r"^2$")
    found = dict(li.named_loras(model))
    assert found["0.weight"].adapter("default").options["feedforward"] is False
    assert found["2.weight"].adapter("default").options["feedforward"] is True
    assert found["0.weight"].ia3_l["default"].shape == (6, 1)
    assert found["2.weight"].ia3_l["default"].shape == (1, 6)


def test_vera_sites_hold_slices_of_one_projection():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    li.inject(model, r"^(0|2)$", kind="vera", r=2, projection_prng_key=7)
    kind = find_kind("vera")
    views = [lora.view for _, lora in li.named_loras(model)]
    full = kind.shared(views, 2, kind.resolve(2, None, projection_prng_key=7)[2])
    for _, lora in li.named_loras(model):
        v = lora.view
        assert torch.equal(lora.vera_A["default"], full["vera_A"][:2, :v.in_features])
        assert torch.equal(lora.vera_B["default"], full["vera_B"][:v.out_features, :2])
        assert not lora.vera_A["default"].requires_grad
    trained = {id(p) for p in li.lora_parameters(model)}
    assert all(id(lora.vera_A["default"]) not in trained for _, lora in li.named_loras(model))
    assert any(k.endswith("vera_A.default") for k in li.lora_state_dict(model))


def test_mark_only_adapters_train():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    li.inject(model, r"^0$", kind="loha", r=2)
    li.mark_only_lora_as_trainable(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"0.parametrizations.weight.0.hada_w{i}_{ab}.default" for i in (1, 2) for ab in "ab"}


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(kind="loha", dora=True), r"kind='loha'.*dora=True belong"),
    (dict(kind="oft", init="pissa"), r"kind='oft'.*init='pissa' belong"),
    (dict(kind="lokr", rslora=True), r"rslora=True belong"),
    (dict(kind="loha", dropout=0.1), r"dropout=0.1 belong"),
    (dict(kind="ia3", alpha=2.0), r"'ia3' has no `alpha`"),
    (dict(kind="vera", alpha=2.0), r"'vera' has no `alpha`"),
    (dict(kind="ia3", r=4), r"'ia3' has no rank"),
    (dict(kind="nope"), r"unknown `kind` 'nope'"),
])
def test_refusals(kw, match):
    model = nn.Sequential(nn.Linear(4, 4))
    before = state(model)
    with pytest.raises(ValueError, match=match):
        li.inject(model, "0", **kw)
    assert not hasattr(model[0], "parametrizations") and all(torch.equal(model.state_dict()[k], v)
                                                            for k, v in before.items())


def test_oft_module_dropout_warns_and_does_what_peft_does():
    """peft 0.21's OFT layers build the dropout layer of ``module_dropout`` but never call it: the
    option is taken (so peft's files load), does nothing, and says so."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"module_dropout=0.1 has no effect"):
        dropped = li.inject(copy.deepcopy(plain), "0", kind="oft", oft_block_size=4, module_dropout=0.1)
    kept = li.inject(copy.deepcopy(plain), "0", kind="oft", oft_block_size=4)
    with torch.no_grad():
        for p in li.lora_parameters(dropped):
            p.normal_()
    kept.load_state_dict(dropped.state_dict())
    dropped.train(), kept.train()
    x = torch.randn(5, 8)
    assert torch.equal(dropped(x), kept(x))


def test_refuses_unknown_options():
    with pytest.raises(TypeError, match=r"kind='loha'.*unknown option"):
        li.inject(nn.Linear(4, 4), "", kind="loha", oft_block_size=2)
    with pytest.raises(TypeError, match=r"kind='lora' takes none"):
        li.inject(nn.Linear(4, 4), "", r=2, use_effective_conv2d=True)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 4))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x @ self.kernel.T + self.bias


def test_ia3_refuses_a_bias_the_rule_does_not_map():
    model = nn.Sequential(Scaled())
    rules = {**li.default_rules(), Scaled: li.Rule(("kernel",))}
    with pytest.raises(ValueError, match=r"kind='ia3'.*does not say which bias goes with 'kernel'"):
        li.inject(model, "0", kind="ia3", rules=rules)
    assert not hasattr(model[0], "parametrizations")
    li.inject(model, "0", kind="ia3", rules=rules, feedforward=True)  # scaling the input: no bias to map
    assert "bias" not in model[0].parametrizations
    li.remove(model, merge=False)
    rules[Scaled] = li.Rule(("kernel",), bias=lambda name: "bias")
    li.inject(model, "0", kind="ia3", rules=rules)
    assert isinstance(model[0].parametrizations.bias[0], li.lora.Bias)


def test_ia3_refuses_mha_with_separate_projections():
    mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
    with pytest.raises(ValueError, match=r"kind='ia3'.*in_proj_bias.*has shape \(12,\)"):
        li.inject(mha, "", kind="ia3")
    assert not hasattr(mha, "parametrizations")
    li.inject(mha, "", kind="ia3", feedforward=True)  # scaling the inputs leaves the bias alone
    assert sorted(mha.parametrizations) == ["k_proj_weight", "q_proj_weight", "v_proj_weight"]


def test_refusals_after_inject():
    model = nn.Sequential(nn.Linear(4, 4))
    li.inject(model, "0", kind="loha", r=2, adapter="a")
    li.inject(model, "0", r=2, adapter="b")
    with pytest.raises(RuntimeError, match=r"per_sample\(\): adapter 'a' .* is of kind 'loha'"):
        with li.per_sample(model.eval(), ["a", "b"]):
            model(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"kind 'loha'.*Combine kind='lora' adapters only"):
        li.combine(model, {"a": 1.0, "b": 1.0}, "c")


# -- our format -------------------------------------------------------------------------------------
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv1d(6, 4, 3), nn.LSTM(4, 3))


def forward(model, x):
    h = model[1](model[0](x)).transpose(-1, -2)
    return model[3](model[2](h).transpose(-1, -2))[0]


@pytest.mark.parametrize("kind, kw", [
    ("loha", dict(r=2, alpha=3.0)), ("lokr", dict(r=2, decompose_both=True)),
    ("oft", dict(r=1, oft_block_size=0)), ("ia3", dict(feedforward=r"^2$")), ("vera", dict(r=2)),
])
def test_our_format_round_trip(tmp_path, kind, kw):
    model, x = small_model(), torch.randn(2, 5, 4)
    li.inject(model, r"^(0|2|3)$", kind=kind, adapter="a", **kw)
    randomize_kind(model, "a", 1)
    want = forward(model, x)
    li.save_adapter(model, tmp_path, adapter="a")
    fresh = small_model()
    li.load_adapter(fresh, tmp_path)
    assert torch.equal(forward(fresh, x), want)
    for key, t in li.lora_state_dict(model).items():
        assert torch.equal(fresh.state_dict()[key], t)
    assert {n: lo.adapter("a").options for n, lo in li.named_loras(fresh)} == {
        n: lo.adapter("a").options for n, lo in li.named_loras(model)}
    # a hot swap into the same slot: the values change in place
    li.load_adapter(fresh, tmp_path, adapter="a")
    assert torch.equal(forward(fresh, x), want)


@pytest.mark.parametrize("fmt", ["lora_inject", "peft"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_swap_takes_the_files_alpha(tmp_path, kind, fmt):
    """A hot swap equals a fresh load: the swapped-in adapter's alpha / r, not the slot's."""
    x = torch.randn(3, 4)
    for alpha, seed in ((4.0, 1), (12.0, 2)):
        model = small_model()[:2]
        li.inject(model, "0", kind=kind, r=2, alpha=alpha)
        randomize_kind(model, "default", seed)
        li.save_adapter(model, tmp_path / str(alpha), format=fmt)
    swapped = li.load_adapter(li.load_adapter(small_model()[:2], tmp_path / "4.0"), tmp_path / "12.0")
    fresh = li.load_adapter(small_model()[:2], tmp_path / "12.0")
    assert torch.equal(swapped(x), fresh(x))
    assert next(lo for _, lo in li.named_loras(swapped)).adapter("default").alpha == 12.0


def test_our_format_refuses_a_swap_into_another_kind(tmp_path):
    model = small_model()
    li.inject(model, r"^0$", kind="loha", r=2, adapter="a")
    li.save_adapter(model, tmp_path, adapter="a")
    other = small_model()
    li.inject(other, r"^0$", r=2, adapter="a")
    before = state(other)
    with pytest.raises(ValueError, match=r"of kind 'loha' in the saved adapter but 'lora'"):
        li.load_adapter(other, tmp_path, adapter="a")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_peft_format_refuses_kinds_where_peft_has_no_layer(tmp_path):
    """peft's format holds the kinds on the layers peft's tuners wrap (tests/test_peft_kinds.py),
    and refuses the rest by kind and layer type."""
    model = small_model()
    li.inject(model, r"^3$", kind="oft", r=1, oft_block_size=0)
    with pytest.raises(ValueError, match=r"`3` is of type LSTM, and lora_inject carries peft's OFT on Linear, Conv2d"):
        li.save_adapter(model, tmp_path, format="peft")


def test_init_lora_refuses_other_kinds():
    model = nn.Sequential(nn.Linear(4, 4))
    li.inject(model, "0", kind="loha", r=2)
    with pytest.raises(ValueError, match=r"init_lora\(\): adapter 'default' .* is of kind 'loha'"):
        li.init_lora(model)


def test_merging_part_of_a_stack_keeps_the_order():
    torch.manual_seed(0)
    layer, x = nn.Linear(4, 4), torch.randn(2, 4)
    li.inject(layer, "", r=2, adapter="a")
    li.inject(layer, "", kind="oft", r=1, oft_block_size=0, adapter="b")
    randomize_kind(layer, "a", 0)
    randomize_kind(layer, "b", 1)
    want = layer(x)
    before = state(layer)
    with pytest.raises(ValueError, match=r"merging \['b'\] .* while \['a'\] stay active.*kind 'oft'"):
        li.remove(layer, adapter="b")
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    li.remove(layer, adapter="a")  # the first one goes into W0 under the rotation: the same outputs
    torch.testing.assert_close(layer(x), want)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, 4))

    def forward(self, x):  # (E, n, in) -> (E, n, out)
        return torch.einsum("eni,eoi->eno", x, self.w)


@pytest.mark.parametrize("kind, kw", [
    ("loha", dict(r=2)), ("lokr", dict(r=2)), ("oft", dict(r=2, oft_block_size=0)), ("ia3", {}),
    ("ia3", dict(feedforward=True)), ("vera", dict(r=2)),
])
def test_kinds_on_experts(kind, kw):
    torch.manual_seed(0)
    rules = {**li.default_rules(), Experts: li.Rule(("w",), experts=True)}
    model, x = nn.Sequential(Experts()), torch.randn(3, 5, 4)
    base = model(x)
    li.inject(model, "0", kind=kind, rules=rules, **kw)
    assert torch.equal(model(x), base)
    randomize_kind(model, "default", 0)
    lora = model[0].parametrizations.w[0]
    assert all(t.shape[0] == 3 for k, t in lora.tensors("default").items() if k not in ("vera_A", "vera_B"))
    rec = lora.adapter("default")
    params = {k: v.detach().to(F64) for k, v in lora.tensors("default").items()}
    W = merged(lora.view.rows(model[0].parametrizations.w.original.to(F64)),
               [(find_kind(kind), params, rec.scaling, rec.options)], lora.view)
    torch.testing.assert_close(model(x), torch.einsum("eni,eoi->eno", x.to(F64), W).float())


def test_a_users_own_kind(monkeypatch):
    monkeypatch.setattr(kind_module, "_KINDS", dict(li.default_kinds()))  # registered for this test only

    def create(view, r, alpha, options):  # one gain per output unit, ones at init
        return {"gain": torch.ones(*view.lead, view.out_features)}

    def apply(W, params, view, scaling, options):
        return W * params["gain"][..., :, None]

    li.register_kind("gain", li.Kind("gain", create=create, apply=apply, default_r=None, default_alpha=None))
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False)), torch.randn(1, 2, 5, 5)
    base = model(x)
    li.inject(model, "0", kind="gain")
    assert torch.equal(model(x), base)
    with torch.no_grad():
        model[0].parametrizations.weight[0].gain["default"].fill_(3.0)
    torch.testing.assert_close(model(x), 3 * base)
    assert [n for n, _ in model.named_parameters() if "gain" in n] == ["0.parametrizations.weight.0.gain.default"]


def test_refuses_a_sparse_lookup():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True))
    with pytest.raises(ValueError, match=r"kind='loha'.*Embedding `0` has sparse=True"):
        li.inject(model, "0", kind="loha", r=2)
    assert not hasattr(model[0], "parametrizations")
