"""Hostile and odd input: every call succeeds with its invariants, or raises ValueError/TypeError
and leaves the model exactly as it was (state dict bit-identical, same classes, same Parameters).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_inject as li

SMALL_R = "exceeds min(out, in)"


# -- shared weights, shared modules, non-float and zero-size tensors -----------------------------------
def test_a_module_that_appears_twice_is_adapted_once_and_used_twice():
    shared = nn.Linear(4, 4).double()
    model = nn.Sequential(shared, nn.Tanh(), nn.Sequential(shared))  # "0" and "2.0"
    before = snapshot(model)
    li.inject(model, "", r=2)
    assert [n for n, _ in li.named_loras(model)] == ["0.weight"]
    lora = shared.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B["default"].normal_()
    A, B = lora.lora_A["default"], lora.lora_B["default"]
    w = shared.parametrizations.weight.original + B @ A
    x = torch.randn(3, 4, dtype=torch.float64)
    h = torch.tanh(x @ w.T + shared.bias)
    torch.testing.assert_close(model(x), h @ w.T + shared.bias)
    # lora_state_dict has the keys of model.state_dict(), which lists a shared module at every path
    assert set(li.lora_state_dict(model)) == {k for k in model.state_dict() if ".lora_" in k} == {
        f"{p}.parametrizations.weight.0.lora_{f}.default" for p in ("0", "2.0") for f in "AB"}
    li.remove(model, merge=False)
    assert_unchanged(model, before)


class IntWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.arange(12).view(3, 4))

    def forward(self, x):
        return x @ self.weight.T.to(x.dtype)


def test_an_integer_buffer_named_weight_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(4, 4), IntWeight())
    rules = {**li.default_rules(), IntWeight: li.Rule(("weight",))}
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"inject\(\): `1\.weight` has dtype torch\.int64; LoRA needs a "
                                        r"floating-point tensor\. Leave IntWeight `1` out with `exclude=`"):
        li.inject(model, "", r=2, rules=rules)
    assert_unchanged(model, before)  # the Linear, which was fine, was not adapted either
    li.inject(model, "", r=2, rules=rules, exclude="1")
    assert [n for n, _ in li.named_loras(model)] == ["0.weight"]


ZERO_SIZE = [  # (layer, inputs, whether the weight has no elements)
    pytest.param(lambda: nn.Linear(0, 4), lambda: (torch.randn(3, 0),), True, id="Linear-in0"),
    pytest.param(lambda: nn.Linear(4, 0), lambda: (torch.randn(3, 4),), True, id="Linear-out0"),
    pytest.param(lambda: nn.Linear(0, 0), lambda: (torch.randn(3, 0),), True, id="Linear-0x0"),
    pytest.param(lambda: nn.Embedding(0, 4), lambda: (torch.zeros(0, dtype=torch.long),), True,
                 id="Embedding-num0"),
    pytest.param(lambda: nn.Embedding(5, 0), lambda: (torch.tensor([1, 4]),), True, id="Embedding-dim0"),
    pytest.param(lambda: nn.Bilinear(2, 3, 0), lambda: (torch.randn(2, 2), torch.randn(2, 3)), True,
                 id="Bilinear-out0"),
    pytest.param(lambda: nn.Conv1d(2, 3, 2), lambda: (torch.randn(0, 2, 5),), False, id="Conv1d-batch0"),
    pytest.param(lambda: nn.Linear(4, 3), lambda: (torch.randn(0, 4),), False, id="Linear-batch0"),
]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("make, inputs, empty", ZERO_SIZE)
def test_zero_size_dimensions_inject_run_train_and_remove(make, inputs, empty, dora):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        layer = make()
    args = inputs()
    base = layer(*args)
    before = snapshot(layer)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        li.inject(layer, "", r=2, dora=dora)
    assert any(SMALL_R in str(w.message) for w in seen) == empty  # r=2 > min(out, in) = 0
    out = layer(*args)
    torch.testing.assert_close(out, base)
    out.sum().backward()
    li.remove(layer, merge=empty)  # merging an empty update changes nothing
    assert_unchanged(layer, before)


def test_r_larger_than_min_out_in_warns_and_still_works():
    layer = nn.Linear(6, 3).double()
    with pytest.warns(UserWarning, match=r"inject\(\): r=5 exceeds min\(out, in\) of \['weight'\]: the update "
                                         r"is still exact"):
        li.inject(layer, "", r=5, alpha=10)
    lora = layer.parametrizations.weight[0]
    assert lora.lora_A["default"].shape == (5, 6) and lora.lora_B["default"].shape == (3, 5)
    opt = torch.optim.SGD(li.lora_parameters(layer), lr=0.1)
    x = torch.randn(8, 6, dtype=torch.float64)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    A, B = lora.lora_A["default"].detach(), lora.lora_B["default"].detach()
    w = layer.parametrizations.weight.original + 2 * B @ A
    assert B.abs().max() > 0
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
    li.remove(layer)
    torch.testing.assert_close(layer.weight, w)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_non_finite_factors_are_refused_at_merge_and_nothing_changes(factor, value, dora):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    li.inject(model, "", r=2, dora=dora)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
        getattr(model[1].parametrizations.weight[0], factor)["default"][0, 1] = value
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"remove\(\): merging adapter\(s\) \['default'\] into `1\.weight` "
                                         r"gives non-finite values.*The model is unchanged"):
        li.remove(model, merge=True)
    before["state"]["1.parametrizations.weight.0." + factor + ".default"][0, 1] = value  # NaN != NaN for equal
    assert_unchanged_but_nan(model, before)
    originals = [m.parametrizations.weight.original for m in model]
    li.remove(model, merge=False)  # discarding the update is fine, and restores W0
    assert all(m.weight is w for m, w in zip(model, originals))


def assert_unchanged_but_nan(model, before) -> None:
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(v.nan_to_num(), before["state"][k].nan_to_num()) for k, v in state.items())
    now = snapshot(model)
    assert all(now["classes"][n] is c for n, c in before["classes"].items())
    assert all(now["params"][n] is p for n, p in before["params"].items())
    assert now["loras"] == before["loras"]


def test_merge_that_overflows_the_weights_dtype_is_refused():
    layer = nn.Linear(4, 4).half()
    li.inject(layer, "", r=2, dtype=torch.float32)
    with torch.no_grad():
        layer.parametrizations.weight[0].lora_A["default"].fill_(300.0)
        layer.parametrizations.weight[0].lora_B["default"].fill_(300.0)  # ΔW = 180000 > fp16's 65504
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"gives non-finite values.*overflow in the weight's dtype"):
        li.remove(layer)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda m: li.inject(m, "", rules=5), r"inject\(\): `rules` must be None or a mapping from module "
                 r"types to lora_inject\.Rule, such as lora_inject\.default_rules\(\), got int\.", id="rules-int"),
    pytest.param(lambda m: li.inject(m, "", rules={nn.Linear: ("weight",)}), r"`rules` must be .* got dict",
                 id="rules-values"),
    pytest.param(lambda m: li.remove(m, merge="no"), r"remove\(\): `merge` must be a bool, got 'no'\.",
                 id="merge-str"),
    pytest.param(lambda m: li.remove(m, merge=None), r"remove\(\): `merge` must be a bool, got None\.",
                 id="merge-none"),
])
def test_arguments_of_the_wrong_kind_are_refused_and_nothing_changes(call, message):
    model = li.inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0", r=2)
    before = snapshot(model)
    with pytest.raises(TypeError, match=message):
        call(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("make", [pytest.param(lambda: nn.GRU(3, 4), id="GRU"),
                                  pytest.param(lambda: nn.LSTM(3, 4, num_layers=2), id="LSTM")])
def test_an_injected_rnn_deep_copies_after_training_steps(make):
    rnn = make()
    li.inject(rnn, "", r=2)
    x = torch.randn(5, 2, 3)
    for _ in range(2):
        rnn(x)[0].sum().backward()
    # RNNs cache the weights their forward read; the cache must not hold the step's graph
    assert all(w.grad_fn is None for w in rnn._flat_weights)
    replica = copy.deepcopy(rnn)
    torch.testing.assert_close(replica(x)[0], rnn(x)[0], rtol=0, atol=0)
    li.remove(replica)
    assert type(replica) is type(make()) and type(rnn) is not type(replica)


@pytest.mark.parametrize("make", [pytest.param(lambda: nn.GRU(3, 4), id="GRU"),
                                  pytest.param(lambda: nn.LSTM(3, 4, num_layers=2), id="LSTM")])
def test_an_injected_rnn_deep_copies_after_torch_func_grad(make):
    rnn = make()
    li.inject(rnn, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(rnn):
            p.normal_()
    x = torch.randn(5, 2, 3)
    want = rnn(x)[0]
    params = {n: p.detach() for n, p in rnn.named_parameters() if p.requires_grad}
    torch.func.grad(lambda p: torch.func.functional_call(rnn, p, (x,))[0].sum())(params)
    replica = copy.deepcopy(rnn)  # was: "Cannot access storage of TensorWrapper"
    torch.testing.assert_close(replica(x)[0], want, rtol=0, atol=0)
    torch.testing.assert_close(rnn(x)[0], want, rtol=0, atol=0)


def test_an_injected_rnn_called_step_by_step_under_torch_func_grad_and_parametrize_cached():
    """A decoder's loop in parametrize.cached(): the RNN reuses the weights its first step read."""
    from torch.nn.utils import parametrize

    rnn = nn.LSTM(3, 4)
    li.inject(rnn, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(rnn):
            p.normal_()
    x = torch.randn(5, 2, 3)

    def loss(params, call):
        with parametrize.cached():
            h, out = None, 0
            for t in range(3):
                y, h = call(params, x[t:t + 1], h)
                out = out + y.sum()
        return out

    params = {n: p.detach() for n, p in rnn.named_parameters() if p.requires_grad}
    got = torch.func.grad(loss)(params, lambda p, *a: torch.func.functional_call(rnn, p, a))  # was: a None weight
    loss(None, lambda p, *a: rnn(*a)).backward()
    for name, p in rnn.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.grad)


