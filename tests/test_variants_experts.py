"""Expert weights: a rule with ``experts=True`` adapts a 3-D weight (E, out, in) with one pair of
factors per expert, A (E, r, in) and B (E, out, r). Checked against a per-expert reference: a
loop over experts that builds each expert's W0[e] + s * B[e] @ A[e] on its own."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora_inject as li


class MoE(nn.Module):
    """Top-1 routed experts kept as two 3-D Parameters in (E, out, in) layout, as transformers does."""

    def __init__(self, experts: int = 3, dim: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, dim) / math.sqrt(dim))
        self.w_out = nn.Parameter(torch.randn(experts, dim, hidden) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, self.router(x).argmax(-1), lambda e: self.w_in[e], lambda e: self.w_out[e])


def moe_forward(x, top, w_in, w_out):
    out = torch.zeros_like(x)
    for e in range(int(top.max()) + 1):
        idx = (top == e).nonzero().squeeze(-1)
        if idx.numel():
            out = out.index_add(0, idx, F.linear(F.gelu(F.linear(x[idx], w_in(e))), w_out(e)))
    return out


class ExpertsT(nn.Module):
    """Experts stored transposed, (E, in, out), each applied to its own batch: ``bmm(x, W)``."""

    def __init__(self, experts: int = 3, fin: int = 5, fout: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, fin, fout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight)


RULES = {**li.default_rules(), MoE: li.Rule(("w_in", "w_out"), experts=True),
         ExpertsT: li.Rule(("weight",), transpose=True, experts=True)}
ONLY_EXPERTS = lambda name, m: isinstance(m, (MoE, ExpertsT))  # noqa: E731


def expert_weight(lora: li.LoRA, W0: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s adapted weight, from its own factors only."""
    name = "default"
    d = lora.scaling[name] * lora.lora_B[name][e] @ lora.lora_A[name][e]  # (out, r) @ (r, in)
    return W0[e] + (d.T if lora.view.transpose else d)


def build(kind: str):
    if kind == "moe":
        return MoE().double(), (torch.randn(11, 6, dtype=torch.float64),)
    return ExpertsT().double(), (torch.randn(3, 7, 5, dtype=torch.float64),)


def reference(kind, base, model, x, A_B=None):
    """The outputs of ``base`` with each expert's weight built by ``expert_weight``."""
    loras = dict(li.named_loras(model))
    names = ["w_in", "w_out"] if kind == "moe" else ["weight"]
    weights = {}
    for n in names:
        lora = loras[n]
        W0 = getattr(model.parametrizations, n).original
        weights[n] = [expert_weight(lora, W0, e) for e in range(W0.shape[0])]
    if kind == "moe":
        top = base.router(x).argmax(-1)
        return moe_forward(x, top, lambda e: weights["w_in"][e], lambda e: weights["w_out"][e])
    return torch.stack([x[e] @ weights["weight"][e] for e in range(x.shape[0])])


KINDS = [pytest.param("moe", id="moe-rows"), pytest.param("transposed", id="experts-transposed")]


