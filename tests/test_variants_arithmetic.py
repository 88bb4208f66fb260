"""Adapter arithmetic (``combine``: exact by concatenation, or truncated by SVD with its error) and
per-sample adapters (``per_sample``: each sample of a batch with its own adapter, as peft's
``adapter_names=``), checked against references built from the public API and against peft."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from _helpers import assert_unchanged, randomize, snapshot
from _models import gpt2, llama
from hypothesis import given
from hypothesis import strategies as st
from strategies import CASES, FAST, KINDS, Case
from torch import Tensor, nn

import lora_inject as li

F64 = torch.float64


def weights_with(model: nn.Module, case: Case, adapter: str | None) -> dict[str, Tensor]:
    """Each adapted tensor as it reads with only ``adapter`` active (``None``: none)."""
    li.activate(model, [] if adapter is None else adapter)
    return {a.key: getattr(model.get_submodule(a.module), a.tensor).detach().clone() for a in case.adapted}


def two_adapters(case: Case) -> nn.Module:
    model = copy.deepcopy(case.model).to(F64)
    li.inject(model, case.targets, r=case.r, alpha=case.alpha, rules=case.rules, adapter="a")
    li.inject(model, case.targets, r=max(1, case.r - 1), alpha=2.0, rules=case.rules, adapter="b")
    randomize(model, "a", case.seed)
    randomize(model, "b", case.seed + 1)
    return model


# -- combine ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data(), wa=st.sampled_from([1.0, 0.5, -2.0]), wb=st.sampled_from([1.0, -0.5, 3.0]))
def test_combine_is_exact_for_every_rule(kind, data, wa, wb):
    case = data.draw(CASES[kind], label="case")
    model = two_adapters(case)
    W0, Wa, Wb = (weights_with(model, case, n) for n in (None, "a", "b"))
    li.combine(model, {"a": wa, "b": wb}, into="c")
    loras = dict(li.named_loras(model))
    for a in case.adapted:
        lora = loras[a.key]
        assert lora.config["c"]["r"] == lora.config["a"]["r"] + lora.config["b"]["r"]
        assert lora.config["c"]["error"] == 0.0 and "c" not in lora.active
    Wc = weights_with(model, case, "c")
    for key in Wc:
        torch.testing.assert_close(Wc[key], W0[key] + wa * (Wa[key] - W0[key]) + wb * (Wb[key] - W0[key]))


def dense_update(lora: li.LoRA, names) -> Tensor:
    return sum(lora.scaling[n] * lora.lora_B[n] @ lora.lora_A[n] for n in names)  # (out, in)


@pytest.mark.parametrize("rank", [pytest.param(1, id="r1"), pytest.param(3, id="r3"), pytest.param(9, id="above")])
def test_combine_truncated_is_the_best_rank_k_part_and_reports_its_error(rank):
    model = li.inject(nn.Sequential(nn.Linear(7, 6)).double(), "0", r=3, alpha=2.0, adapter="a")
    li.inject(model, "0", r=2, alpha=5.0, adapter="b")
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    lora = model[0].parametrizations.weight[0]
    with torch.no_grad():
        want = dense_update(lora, ["a"]) - 0.5 * dense_update(lora, ["b"])
    li.combine(model, {"a": 1.0, "b": -0.5}, into="c", rank=rank)
    assert lora.lora_A["c"].shape == (rank, 7) and lora.lora_B["c"].shape == (6, rank)
    U, S, Vh = torch.linalg.svd(want)
    k = min(rank, 5)  # the sum has rank 5
    torch.testing.assert_close(lora.scaling["c"] * lora.lora_B["c"] @ lora.lora_A["c"], (U[:, :k] * S[:k]) @ Vh[:k])
    error = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
    assert lora.config["c"]["error"] == pytest.approx(error, abs=1e-12)
    assert (error > 0.05) == (rank < 5)


def test_combine_pissa_and_expert_weights():
    model = nn.Module()
    model.weight = nn.Parameter(torch.randn(2, 5, 4, dtype=F64))  # (E, out, in)
    rules = {nn.Module: li.Rule(("weight",), experts=True)}
    li.inject(model, "", r=2, alpha=2.0, init="pissa", adapter="p", rules=rules)
    li.inject(model, "", r=1, adapter="q", rules=rules)
    lora = model.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B["p"].add_(0.1)
        lora.lora_B["q"].normal_()
    W0 = model.parametrizations.weight.original
    want = lora.merged(W0, ["p", "q"]) - W0  # (E, out, in)
    li.combine(model, {"p": 1.0, "q": 1.0}, into="both")
    assert lora.lora_A["both"].shape == (2, 2 * 2 + 1, 4)  # pissa counts its frozen factors: 2r
    li.activate(model, "both")
    torch.testing.assert_close(model.weight - W0, want)
    li.combine(model, {"p": 1.0, "q": 1.0}, into="small", rank=2)
    assert lora.lora_A["small"].shape == (2, 2, 4) and 0 < lora.config["small"]["error"] < 1


@pytest.mark.parametrize("kwargs, error, match", [
    pytest.param(dict(weights=[("a", 1.0)], into="c"), TypeError, r"`weights` must map adapter names", id="list"),
    pytest.param(dict(weights={"a": "1"}, into="c"), TypeError, r"`weights` must map adapter names", id="str"),
    pytest.param(dict(weights={}, into="c"), ValueError, r"`weights` must name at least one", id="empty"),
    pytest.param(dict(weights={"a": float("nan")}, into="c"), ValueError, r"must be finite, got nan", id="nan"),
    pytest.param(dict(weights={"zz": 1.0}, into="c"), ValueError, r"no adapter named 'zz'", id="unknown"),
    pytest.param(dict(weights={"a": 1.0}, into="b"), ValueError, r"adapter 'b' already exists", id="exists"),
    pytest.param(dict(weights={"a": 1.0}, into=3), TypeError, r"`adapter` must be a str", id="into-type"),
    pytest.param(dict(weights={"a": 1.0}, into="c", rank=0), ValueError, r"`rank` must be a positive int", id="r0"),
    pytest.param(dict(weights={"a": 1.0}, into="c", rank=2.0), TypeError, r"`rank` must be a positive int",
                 id="rank-type"),
    pytest.param(dict(weights={"a": 1.0, "d": 1.0}, into="c"), ValueError, r"adapter 'd' on `0.weight` is DoRA",
                 id="dora"),
])
def test_combine_refuses_bad_input_and_changes_nothing(kwargs, error, match):
    model = li.inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "", r=2, adapter="a")
    li.inject(model, "", r=2, adapter="b")
    li.inject(model, r"^0$", r=2, adapter="d", dora=True)
    before = snapshot(model)
    with pytest.raises(error, match=r"^combine\(\): .*" + match):
        li.combine(model, **kwargs)
    assert_unchanged(model, before)
    assert all("c" not in lora.adapters for _, lora in li.named_loras(model))


# -- per_sample ---------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(20, 3, mode="sum")
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):  # (N, 4) ids
        h = self.emb(ids)[:, :, None, None].expand(-1, -1, 5, 5)  # (N, 3, 5, 5)
        return self.head(torch.tanh(self.conv(h)).mean((-1, -2)))


MODELS = {
    "gpt2": (gpt2, "c_attn|c_fc|wte", lambda: torch.randint(0, 50, (5, 7))),
    "llama": (llama, "q_proj|v_proj|down_proj|embed_tokens", lambda: torch.randint(0, 40, (5, 7))),
    "convnet": (lambda: ConvNet().eval(), "emb|conv|head", lambda: torch.randint(0, 20, (5, 4))),
}
CHOICES = ["a", "b", None, "a", "b"]


def outputs(model, x):
    out = model(x)
    return out if isinstance(out, Tensor) else out.last_hidden_state


@pytest.mark.parametrize("dora", [pytest.param(False, id="lora"), pytest.param(True, id="dora")])
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in MODELS])
def test_per_sample_equals_one_forward_per_sample(name, dora):
    build, targets, make = MODELS[name]
    model = build()
    li.inject(model, targets, r=2, adapter="a", dora=dora)
    li.inject(model, targets, r=3, alpha=6.0, adapter="b")
    for i, adapter in enumerate("ab"):
        randomize(model, adapter, i)
    if dora:
        with torch.no_grad():
            for _, lora in li.named_loras(model):
                lora.lora_magnitude["a"].mul_(1.5)
    x = make()
    want = []
    for i, choice in enumerate(CHOICES):
        li.activate(model, [] if choice is None else choice)
        want.append(outputs(model, x[i:i + 1]))
    li.activate(model, ["a", "b"])
    with torch.no_grad(), li.per_sample(model, CHOICES) as same:
        assert same is model
        got = outputs(model, x)
    torch.testing.assert_close(got, torch.cat(want))
    assert not torch.allclose(want[0], want[1])
    assert all(lora.per_sample is None for _, lora in li.named_loras(model))
    assert li.named_loras(model) and all(lora.active == ["a", "b"] for _, lora in li.named_loras(model))


def test_per_sample_matches_peft_adapter_names():
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "2"]),
                                 adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0", "2"]))
    ours = li.inject(copy.deepcopy(base), r"^0$|^2$", r=2, alpha=8.0, adapter="one")  # peft's default lora_alpha
    li.inject(ours, r"^0$|^2$", r=3, alpha=5.0, adapter="two")
    with torch.no_grad():
        for i in (0, 2):
            layer, lora = theirs.base_model.model[i], ours[i].parametrizations.weight[0]
            for n in ("one", "two"):
                for t, mine in ((layer.lora_A[n].weight, lora.lora_A[n]), (layer.lora_B[n].weight, lora.lora_B[n])):
                    t.normal_(0, 0.3)
                    mine.copy_(t)
    theirs.eval()
    x = torch.randn(4, 6)
    with torch.no_grad(), li.per_sample(ours, ["two", None, "one", "two"]):
        got = ours(x)
    torch.testing.assert_close(got, theirs(x, adapter_names=["two", "__base__", "one", "two"]))


def test_per_sample_refuses_the_merged_path_training_and_wrong_batches():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2, batch_first=True), "fc": nn.Linear(4, 4)}).eval()
    li.inject(model, "attn$", r=2, adapter="a")
    li.inject(model, "fc", r=2, adapter="b")
    with pytest.raises(RuntimeError, match=r"per_sample\(\): `attn\.in_proj_weight` of MultiheadAttention `attn` "
                                           r"carries adapter 'a' on the merged path"):
        with li.per_sample(model, ["a", "b"]):
            pass
    x = torch.randn(3, 4)
    with li.per_sample(model, ["b", None, "b"]):  # the MHA carries none of them: fine, it runs its base weight
        model["attn"](x[None], x[None], x[None])
        with pytest.raises(ValueError, match=r"per_sample\(\): 3 adapter names were given, one per sample, but "
                                             r"Linear `fc` received a batch of 2"):
            model["fc"](x[:2])
        with pytest.raises(RuntimeError, match=r"reached an op that has no factored form"):
            x @ model["fc"].weight.T
    model.train()
    with pytest.raises(RuntimeError, match=r"per_sample\(\): the model is in training mode"):
        with li.per_sample(model, ["b"]):
            pass
    with pytest.raises(TypeError, match=r"`adapters` must be a sequence of str or None"):
        with li.per_sample(model, "b"):
            pass
    with pytest.raises(ValueError, match=r"`adapters` must name one adapter \(or None\) per sample"):
        with li.per_sample(model, []):
            pass
    with pytest.raises(ValueError, match=r"per_sample\(\): no adapter named 'zz'"):
        with li.per_sample(model, ["zz"]):
            pass
    assert all(lora.per_sample is None for _, lora in li.named_loras(model))


@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 6)])
def test_per_sample_refuses_a_batch_other_than_one_per_name(shape):
    """A batch of 4 with 2 names must not give rows 0-1 to one name and 2-3 to the other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    li.inject(model, ["0", "2"], r=2, adapter="a")
    li.inject(model, ["0", "2"], r=2, adapter="b")
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    x = torch.randn(*shape)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"per_sample\(\): 2 adapter names were given, one per sample, but "
                                             r"Linear `0` received a batch of 4 \(dim 0 of its input of shape "
                                             + re.escape(str(shape))):
            with li.per_sample(model, ["a", "b"]):
                model(x)
        with li.per_sample(model, ["a", "b", None, "a"]):  # one per sample: each as its own forward
            out = model(x)
        for i, name in enumerate(["a", "b", None, "a"]):
            if name is None:
                with li.disabled(model):
                    want = model(x[i:i + 1])
            else:
                want = li.activate(model, name)(x[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], want)