# -- pickling, copies, dtype and device ------------------------------------------------------------
def test_torch_save_of_an_injected_model_says_how_to_save_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    li.inject(model, "0", r=2)
    hint = r"save_adapter\(model, path\) or torch\.save\(lora_inject\.lora_state_dict\(model\), path\).*remove"
    with pytest.raises(RuntimeError, match=r"torch\.save\(model\) and pickle cannot save the parametrized Linear "
                                           r"module.*" + hint):
        torch.save(model, io.BytesIO())
    with pytest.raises(RuntimeError, match=hint):
        pickle.dumps(model)
    x = torch.randn(2, 4)
    li.remove(model)  # a plain model again: it pickles
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), model(x))


def test_deepcopy_is_independent():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    li.inject(model, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    replica = copy.deepcopy(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(replica(x), model(x), rtol=0, atol=0)
    assert {id(p) for p in li.lora_parameters(replica)}.isdisjoint(id(p) for p in li.lora_parameters(model))
    expected = model(x)
    with torch.no_grad():
        for p in li.lora_parameters(replica):
            p.zero_()
    li.remove(replica)
    assert type(replica[0]) is nn.Linear and type(model[0]) is not nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("convert, dtype", [
    pytest.param(lambda m: m.to(torch.float64), torch.float64, id="to-float64"),
    pytest.param(lambda m: m.half(), torch.float16, id="half"),
    pytest.param(lambda m: m.to(torch.bfloat16), torch.bfloat16, id="to-bfloat16"),
    pytest.param(lambda m: m.to(device="cpu"), torch.float32, id="to-cpu"),
    pytest.param(lambda m: m.to("cpu", torch.float64), torch.float64, id="to-cpu-float64"),
])
def test_dtype_and_device_moves_after_inject(convert, dtype):
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 4), nn.MultiheadAttention(4, 2, batch_first=True))
    li.inject(model, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(std=0.1)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])

    def run(m):
        h = m[1](m[0](ids))
        return m[2](h, h, h, need_weights=False)[0]

    reference = run(copy.deepcopy(model).double())  # the same values in float64
    params = {n: p for n, p in model.named_parameters()}
    assert convert(model) is model
    assert {p.dtype for p in model.parameters()} == {dtype}  # W0 and the factors alike
    assert all(p is params[n] for n, p in model.named_parameters())  # converted in place
    out = run(model)
    assert out.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), reference, rtol=tol, atol=tol)
    li.remove(model)
    assert {p.dtype for p in model.parameters()} == {dtype} and type(model[1]) is nn.Linear
    torch.testing.assert_close(run(model).double(), reference, rtol=2 * tol, atol=2 * tol)