@pytest.mark.parametrize("kind", KINDS)
def test_factors_per_expert_and_init_leaves_outputs_unchanged(kind):
    base, (x,) = build(kind)
    model = li.inject(copy.deepcopy(base), ONLY_EXPERTS, r=2, alpha=3.0, rules=RULES)
    loras = dict(li.named_loras(model))
    assert sorted(loras) == (["w_in", "w_out"] if kind == "moe" else ["weight"])
    for name, lora in loras.items():
        W = getattr(base, name)
        E, rest = W.shape[0], W.shape[1:]
        out, fin = (rest[1], rest[0]) if kind == "transposed" else rest
        assert lora.lora_A["default"].shape == (E, 2, fin) and lora.lora_B["default"].shape == (E, out, 2)
        A = lora.lora_A["default"]
        assert not torch.equal(A[0], A[1])  # each expert draws its own A
        assert torch.equal(lora.lora_B["default"], torch.zeros_like(lora.lora_B["default"]))
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_match_per_expert_reference(kind):
    base, (x,) = build(kind)
    model = li.inject(copy.deepcopy(base), ONLY_EXPERTS, r=3, alpha=2.0, rules=RULES)
    randomize(model)
    li.mark_only_lora_as_trainable(model)
    ours = model(x)
    want = reference(kind, base, model, x)
    assert not torch.allclose(want, base(x))
    torch.testing.assert_close(ours, want)
    factors = [p for _, lora in li.named_loras(model) for p in (lora.lora_A["default"], lora.lora_B["default"])]
    grads = torch.autograd.grad(ours.square().sum(), factors)
    want_grads = torch.autograd.grad(want.square().sum(), factors)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_reference_and_unmerged_remove_restores_w0(kind):
    base, (x,) = build(kind)
    model = li.inject(copy.deepcopy(base), ONLY_EXPERTS, r=2, rules=RULES)
    randomize(model)
    loras = dict(li.named_loras(model))
    params = {n: getattr(model.parametrizations, n).original for n in loras}
    want = {n: torch.stack([expert_weight(lora, params[n], e) for e in range(params[n].shape[0])]).detach()
            for n, lora in loras.items()}
    unmerged = model(x).detach()
    merged = li.remove(copy.deepcopy(model), merge=True)
    for n in loras:
        torch.testing.assert_close(getattr(merged, n), want[n])
    torch.testing.assert_close(merged(x), unmerged)
    li.remove(model, merge=False)
    for n, p in params.items():
        assert getattr(model, n) is p and torch.equal(p, getattr(base, n))


@settings(max_examples=20)
@given(E=st.integers(1, 4), fout=st.integers(1, 5), fin=st.integers(1, 5), transpose=st.booleans(),
       r=st.integers(1, 5), alpha=st.sampled_from([0.5, 1.0, 4.0]), seed=st.integers(0, 2**16))
def test_weight_is_the_per_expert_update(E, fout, fin, transpose, r, alpha, seed):
    torch.manual_seed(seed)
    r = min(r, fout, fin)
    model = ExpertsT(E, fin, fout).double() if transpose else nn.Module()
    if not transpose:
        model.weight = nn.Parameter(torch.randn(E, fout, fin, dtype=torch.float64))
    rule = li.Rule(("weight",), transpose=transpose, experts=True)
    li.inject(model, "", r=r, alpha=alpha, rules={nn.Module: rule})
    randomize(model)
    lora = model.parametrizations.weight[0]
    W0 = model.parametrizations.weight.original
    torch.testing.assert_close(model.weight, torch.stack([expert_weight(lora, W0, e) for e in range(E)]))


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralModel

    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=30,
                        max_position_embeddings=16)
    return MixtralModel(cfg).eval()  # float32: its default grouped-mm experts take no float64


def test_transformers_mixtral_experts_against_per_expert_weights(tmp_path):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    base = tiny_mixtral()
    rules = {**li.default_rules(), MixtralExperts: li.Rule(("gate_up_proj", "down_proj"), experts=True)}
    model = li.inject(copy.deepcopy(base), "experts", r=3, alpha=6.0, rules=rules)
    x = torch.randint(0, 30, (2, 7))
    assert torch.equal(model(x).last_hidden_state, base(x).last_hidden_state)
    randomize(model)
    # The reference: a plain copy whose expert weights are set expert by expert.
    ref = copy.deepcopy(base)
    loras = dict(li.named_loras(model))
    assert sorted(loras) == ["layers.0.mlp.experts.down_proj", "layers.0.mlp.experts.gate_up_proj"]
    with torch.no_grad():
        for key, lora in loras.items():
            module_name, tensor = key.rsplit(".", 1)
            W0 = getattr(model.get_submodule(module_name).parametrizations, tensor).original
            target = getattr(ref.get_submodule(module_name), tensor)
            for e in range(W0.shape[0]):
                target[e] = expert_weight(lora, W0, e)
    ours = model(x).last_hidden_state
    torch.testing.assert_close(ours, ref(x).last_hidden_state)
    assert not torch.allclose(ours, base(x).last_hidden_state)
    # Our format keeps the experts layout: a fresh base model reproduces the outputs exactly.
    li.save_adapter(model, tmp_path)
    loaded = li.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x).last_hidden_state, ours)
    torch.testing.assert_close(li.remove(model, merge=True)(x).last_hidden_state, ours)
