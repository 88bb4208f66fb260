"""The kinds' factored fast path (``Kind.factored``, composed by the op table in lora_inject._ops)
against the merged plain layer, and proof that it is taken.

The reference is the plain layer run through ``functional_call`` with the weight (and bias) that
``LoRA.merged`` (the kinds' own ``delta``/``apply``) makes of ``W0``: outputs and gradients to
the input and to every trained tensor must agree. The fast path must not build a weight-sized
tensor where a form exists (a dispatch mode records every op's output, forward and backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lora_inject as li
from lora_inject._kinds.loha import Hadamard
from lora_inject.kind import find_kind

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

# layer name -> (module, input); the Linear, Conv1D and Embedding weights are far larger than any
# activation or factor of these inputs, so a tensor of the weight's size can only be a weight.
LAYERS = {
    "linear": (lambda: nn.Linear(48, 40), lambda: torch.randn(2, 48)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1), lambda: torch.randn(1, 8, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2), lambda: torch.randn(4, 9)),  # unbatched
    "embedding": (lambda: nn.Embedding(40, 36, padding_idx=3), lambda: torch.tensor([[1, 3, 7], [39, 0, 3]])),
    "hf_conv1d": (lambda: Conv1D(40, 48), lambda: torch.randn(2, 3, 48)),
}
OPTIONS = {
    "loha": [dict(r=2, alpha=3.0)],
    "lokr": [dict(r=2, alpha=3.0), dict(r=1, alpha=2.0, decompose_both=True)],
    "oft": [dict(r=2, oft_block_size=0), dict(r=2, oft_block_size=0, rotate="out")],
    "ia3": [dict(feedforward=False), dict(feedforward=True)],
    "vera": [dict(r=3, d_initial=0.5)],
}
CASES = [(kind, i, layer) for kind, opts in OPTIONS.items() for i in range(len(opts)) for layer in LAYERS]
# (kind, option, layer) where a factored form runs: no weight-sized tensor. LoHa merges; OFT turns
# no conv and no embedding's rows, and merges where it turns the output of a layer with a bias.
FORMS = {c for c in CASES if c[0] in ("lokr", "ia3", "vera")} \
    | {("oft", 0, "linear"), ("oft", 0, "hf_conv1d"), ("oft", 1, "embedding")}


def build(kind: str, i: int, layer: str, seed: int = 0):
    torch.manual_seed(seed)
    make, data = LAYERS[layer]
    plain = make()
    model = li.inject(copy.deepcopy(plain), "", kind=kind, **OPTIONS[kind][i])
    li.mark_only_lora_as_trainable(model, bias="all" if kind == "ia3" else "none")
    randomize(model, every=True, std=0.3)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            if kind == "ia3":
                p.add_(1.0)  # gains near one
            elif kind == "oft":
                p.mul_(0.3)
    return plain, model, data()


def reference(plain: nn.Module, model: nn.Module, x):
    """The plain layer with the weight and bias the adapters make of W0 (and of the bias)."""
    lora = model.parametrizations.weight[0]
    params = {"weight": lora.merged(model.parametrizations.weight.original)}
    if "bias" in getattr(model, "parametrizations", {}):
        params["bias"] = model.parametrizations.bias[0](model.parametrizations.bias.original)
    elif getattr(model, "bias", None) is not None:
        params["bias"] = model.bias
    return functional_call(plain, params, (x,))


def grads(out, x, model):
    trained = [p for p in model.parameters() if p.requires_grad]
    inputs = ([x] if x.is_floating_point() else []) + trained
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(out, inputs, g)


def case_id(case):
    kind, i, layer = case
    return f"{kind}{i}-{layer}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fast_path_equals_the_merged_plain_layer(case):
    kind, i, layer = case
    plain, model, x = build(*case)
    if x.is_floating_point():
        x.requires_grad_()
    got = model(x)
    want = reference(plain, model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(got, x, model), grads(want, x, model), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


class Sizes(TorchDispatchMode):
    """The ops that made a new tensor (not a view of an input) of ``limit`` elements or more."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.big = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.big.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("case", [c for c in CASES if c in FORMS], ids=case_id)