# -- the whole API driven by hypothesis ------------------------------------------------------------
def _layer(kind: str, a: int, b: int):
    """A small layer of ``kind`` with sizes from ``a`` and ``b``, and a function making its inputs
    (the same ones at every call)."""

    def randn(*shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(a * 7 + b))

    if kind == "Linear":
        return nn.Linear(a, b), lambda: (randn(2, a),)
    if kind == "Conv1d":
        groups = 2 if a % 2 == 0 and b % 2 == 0 else 1
        return nn.Conv1d(a, b, 1 + a % 3, groups=groups), lambda: (randn(2, a, 5),)
    if kind == "ConvTranspose1d":
        return nn.ConvTranspose1d(a, b, 2), lambda: (randn(2, a, 4),)
    if kind == "Embedding":
        return nn.Embedding(a, b), lambda: (torch.arange(6).view(2, 3) % a if a else torch.zeros(0, dtype=torch.long),)
    if kind == "Bilinear":
        return nn.Bilinear(a, 2, b), lambda: (randn(3, a), randn(3, 2))
    if kind == "MultiheadAttention":
        return nn.MultiheadAttention(4, 2), lambda: (randn(3, 2, 4),) * 3
    if kind == "GRU":
        return nn.GRU(a, b), lambda: (randn(4, 2, a),)
    if kind == "LayerNorm":
        return nn.LayerNorm(b), lambda: (randn(2, b),)
    if kind == "IntWeight":
        return IntWeight(), lambda: (randn(2, 4),)
    raise AssertionError(kind)


