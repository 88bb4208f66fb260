"""DoRA (``dora=True``): ``W = m * V / ||V||`` with ``V = W0 + s * B @ A``, the norm per output
unit and without gradient. Checked against the test's own reference for every default rule (and a
user's rule, and expert weights), on the fast and the merged path, and against peft's
``use_dora=True`` for Linear, transformers' Conv1D, Conv2d and Embedding: outputs and gradients."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from _helpers import randomize, run
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import CASES, FAST, KINDS, Case
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import lora_inject as li

F64 = torch.float64


# -- the reference -------------------------------------------------------------------------------
def dora_weight(W0: Tensor, A: Tensor, B: Tensor, m: Tensor, s: float, transpose: bool) -> Tensor:
    """``m * V / ||V||`` in the matrix view, the norm over ``in`` and detached, back in W0's shape."""
    M = W0.T if transpose else W0.reshape(W0.shape[0], -1)  # (out, in)
    V = M + s * B @ A
    W = m.unsqueeze(-1) * V / V.norm(dim=-1, keepdim=True).detach()
    return W.T if transpose else W.reshape(W0.shape)


def loss_of(outputs, seed) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)


def inject(model: nn.Module, case: Case, **kw) -> nn.Module:
    return li.inject(model, case.targets, r=case.r, alpha=case.alpha, rules=case.rules, dora=True, **kw)


def set_factored(model: nn.Module, value: bool) -> None:
    for _, lora in li.named_loras(model):
        lora.factored = value


def mine(model: nn.Module, case: Case) -> list[Tensor]:
    loras = dict(li.named_loras(model))
    return [t for a in case.adapted for t in (loras[a.key].lora_A["default"], loras[a.key].lora_B["default"],
                                              loras[a.key].lora_magnitude["default"])]


def reference_params(base: nn.Module, case: Case, leaves: list[Tensor]) -> dict[str, Tensor]:
    """The DoRA weights from ``leaves`` (A, B, m per adapted tensor, in ``case.adapted`` order)."""
    s = case.alpha / case.r
    params = {}
    for i, a in enumerate(case.adapted):
        A, B, m = leaves[3 * i: 3 * i + 3]
        params[a.key] = dora_weight(getattr(base.get_submodule(a.module), a.tensor), A, B, m, s, a.transpose)
    return params


# -- every rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_unchanged_at_init(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = run(copy.deepcopy(case.model), case, torch.float32)
    model = inject(copy.deepcopy(case.model), case)
    for _, lora in li.named_loras(model):
        W = lora.lora_magnitude["default"]
        assert W.shape == (lora.view.out_features,) and W.requires_grad
    for factored in (True, False):
        set_factored(model, factored) if not factored else None
        for got, want in zip(run(model, case, torch.float32), base):
            assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_outputs_and_gradients_match_reference(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = copy.deepcopy(case.model).to(F64)
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, magnitude=True)
    leaves = [t.detach().clone().requires_grad_() for t in mine(model, case)]
    want = run(base, case, F64, params=reference_params(base, case, leaves))
    want_grads = torch.autograd.grad(loss_of(want, case.seed), leaves, allow_unused=True, materialize_grads=True)
    for factored in (True, False):
        set_factored(model, factored)
        got = run(model, case, F64)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
        grads = torch.autograd.grad(loss_of(got, case.seed), mine(model, case), allow_unused=True,
                                    materialize_grads=True)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=max(2, settings.default.max_examples // 6))
@given(data=st.data())
def test_merge_and_remove(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = copy.deepcopy(case.model).to(F64)
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, magnitude=True)
    want = reference_params(base, case, [t.detach() for t in mine(model, case)])
    merged = li.remove(copy.deepcopy(model), merge=True)  # copied before a forward: RNNs keep their weights
    unmerged = run(model, case, F64)
    for a in case.adapted:
        torch.testing.assert_close(getattr(merged.get_submodule(a.module), a.tensor), want[a.key])
    for g, w in zip(run(merged, case, F64), unmerged, strict=True):
        torch.testing.assert_close(g, w)
    li.remove(model, merge=False)
    for a in case.adapted:
        assert torch.equal(getattr(model.get_submodule(a.module), a.tensor),
                           getattr(base.get_submodule(a.module), a.tensor))


# -- peft as the oracle ----------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.proj = Conv1D(7, 5)  # transformers' (in, out) layout
        self.head = nn.Linear(7, 4)

    def forward(self, ids):  # (N, H, W) token ids
        h = self.emb(ids).permute(0, 3, 1, 2)  # (N, 6, H, W)
        h = torch.tanh(self.conv(h)).mean((-1, -2))  # (N, 5)
        return self.head(torch.tanh(self.proj(h)))


LAYERS = ["emb", "conv", "proj", "head"]


def peft_dora(base: nn.Module, **config) -> peft.PeftModel:
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=LAYERS, use_dora=True, fan_in_fan_out=False, **config))