def test_forms_build_no_weight_sized_tensor(case):
    # A training step's forward and backward: every op's output stays below the weight's size (the
    # merged weight, and its gradient, would be one). Fails where the weight is merged.
    kind, i, layer = case
    plain, model, x = build(*case)
    limit = model.parametrizations.weight.original.numel()
    with Sizes(limit) as sizes:
        out = model(x.requires_grad_() if x.is_floating_point() else x)
        grads(out, x, model)
    assert sizes.big == []


@pytest.mark.parametrize("layer", ["linear", "conv2d", "hf_conv1d"])
def test_a_bias_not_the_layers_is_added_after_the_forms(layer):
    # IA3 scaling the output adapts the bias too; given a bias of the caller's own, the op adds it
    # as given, as the merged weight's op does, and the forms still run: nothing weight-sized.
    plain, model, x = build("ia3", 0, layer)
    W = model.parametrizations.weight[0].merged(model.parametrizations.weight.original).detach()
    mine = torch.randn(W.shape[1] if layer == "hf_conv1d" else W.shape[0])
    op = {"linear": lambda w: F.linear(x, w, mine),
          "conv2d": lambda w: F.conv2d(x, w, mine, padding=1),
          "hf_conv1d": lambda w: torch.addmm(mine, x.flatten(0, 1), w)}[layer]
    with Sizes(W.numel()) as sizes:
        got = op(model.weight)
    assert sizes.big == []
    torch.testing.assert_close(got, op(W), rtol=1e-5, atol=1e-5)


EMPTY = {"linear": torch.randn(0, 48), "conv2d": torch.randn(0, 8, 4, 4), "conv1d": torch.randn(0, 4, 9),
         "embedding": torch.zeros(0, 3, dtype=torch.long), "hf_conv1d": torch.randn(0, 3, 48)}


@pytest.mark.parametrize("layer", list(EMPTY))
@pytest.mark.parametrize("kind", list(OPTIONS))
def test_an_empty_batch_gives_an_empty_output(kind, layer):
    # A batch of no samples runs, as it does on the plain layer (LoKr's reshapes could not infer a size).
    plain, model, _ = build(kind, 0, layer)
    x = EMPTY[layer]
    assert model(x).shape == plain(x).shape


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_an_embedding_whose_adapter_is_dropped_is_the_plain_one(kind):
    # module_dropout leaves the only adapter out of a training forward: the lookup is the plain
    # table's (it crashed on an adapted weight with no term left).
    torch.manual_seed(0)
    plain = nn.Embedding(40, 36)
    model = li.inject(copy.deepcopy(plain), "", kind=kind, r=2, alpha=3.0, module_dropout=0.99)
    randomize(model, every=True, std=0.3)
    x = torch.tensor([[1, 3, 7], [39, 0, 3]])
    for seed in range(3):  # torch.rand(1) > 0.99 at none of these seeds: dropped each time
        torch.manual_seed(seed)
        assert torch.rand(1) <= 0.99
        torch.manual_seed(seed)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind, options", [("loha", {}), ("lokr", dict(rank_dropout=0.5))], ids=["loha", "lokr"])
def test_a_lora_dropout_on_a_merged_stack_is_refused(kind, options):
    # LoRA's dropout acts on the input of its branch; stacked with LoHa (no factored form) or with
    # LoKr dropping output units of its update, the update is merged, where it cannot act: a
    # training forward refuses, rather than drop it silently.
    torch.manual_seed(0)
    model = li.inject(nn.Linear(8, 8), "", r=2, dropout=0.5, adapter="a")
    li.inject(model, "", kind=kind, r=2, alpha=2.0, adapter="b", **options)
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=rf"LoRA adapter 'a''s dropout \(0.5\).*kind \['{kind}'\]"):
        model(x)
    model.eval()  # no dropout at work: the merged weight is the adapted layer
    W = model.parametrizations.weight[0].merged(model.parametrizations.weight.original)
    torch.testing.assert_close(model(x), F.linear(x, W, model.bias))