KINDS = ["Linear", "Conv1d", "ConvTranspose1d", "Embedding", "Bilinear", "MultiheadAttention", "GRU", "LayerNorm",
         "IntWeight"]
POSITIVE = {"Conv1d", "ConvTranspose1d", "GRU", "MultiheadAttention", "Bilinear"}  # torch refuses 0 sizes


@st.composite
def models(draw):
    """``nn.Sequential`` of random small float64 layers (maybe the same module twice, maybe a tied
    pair), and a function that runs each position's layer on fixed inputs."""
    specs = draw(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 4), st.integers(0, 4)),
                          min_size=1, max_size=4))
    layers, runs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        for kind, a, b in specs:
            if kind in POSITIVE:
                a, b = a + 1, b + 1
            layer, inputs = _layer(kind, a, b)
            layers.append(layer.double())
            runs.append(inputs)
        if draw(st.booleans()):  # the same module again
            i = draw(st.integers(0, len(layers) - 1))
            layers.append(layers[i])
            runs.append(runs[i])
        if draw(st.integers(0, 3)) == 0:  # a tied pair
            emb, head = nn.Embedding(5, 3).double(), nn.Linear(3, 5, bias=False).double()
            head.weight = emb.weight
            layers += [emb, head]
            runs += [lambda: (torch.tensor([[1, 4]]),), lambda: (torch.linspace(-1, 1, 6).view(2, 3),)]

    def outputs(model: nn.Module) -> list[torch.Tensor]:
        result = []
        for layer, inputs in zip(model, runs):
            args = [a.double() if a.is_floating_point() else a for a in inputs()]
            out = layer(*args)
            result.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return result

    return nn.Sequential(*layers), outputs