@pytest.mark.parametrize("layer, x", [
    (lambda: nn.Conv2d(2, 4, 3), (2, 6, 6)), (lambda: nn.Conv1d(2, 4, 3), (2, 7)), (lambda: nn.Linear(2, 3), (2,))],
    ids=["conv2d", "conv1d", "linear"])
def test_per_sample_takes_an_unbatched_input_as_one_sample(layer, x):
    """dim 0 of an unbatched input is its channels or features, never a batch: with as many names as
    channels (and rank) it gave an output that was no adapter's."""
    torch.manual_seed(0)
    model = nn.Sequential(layer()).eval()
    li.inject(model, "0", r=2, adapter="a")
    li.inject(model, "0", r=2, adapter="b")
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    x = torch.randn(*x)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"2 adapter names were given.*received one unbatched sample"):
            with li.per_sample(model, ["a", "b"]):
                model(x)
        for name in ("b", None):
            with li.per_sample(model, [name]):
                out = model(x)
            torch.testing.assert_close(out, li.activate(model, [] if name is None else name)(x))


def test_per_sample_refuses_a_model_that_flattens_the_batch_before_the_layer():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):  # (B, T, 6) -> (B * T, 6): the layer cannot tell the samples apart
            return self.fc(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], 3)

    model = li.inject(Flat().eval(), "fc", r=2)
    with torch.no_grad(), li.per_sample(model, ["default", None]):
        with pytest.raises(ValueError, match=r"2 adapter names were given.*received a batch of 10"):
            model(torch.randn(2, 5, 6))


def test_per_sample_restores_on_error_and_nests():
    model = li.inject(nn.Sequential(nn.Linear(4, 4)), "0", r=2, adapter="a").eval()
    lora = model[0].parametrizations.weight[0]
    with pytest.raises(KeyError):
        with li.per_sample(model, ["a", None]):
            raise KeyError("boom")
    assert lora.per_sample is None
    with li.per_sample(model, ["a"]):
        with li.per_sample(model, [None, "a"]):
            assert lora.per_sample == (None, "a")
        assert lora.per_sample == ("a",)
    assert lora.per_sample is None