def test_a_lora_dropout_beside_a_multiplicative_kind_at_a_strength_is_refused_naming_it():
    torch.manual_seed(0)
    model = li.inject(nn.Linear(8, 8), "", r=2, dropout=0.5, adapter="a")
    li.inject(model, "", kind="ia3", adapter="b")
    x = torch.randn(3, 8)
    model(x)  # at full strength, IA³'s form runs: the dropout acts
    li.activate(model, {"a": 1.0, "b": 0.5})
    with pytest.raises(RuntimeError, match=r"dropout \(0.5\).*a multiplicative kind at a strength other than 1"):
        model(x)


def test_forms_are_the_kinds_own(monkeypatch):
    # The op table composes the kind's registered form: a spy in its place is called, once per forward.
    kind = find_kind("vera")
    calls = []
    form = kind.factored["linear"]

    def spy(x, base, params, view, scaling, options):
        calls.append(tuple(x.shape))
        return form(x, base, params, view, scaling, options)

    monkeypatch.setitem(kind.factored, "linear", spy)
    plain, model, x = build("vera", 0, "linear")
    model(x)
    assert calls == [tuple(x.shape)]


def test_kinds_and_lora_stack_through_their_forms():
    # LoRA, VeRA and IA³ on one Linear, in injection order: the composed forms equal the merged
    # weight, and nothing weight-sized is built.
    torch.manual_seed(0)
    plain = nn.Linear(48, 40)
    model = copy.deepcopy(plain)
    li.inject(model, "", adapter="a", r=2)
    li.inject(model, "", kind="vera", adapter="b", r=3)
    li.inject(model, "", kind="ia3", adapter="c")
    li.mark_only_lora_as_trainable(model)
    randomize(model, every=True, std=0.3)
    x = torch.randn(2, 48, requires_grad=True)
    with Sizes(48 * 40) as sizes:
        got = model(x)
        got_grads = grads(got, x, model)
    assert sizes.big == []
    want = reference(plain, model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, grads(want, x, model), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_lokr_merges_where_that_is_cheaper():
    # Without a gradient, on many rows, building kron(w1, w2) once costs less than two thin
    # products per row: the merged weight, which gives the same output.
    plain, model, _ = build("lokr", 0, "linear")
    x = torch.randn(512, 48)
    with torch.no_grad(), Sizes(48 * 40) as sizes:
        got = model(x)
    assert sizes.big  # the merged weight
    torch.testing.assert_close(got, reference(plain, model, x), rtol=1e-5, atol=1e-5)


def _hadamard_factors():
    torch.manual_seed(0)
    return [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((7, 3), (3, 5), (7, 3), (3, 5))]


def test_hadamard_matches_autograd_and_saves_only_the_factors():
    # LoHa's product, as peft's HadaWeight: the same value and gradients as the plain ops, and
    # only the four factors kept for backward (the plain ops keep both (out, in) products).
    factors = _hadamard_factors()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        got = Hadamard.apply(*factors, 1.5)
    assert sorted(saved) == sorted(tuple(f.shape) for f in factors)
    want = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 1.5
    torch.testing.assert_close(got, want)
    g = torch.randn(7, 5, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, factors, g), torch.autograd.grad(want, factors, g), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *f: Hadamard.apply(*f, 1.5), factors)


def test_hadamard_gradients_with_rank_dropouts_scaling():
    # Rank dropout scales each output row of the update: a (out, 1) tensor, which the backward
    # applies to the weight-sized gradient, not to the factors' small ones.
    factors = _hadamard_factors()
    s = torch.tensor([[0.0], [2.0], [2.0], [0.0], [2.0], [2.0], [2.0]], dtype=torch.float64) * 1.5
    got = Hadamard.apply(*factors, s)
    want = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * s
    torch.testing.assert_close(got, want)
    g = torch.randn(7, 5, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, factors, g), torch.autograd.grad(want, factors, g), strict=True):
        torch.testing.assert_close(a, b)


def test_loha_keeps_one_weight_sized_tensor_for_backward():
    # A LoHa Linear keeps the merged weight F.linear needs, and nothing else weight-sized, as peft
    # keeps its delta weight.
    plain, model, x = build("loha", 0, "linear")
    weight = model.parametrizations.weight.original
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x.requires_grad_())
    big = [t for t in saved if t.numel() >= weight.numel() and t is not weight]
    assert len(big) == 1