# Mostly valid calls, so that the model gathers adapters; one hostile argument now and then.
def mostly(good, bad):
    """``good`` three times out of four, else ``bad`` (``st.one_of`` would weigh each of their branches)."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 3 else good)


regexes = st.one_of(
    st.sampled_from(["", "0", "^1$", "[0-3]", "0|2", "^$", "weight", "(", "[", "a{2,1}", "*", "\\", "(?P<"]),
    st.text(alphabet="0123456789^$|()[]*+?.\\", max_size=5),
)
good_targets = st.sampled_from(["", "0", "1", "[0-2]", "^0$|^3$"])
targets = mostly(good_targets, st.one_of(regexes, st.integers(), st.none()))
good_names = st.sampled_from(["default", "a", "b"])
names = st.one_of(good_names, st.sampled_from(["1bad", "", "with space"]))
adapter_args = mostly(st.one_of(st.none(), good_names, st.lists(good_names, max_size=3)),
                      st.one_of(names, st.lists(names, max_size=3), st.integers(), st.just(b"a")))
good_kwargs = st.fixed_dictionaries({}, optional={
    "r": st.integers(1, 6),
    "alpha": st.one_of(st.none(), st.floats(0.5, 8), st.floats(-4, 0)),
    "adapter": good_names,
    "exclude": st.sampled_from([None, "1", "^0$", "2|3"]),
    "dropout": st.sampled_from([0.0, 0.0, 0.1]),
    "init": st.sampled_from(["default", "gaussian", "pissa", "olora"]),
    "dtype": st.sampled_from([None, torch.float32, torch.float64]),
    "rslora": st.booleans(),
    "dora": st.booleans(),
    "rules": st.sampled_from([None, "with IntWeight"]),
})
bad_kwarg = st.one_of(
    st.fixed_dictionaries({"r": st.one_of(st.integers(-2, 0), st.just(True), st.floats(0, 4), st.just("2"))}),
    st.fixed_dictionaries({"alpha": st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.just("1"))}),
    st.fixed_dictionaries({"adapter": st.one_of(names, st.integers(0, 2))}),
    st.fixed_dictionaries({"exclude": st.one_of(regexes, st.integers())}),
    st.fixed_dictionaries({"dropout": st.one_of(st.floats(-1, 2), st.just(True), st.just("0"))}),
    st.fixed_dictionaries({"init": st.sampled_from(["bogus", 3, None])}),
    st.fixed_dictionaries({"dtype": st.sampled_from([torch.int64, torch.bool, "float32"])}),
    st.fixed_dictionaries({"rslora": st.sampled_from(["yes", 1])}),
    st.fixed_dictionaries({"dora": st.sampled_from(["yes", 1])}),
    st.fixed_dictionaries({"rules": st.sampled_from([5, "x", [nn.Linear]])}),
)
inject_kwargs = mostly(good_kwargs, st.builds(lambda g, b: {**g, **b}, good_kwargs, bad_kwarg))
operations = st.lists(st.one_of(
    st.tuples(st.just("inject"), targets, inject_kwargs),
    st.tuples(st.just("inject"), targets, inject_kwargs),
    st.tuples(st.just("remove"), st.fixed_dictionaries({}, optional={
        "merge": mostly(st.booleans(), st.just("no")), "adapter": adapter_args})),
    st.tuples(st.just("activate"), adapter_args),
    st.tuples(st.just("disabled")),
    st.tuples(st.just("lora_state_dict"), adapter_args),
    st.tuples(st.just("lora_parameters"), adapter_args),
    st.tuples(st.just("init_lora"), adapter_args),
), min_size=1, max_size=6)


def adapters_of(model: nn.Module) -> set[str]:
    return {n for _, lora in li.named_loras(model) for n in lora.adapters}


def chosen(model: nn.Module, adapter) -> set[str]:
    return adapters_of(model) if adapter is None else {adapter} if isinstance(adapter, str) else set(adapter)


def lora_keys(model: nn.Module, names: set[str]) -> set[str]:
    pattern = re.compile(r"\.lora_(A|B|A0|B0|magnitude)\.(\w+)$")
    return {k for k in model.state_dict() if (m := pattern.search(k)) and m.group(2) in names}


def call(model, outputs, op, *args):
    """Make one API call; return what the checks need."""
    if op == "inject":
        targets, kwargs = args
        if kwargs.get("rules") == "with IntWeight":
            kwargs = {**kwargs, "rules": {**li.default_rules(), IntWeight: li.Rule(("weight",))}}
        li.inject(model, targets, **kwargs)
        return kwargs.get("adapter", "default")
    if op == "remove":
        return li.remove(model, **args[0])
    if op == "activate":
        return li.activate(model, args[0])
    if op == "disabled":
        with li.disabled(model) as m:
            return m, [lora.active for _, lora in li.named_loras(model)], outputs(model)
    if op == "lora_state_dict":
        return li.lora_state_dict(model, args[0])
    if op == "lora_parameters":
        return list(li.lora_parameters(model, args[0]))
    if op == "init_lora":
        return li.init_lora(model, args[0])
    raise AssertionError(op)


@pytest.mark.slow
@settings(max_examples=150, phases=[p for p in Phase if p is not Phase.explain])
@given(built=models(), ops=operations)
def test_every_call_succeeds_with_its_invariants_or_raises_and_changes_nothing(built, ops):
    model, outputs = built
    model.eval()  # LoRA's dropout off, so that outputs can be compared
    initial = snapshot(model)
    for op, *args in ops:
        before, out_before = snapshot(model), outputs(model)
        values = {id(p): p.detach().clone() for n, p in before["params"].items() if ".lora_" not in n}
        plain = li.remove(copy.deepcopy(model), merge=False) if adapters_of(model) else model
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                result = call(model, outputs, op, *args)
            except (ValueError, TypeError) as e:
                event(f"{op}: {type(e).__name__}")
                assert_unchanged(model, before)
                continue
        event(f"{op}: ok")
        assert all(SMALL_R in str(w.message) for w in seen), [str(w.message) for w in seen]
        params = {id(p) for p in model.parameters()}
        assert all(id(p) in params for n, p in before["params"].items() if ".lora_" not in n)  # W0 keeps its object

        if op == "inject":  # a new adapter starts as the identity, and W0 is untouched
            assert result in adapters_of(model)
            for now, then in zip(outputs(model), out_before):
                torch.testing.assert_close(now, then)
            assert all(torch.equal(p, values[id(p)]) for p in model.parameters() if id(p) in values)
            with torch.no_grad():  # a non-zero update, for the checks of later calls
                for p in li.lora_parameters(model, result):
                    p.add_(torch.randn_like(p), alpha=0.1)
        elif op == "remove":
            gone = chosen(plain, args[0].get("adapter")) if plain is not model else set()
            assert not gone & adapters_of(model)
            if args[0].get("merge", True):
                for now, then in zip(outputs(model), out_before):  # merging keeps the outputs
                    torch.testing.assert_close(now, then)
            else:
                assert all(torch.equal(p, values[id(p)]) for p in model.parameters() if id(p) in values)
            if not adapters_of(model):  # a plain model again: the initial classes, keys and Parameters
                now = snapshot(model)
                assert now["state"].keys() == initial["state"].keys()
                assert all(now["classes"][n] is c for n, c in initial["classes"].items())
                assert now["classes"].keys() == initial["classes"].keys()
                assert all(now["params"][n] is p for n, p in initial["params"].items())
                assert now["params"].keys() == initial["params"].keys()
        elif op == "activate":
            want = [args[0]] if isinstance(args[0], str) else list(dict.fromkeys(args[0]))
            assert all(lora.active == [n for n in want if n in lora.adapters] for _, lora in li.named_loras(model))
        elif op == "disabled":
            m, active, inside = result
            assert m is model and active == [lora.active for _, lora in li.named_loras(model)]  # untouched
            for got, want in zip(inside, outputs(plain)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert_unchanged(model, before)  # every adapter's state restored
        elif op == "lora_state_dict":
            assert set(result) == lora_keys(model, chosen(model, args[0]))
            full = model.state_dict()
            assert all(torch.equal(v, full[k]) for k, v in result.items())
        elif op == "lora_parameters":
            named = {id(p): n for n, p in model.named_parameters()}
            assert {named[id(p)] for p in result} == lora_keys(model, chosen(model, args[0])) & set(named.values())
        elif op == "init_lora":  # the adapters start again as the identity
            reference = li.remove(copy.deepcopy(model), merge=False, adapter=sorted(chosen(model, args[0])))
            for now, then in zip(outputs(model), outputs(reference)):
                torch.testing.assert_close(now, then)


def _foreign_then_lora():
    orth = nn.Module()
    orth.lin = nn.Linear(4, 4)
    orth.lin.extra = nn.Parameter(torch.randn(4, 4))
    torch.nn.utils.parametrizations.orthogonal(orth.lin, "extra")
    li.inject(orth, "lin", r=2)
    rnn = nn.LSTM(3, 4)
    torch.nn.utils.parametrizations.weight_norm(rnn, "weight_hh_l0")
    li.inject(rnn, "", r=2)
    return [(orth, lambda m: m.lin(torch.ones(2, 4)) + m.lin.extra.sum()), (rnn, lambda m: m(torch.ones(5, 1, 3))[0])]


@pytest.mark.parametrize("index", [0, 1], ids=["orthogonal-then-lora", "lstm-weight-norm-then-lora"])
def test_removing_lora_from_a_copy_leaves_the_original_whole_when_another_parametrization_came_first(index):
    model, run = _foreign_then_lora()[index]
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    before = run(model).detach().clone()
    replica = copy.deepcopy(model)
    li.remove(replica, merge=False)
    torch.testing.assert_close(run(model), before)  # the original still reads its properties
    assert len(list(li.named_loras(model))) > 0 and not list(li.named_loras(replica))


def test_a_non_persistent_buffer_stays_out_of_the_state_dict():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(3, 3), persistent=False)
            self.b = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return x @ self.w + self.b

    model = Gain()
    old = model.state_dict()
    li.inject(model, "", r=1, rules={Gain: li.Rule(("w",))})
    assert "parametrizations.w.original" not in model.state_dict()
    li.remove(model, merge=False)
    assert list(model.state_dict()) == list(old) == ["b"]
    model.load_state_dict(old, strict=True)


def test_a_layer_that_renormalises_its_weight_never_writes_w0():
    layer = nn.Embedding(10, 4, max_norm=0.5)
    li.inject(layer, "", r=2)
    w0 = layer.parametrizations.weight.original.detach().clone()
    with li.disabled(layer):
        layer(torch.arange(10))
    li.activate(layer, [])
    layer(torch.arange(10))
    li.remove(layer, merge=False)
    assert torch.equal(layer.weight, w0)


def _spectral(n=2):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])
    for m in model:
        torch.nn.utils.parametrizations.spectral_norm(m)
    return model


def _power_iteration_state(model):
    return [t.clone() for m in model for t in (m.parametrizations.weight[0]._u, m.parametrizations.weight[0]._v)]


def test_refused_and_rolled_back_calls_leave_a_spectral_norm_as_it_was():
    model = _spectral().train()
    with torch.no_grad():
        model[1].parametrizations.weight.original[0, 0] = float("nan")  # PiSSA refuses this one
    state = _power_iteration_state(model)
    with pytest.raises(ValueError, match="init='pissa' decomposes the weight"):
        li.inject(model, "", r=2, init="pissa")  # the first layer was done, then rolled back
    assert all(torch.equal(a, b) for a, b in zip(_power_iteration_state(model), state))
    model = _spectral(1).train()
    li.inject(model, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.fill_(1e30)
    state = _power_iteration_state(model)
    with pytest.raises(ValueError, match="gives non-finite values"):
        li.remove(model, merge=True)
    assert all(torch.equal(a, b) for a, b in zip(_power_iteration_state(model), state))