def peft_tensors(layer) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, B, m)`` of a peft layer, each a Parameter as peft holds it."""
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return A, B, layer.lora_magnitude_vector["default"].weight


def copy_from_peft(ours: nn.Module, theirs: peft.PeftModel, adapter: str = "default") -> None:
    loras = dict(li.named_loras(ours))
    with torch.no_grad():
        for name in LAYERS:
            A, B, m = peft_tensors(theirs.base_model.model.get_submodule(name))
            lora = loras[f"{name}.weight"]
            lora.lora_A[adapter].copy_(A.reshape(lora.lora_A[adapter].shape))
            lora.lora_B[adapter].copy_(B.reshape(lora.lora_B[adapter].shape))
            lora.lora_magnitude[adapter].copy_(m.reshape(-1))


@pytest.fixture
def net() -> nn.Module:
    return Net().double()


def test_magnitude_init_matches_peft(net):
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft_dora(net, r=2, lora_alpha=3)
    ours = li.inject(copy.deepcopy(net), "|".join(f"^{n}$" for n in LAYERS), r=2, alpha=3.0, dora=True)
    loras = dict(li.named_loras(ours))
    for name in LAYERS:
        *_, m = peft_tensors(theirs.base_model.model.get_submodule(name))
        torch.testing.assert_close(loras[f"{name}.weight"].lora_magnitude["default"], m.detach().reshape(-1))


@pytest.mark.parametrize("factored", [pytest.param(True, id="fast"), pytest.param(False, id="merged")])
@pytest.mark.parametrize("rslora", [pytest.param(False, id="lora"), pytest.param(True, id="rslora")])
def test_outputs_and_gradients_match_peft(net, factored, rslora):
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft_dora(net, r=3, lora_alpha=5, use_rslora=rslora)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p)) if "magnitude" in name else p.normal_(0, 0.3)
    ours = li.inject(copy.deepcopy(net), "|".join(f"^{n}$" for n in LAYERS), r=3, alpha=5.0, dora=True,
                     rslora=rslora)
    copy_from_peft(ours, theirs)
    set_factored(ours, factored)
    ids = torch.randint(0, 12, (3, 4, 5))
    want, got = theirs(ids), ours(ids)
    assert not torch.allclose(want, net(ids))
    torch.testing.assert_close(got, want)
    want.square().sum().backward()
    got.square().sum().backward()
    loras = dict(li.named_loras(ours))
    for name in LAYERS:
        lora = loras[f"{name}.weight"]
        for t, p in zip((lora.lora_A["default"], lora.lora_B["default"], lora.lora_magnitude["default"]),
                        peft_tensors(theirs.base_model.model.get_submodule(name)), strict=True):
            torch.testing.assert_close(t.grad, p.grad.reshape(t.shape))


@pytest.mark.parametrize("second_dora", [pytest.param(False, id="dora+lora"), pytest.param(True, id="dora+dora")])
def test_two_adapters_on_a_linear_match_peft(second_dora):
    base = nn.Sequential(nn.Linear(6, 5)).double()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"],
                                                                      use_dora=True), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=3, lora_alpha=2, target_modules=["0"], use_dora=second_dora))
    theirs.base_model.set_adapter(["one", "two"])
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p)) if "magnitude" in name else p.normal_(0, 0.3)
    ours = li.inject(copy.deepcopy(base), "0", r=2, alpha=3.0, dora=True, adapter="one")
    li.inject(ours, "0", r=3, alpha=2.0, dora=second_dora, adapter="two")
    layer, lora = theirs.base_model.model[0], ours[0].parametrizations.weight[0]
    with torch.no_grad():
        for n in ("one", "two"):
            lora.lora_A[n].copy_(layer.lora_A[n].weight)
            lora.lora_B[n].copy_(layer.lora_B[n].weight)
            if n in layer.lora_magnitude_vector:
                lora.lora_magnitude[n].copy_(layer.lora_magnitude_vector[n].weight)
    x = torch.randn(4, 6, dtype=F64)
    for factored in (True, False):
        lora.factored = factored
        torch.testing.assert_close(ours(x), theirs(x))


# -- expert weights, state, precision ----------------------------------------------------------------
def test_expert_weights_get_one_magnitude_per_expert_row():
    model = nn.Module()
    model.weight = nn.Parameter(torch.randn(3, 5, 4, dtype=F64))  # (E, out, in)
    li.inject(model, "", r=2, alpha=2.0, dora=True, rules={nn.Module: li.Rule(("weight",), experts=True)})
    lora = model.parametrizations.weight[0]
    W0 = model.parametrizations.weight.original
    assert lora.lora_magnitude["default"].shape == (3, 5)
    torch.testing.assert_close(lora.lora_magnitude["default"], W0.norm(dim=-1))
    with torch.no_grad():
        lora.lora_B["default"].normal_()
        lora.lora_magnitude["default"].mul_(2)
    for e in range(3):
        want = dora_weight(W0[e], lora.lora_A["default"][e], lora.lora_B["default"][e],
                           lora.lora_magnitude["default"][e], 1.0, False)
        torch.testing.assert_close(model.weight[e], want)


def test_magnitude_trains_and_saves(tmp_path):
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model = li.inject(copy.deepcopy(base), r"^0$", r=2, dora=True)
    li.mark_only_lora_as_trainable(model)
    lora = model[0].parametrizations.weight[0]
    assert [p for p in model.parameters() if p.requires_grad] == [
        lora.lora_A["default"], lora.lora_B["default"], lora.lora_magnitude["default"]]
    opt = torch.optim.SGD(li.lora_parameters(model), lr=0.1)
    x = torch.randn(5, 6)
    before = lora.lora_magnitude["default"].detach().clone()
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(lora.lora_magnitude["default"], before)
    state = li.lora_state_dict(model)
    assert sorted(state) == [f"0.parametrizations.weight.0.lora_{t}.default" for t in ("A", "B", "magnitude")]
    fresh = li.inject(copy.deepcopy(base), r"^0$", r=2, dora=True)
    fresh.load_state_dict(state, strict=False)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_bfloat16_is_unchanged_at_init():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    model = li.inject(copy.deepcopy(base), "", r=4, dora=True)
    assert torch.equal(model(x), base(x))
    model.parametrizations.weight[0].factored = False
    assert torch.equal(model(x), base(x))


def test_dora_must_be_a_bool():
    with pytest.raises(TypeError, match=r"inject\(\): `dora` must be a bool, got int\."):
        li.inject(nn.Linear(3, 3), "", dora=1)


# -- on disk ---------------------------------------------------------------------------------------
def test_round_trips_through_peft_format(net, tmp_path):
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft_dora(net, r=3, lora_alpha=5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p)) if "magnitude" in name else p.normal_(0, 0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 12, (3, 4, 5))
    ours = li.load_adapter(copy.deepcopy(net), tmp_path / "peft")
    assert all(lora.config["default"]["dora"] for _, lora in li.named_loras(ours))
    torch.testing.assert_close(ours(ids), theirs(ids))
    li.save_adapter(ours, tmp_path / "back", format="peft")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert {k.split(".")[2]: tuple(v.shape) for k, v in saved.items() if k.endswith("lora_magnitude_vector")} == {
        "emb": (6,), "conv": (1, 5, 1, 1), "proj": (7,), "head": (4,)}
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        again = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path / "back")).eval()
    torch.testing.assert_close(again(ids), ours(ids))


def test_round_trips_through_our_format(tmp_path):
    base = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    model = li.inject(copy.deepcopy(base), r"^0$|^2$", r=2, dora=True)
    randomize(model, "default", 0, magnitude=True)
    li.save_adapter(model, tmp_path)
    x = torch.randn(5, 3, 4)
    loaded = li.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), model(x))
    for (_, a), (_, b) in zip(li.named_loras(model), li.named_loras(loaded), strict=True):
        assert torch.equal(a.lora_magnitude["default"], b.lora_magnitude["default"])
    # Loading into a model that carries the adapter updates it in place.
    m = loaded[0].parametrizations.weight[0].lora_magnitude["default"]
    with torch.no_grad():
        m.zero_()
    assert li.load_adapter(loaded, tmp_path) is loaded
    assert loaded[0].parametrizations.weight[0].lora_magnitude["default"] is m and torch.equal(loaded(x), model(x))
    # A plain adapter of the same name cannot take a DoRA one.
    plain = li.inject(copy.deepcopy(base), r"^0$|^2$", r=2)
    with pytest.raises(ValueError, match=r"holds \['lora_A', 'lora_B', 'lora_magnitude'\] in the saved adapter "
                                         r"\(dora=True, init='default'\) but \['lora_A', 'lora_B'\]"):
        li.load_adapter(plain, tmp_path)


def test_peft_format_needs_one_use_dora(tmp_path):
    model = li.inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), r"^0$", r=2, dora=True)
    li.inject(model, r"^1$", r=2)
    with pytest.raises(ValueError, match=r"peft has one `use_dora` per adapter"):
        li.save_adapter(model, tmp_path, format="peft")
