"""The kinds of update (lora_inject.kind, lora_inject._kinds) against peft 0.21, the oracle.

For each kind on each layer peft supports, peft's adapter tensors (randomised, so the update is
not trivial) are copied into the kind's parameters by name, and the weight the kind makes of W0
is compared with peft's merged weight and with peft's forward.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lora_inject._kinds import oft as oft_module
from lora_inject._view import View
from lora_inject.kind import Kind, Option, default_kinds, factored, find_kind, merged, register_kind

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "oft": peft.OFTConfig,
           "ia3": peft.IA3Config, "vera": peft.VeraConfig}
RANDOM = {"loha": dict(init_weights=False), "lokr": dict(init_weights=False),
          "oft": dict(init_weights=False), "ia3": dict(init_ia3_weights=False),
          "vera": dict(init_weights=False)}


def quiet(fn, *args, **kwargs):
    # peft warns about its own adjustments and fan_in_fan_out; they are not under test here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def view_of(layer: nn.Module) -> View:
    return View(tuple(layer.weight.shape), transpose=isinstance(layer, (Conv1D, nn.Embedding)))


def peft_model(kind: str, base: nn.Module, targets: list[str], **options):
    """peft's model of ``kind`` on a copy of ``base``, with random adapter tensors."""
    cfg = dict(options)
    if kind == "ia3":
        cfg["feedforward_modules"] = targets if cfg.pop("feedforward", False) else []
    cfg.pop("rotate", None)
    config = CONFIGS[kind](target_modules=targets, **RANDOM[kind], **cfg)
    return quiet(peft.get_peft_model, copy.deepcopy(base), config)


def peft_params(kind: str, pm, layer) -> dict[str, torch.Tensor]:
    """The adapter's tensors of peft's tuner ``layer``, by our names (peft's own)."""
    out = {}
    for name in layer.adapter_layer_names:
        holder = getattr(layer, name)
        if "default" not in holder:
            continue
        t = holder["default"]
        out["oft_R" if kind == "oft" else name] = (t.weight if isinstance(t, nn.Module) else t).detach().clone()
    if kind == "vera":
        out["vera_A"] = pm.base_model.vera_A["default"].clone()
        out["vera_B"] = pm.base_model.vera_B["default"].clone()
    return out


def ours(kind: str, W0: torch.Tensor, view: View, params, r=None, alpha=None, **options):
    k = find_kind(kind)
    r, alpha, opts = k.resolve(r, alpha, **options)
    return view.stored(merged(view.rows(W0), [(k, params, k.scaling(r, alpha, opts), opts)], view)), opts


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, Conv1D):
        return torch.addmm(bias, x.view(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, weight)
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}[type(layer)]
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


LINEAR = (lambda: nn.Linear(16, 12), lambda: torch.randn(3, 16))
CONV3 = (lambda: nn.Conv2d(4, 6, 3), lambda: torch.randn(2, 4, 7, 7))
CONV1 = (lambda: nn.Conv2d(8, 6, 1), lambda: torch.randn(2, 8, 5, 5))
CONV1D3 = (lambda: nn.Conv1d(4, 6, 3), lambda: torch.randn(2, 4, 9))
GPT2 = (lambda: Conv1D(12, 16), lambda: torch.randn(3, 16))
BIG = (lambda: nn.Linear(64, 48), lambda: torch.randn(3, 64))
EMBED = (lambda: nn.Embedding(10, 16), lambda: torch.randint(0, 10, (3, 4)))

CASES = [
    ("loha", LINEAR, dict(r=4, alpha=6)),
    ("loha", CONV3, dict(r=4, alpha=6)),
    ("loha", CONV3, dict(r=3, alpha=5, use_effective_conv2d=True)),
    ("loha", CONV1, dict(r=3, alpha=5, use_effective_conv2d=True)),  # peft turns it off for 1x1
    ("loha", CONV1D3, dict(r=2, alpha=4, use_effective_conv2d=True)),
    ("lokr", LINEAR, dict(r=1, alpha=3)),  # w2 low-rank
    ("lokr", LINEAR, dict(r=8, alpha=3)),  # both factors full: alpha still counts in peft
    ("lokr", BIG, dict(r=1, alpha=2, decompose_both=True)),
    ("lokr", BIG, dict(r=2, alpha=2, decompose_factor=4)),
    ("lokr", CONV3, dict(r=1, alpha=2)),
    ("lokr", CONV3, dict(r=1, alpha=2, use_effective_conv2d=True)),
    ("lokr", CONV3, dict(r=8, alpha=2)),
    ("lokr", CONV1D3, dict(r=1, alpha=2)),
    ("oft", LINEAR, dict(oft_block_size=4)),
    ("oft", LINEAR, dict(oft_block_size=4, use_cayley_neumann=False)),
    ("oft", LINEAR, dict(oft_block_size=8, num_cayley_neumann_terms=7)),
    ("oft", LINEAR, dict(r=2, oft_block_size=0)),
    ("oft", LINEAR, dict(oft_block_size=4, block_share=True)),
    ("oft", LINEAR, dict(oft_block_size=4, coft=True, eps=1e-2)),
    ("oft", CONV1, dict(oft_block_size=4)),
    ("oft", CONV3, dict(oft_block_size=4)),
    ("oft", CONV3, dict(oft_block_size=6, use_cayley_neumann=False)),
    ("oft", EMBED, dict(oft_block_size=4, rotate="out")),
    ("ia3", LINEAR, dict()),
    ("ia3", LINEAR, dict(feedforward=True)),
    ("ia3", GPT2, dict()),
    ("ia3", GPT2, dict(feedforward=True)),
    ("ia3", CONV3, dict()),
    ("ia3", CONV3, dict(feedforward=True)),
    ("vera", LINEAR, dict(r=4)),
    ("vera", GPT2, dict(r=4)),
]


def case_id(case) -> str:
    kind, (make, _), opts = case
    return f"{kind}-{type(make()).__name__}-" + "-".join(f"{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_merged_weight_and_forward_match_peft(case):
    kind, (make, data), opts = case
    base = nn.Sequential(make())
    with torch.no_grad():  # a random bias too (Conv1D's starts at zero), so scaling it shows
        for t in base.parameters():
            t.copy_(0.5 * torch.randn_like(t))
    pm = peft_model(kind, base, ["0"], **opts)
    layer = pm.base_model.model[0]
    plain = layer.get_base_layer()
    W0 = plain.weight.detach().clone()
    bias0 = None if getattr(plain, "bias", None) is None else plain.bias.detach().clone()
    view = view_of(plain)
    params = peft_params(kind, pm, layer)
    k = find_kind(kind)
    r, alpha, full = k.resolve(**{n: v for n, v in opts.items() if n in ("r", "alpha")},
                               **{n: v for n, v in opts.items() if n not in ("r", "alpha")})
    # Our parameters are peft's, by name and shape.
    mine = quiet(k.create, view, r, alpha, full)
    if k.shared is not None:
        mine.update(k.shared([view], r, full))
    assert {n: t.shape for n, t in mine.items()} == {n: t.shape for n, t in params.items()}

    W, full = ours(kind, W0, view, params, **opts)
    bias = bias0 if bias0 is None or k.apply_bias is None else k.apply_bias(bias0, params, view, full)
    unloaded = quiet(copy.deepcopy(pm).merge_and_unload)[0]
    torch.testing.assert_close(W, unloaded.weight.detach())
    if bias is not None:
        torch.testing.assert_close(bias, unloaded.bias.detach())

    x = data()
    with torch.no_grad():
        got = layer_forward(plain, x, W, bias)
        theirs = pm(x)
    if kind == "oft" and isinstance(plain, nn.Conv2d) and plain.kernel_size != (1, 1):
        # peft's forward on a k > 1 conv unfolds, rotates and folds back, summing the
        # overlapping patches: it is not its own merge.
        assert not torch.allclose(got, theirs, atol=1e-3)
        with torch.no_grad():
            assert not torch.allclose(unloaded(x), theirs, atol=1e-3)
    else:
        torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-5)


BIT_EXACT = [c for c in CASES if c[0] in ("ia3", "vera") or (c[0] in ("loha", "lokr") and
                                                             isinstance(c[1][0](), nn.Linear))]


@pytest.mark.parametrize("case", BIT_EXACT, ids=[case_id(c) for c in BIT_EXACT])
def test_delta_is_bit_exact_with_peft(case):
    # The same float ops as peft's get_delta_weight (or its merge, for IA3): the same bits.
    kind, (make, _), opts = case
    pm = peft_model(kind, nn.Sequential(make()), ["0"], **opts)
    layer = pm.base_model.model[0]
    plain = layer.get_base_layer()
    view = view_of(plain)
    params = peft_params(kind, pm, layer)
    if kind == "ia3":
        W, _ = ours(kind, plain.weight.detach(), view, params, **opts)
        assert torch.equal(W, quiet(copy.deepcopy(pm).merge_and_unload)[0].weight)
        return
    k = find_kind(kind)
    r, alpha, full = k.resolve(**opts)
    with torch.no_grad():
        theirs = layer.get_delta_weight("default")
    assert torch.equal(view.stored(k.delta(params, view, k.scaling(r, alpha, full), full)), theirs)


def test_vera_shared_projections_are_peft_s_bit_for_bit():
    # Two targets of different sizes: the projections are built at the largest (out, in), from
    # the same seeded generator, and each target slices its own part.
    base = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 20))
    pm = peft_model("vera", base, ["0", "1"], r=4, projection_prng_key=7)
    k = find_kind("vera")
    r, alpha, opts = k.resolve(r=4, projection_prng_key=7)
    views = [view_of(m) for m in base]
    mine = k.shared(views, r, opts)
    assert torch.equal(mine["vera_A"], pm.base_model.vera_A["default"])
    assert torch.equal(mine["vera_B"], pm.base_model.vera_B["default"])
    unloaded = quiet(copy.deepcopy(pm).merge_and_unload)
    for i, view in enumerate(views):
        layer = pm.base_model.model[i]
        params = peft_params("vera", pm, layer)
        W, _ = ours("vera", layer.get_base_layer().weight.detach(), view, params, r=4)
        torch.testing.assert_close(W, unloaded[i].weight.detach())


def test_lokr_effective_conv1d_where_peft_fails():
    # peft 0.21's LoKr on a Conv1d with use_effective_conv2d stores lokr_t2 as (r, r, k, 1) and
    # then fails in torch.kron, in its forward and its merge. Ours reads the same tensors.
    pm = peft_model("lokr", nn.Sequential(nn.Conv1d(4, 6, 3)), ["0"], r=1, alpha=2,
                    use_effective_conv2d=True)
    layer = pm.base_model.model[0]
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        layer.get_delta_weight("default")
    params = peft_params("lokr", pm, layer)
    assert params["lokr_t2"].shape == (1, 1, 3, 1)
    W0 = layer.get_base_layer().weight.detach()
    W, _ = ours("lokr", W0, View(tuple(W0.shape)), params, r=1, alpha=2, use_effective_conv2d=True)
    w2 = torch.einsum("ijkl,ip,jr->prk", params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"])
    expect = torch.kron(params["lokr_w1"], w2.reshape(3, -1)) * 2.0
    torch.testing.assert_close(W, W0 + expect.reshape(W0.shape))


def test_lokr_alpha_counts_with_both_factors_full():
    # LyCORIS ignores alpha when no factor is low-rank; peft 0.21 scales by alpha / r anyway.
    make, _ = LINEAR
    deltas = []
    for alpha in (1.0, 4.0):
        torch.manual_seed(0)
        pm = peft_model("lokr", nn.Sequential(make()), ["0"], r=8, alpha=alpha)
        layer = pm.base_model.model[0]
        assert set(peft_params("lokr", pm, layer)) == {"lokr_w1", "lokr_w2"}
        with torch.no_grad():
            deltas.append(layer.get_delta_weight("default"))
    torch.testing.assert_close(deltas[1], 4 * deltas[0])


def test_oft_neumann_expands_the_transpose_of_the_exact_cayley():
    # peft's series I + 2Q + 2Q^2 + .. expands (I + Q)(I - Q)^-1, the transpose of the exact
    # (I - Q)(I + Q)^-1 it computes with use_cayley_neumann=False.
    vec = 1e-3 * torch.randn(3, 6, dtype=torch.float64)
    series = oft_module.cayley(vec, 4, neumann=True, terms=12)
    exact = oft_module.cayley(vec, 4, neumann=False, terms=5)
    torch.testing.assert_close(series, exact.mT)
    assert not torch.allclose(series, exact, atol=1e-4)
    eye = torch.eye(4, dtype=torch.float64).expand_as(exact)
    torch.testing.assert_close(exact @ exact.mT, eye)  # exactly orthogonal, to rounding


def test_oft_adjusts_a_block_size_that_does_not_divide_as_peft_does():
    pm = peft_model("oft", nn.Sequential(nn.Linear(18, 4)), ["0"], oft_block_size=4)
    theirs = pm.base_model.model[0].oft_R["default"].weight
    k = find_kind("oft")
    r, alpha, opts = k.resolve(oft_block_size=4)
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(3\)"):
        mine = k.create(View((4, 18)), r, alpha, opts)
    assert mine["oft_R"].shape == theirs.shape


def test_coft_projects_oft_R_in_place_as_peft_does():
    pm = peft_model("oft", nn.Sequential(nn.Linear(16, 12)), ["0"], oft_block_size=4, coft=True, eps=1e-2)
    layer = pm.base_model.model[0]
    params = peft_params("oft", pm, layer)
    before = params["oft_R"].clone()
    ours("oft", layer.get_base_layer().weight.detach(), View((12, 16)), params, oft_block_size=4,
         coft=True, eps=1e-2)
    with torch.no_grad():
        layer.get_delta_weight("default")  # peft projects its own copy in place
    assert not torch.equal(params["oft_R"], before)
    torch.testing.assert_close(params["oft_R"], layer.oft_R["default"].weight.detach())


# -- identity at init, on every view ------------------------------------------------------------
def _views():
    dims = st.integers(1, 9)
    matrix = st.tuples(dims, dims).map(View)
    conv = st.tuples(dims, dims, st.integers(1, 3), st.integers(1, 3)).map(View)
    conv1 = st.tuples(dims, dims, st.integers(1, 4)).map(View)
    transposed = st.tuples(dims, dims).map(lambda s: View(s, transpose=True))
    experts = st.tuples(st.integers(1, 3), dims, dims).map(lambda s: View(s, experts=True))
    return st.one_of(matrix, conv, conv1, transposed, experts)


def _setup(kind: str, view: View, r: int, flag: bool):
    k = find_kind(kind)
    options = {
        "loha": dict(r=r, alpha=2 * r, use_effective_conv2d=flag),
        "lokr": dict(r=r, alpha=3.0, use_effective_conv2d=flag, decompose_both=not flag),
        "oft": dict(oft_block_size=1 + r % view.in_features if view.in_features > 1 else 1,
                    use_cayley_neumann=flag, block_share=r % 2 == 0),
        "ia3": dict(feedforward=flag),
        "vera": dict(r=r, d_initial=0.5),
    }[kind]
    r, alpha, opts = k.resolve(**options)
    params = quiet(k.create, view, r, alpha, opts)
    if k.shared is not None:
        params.update(k.shared([view], r, opts))
    return k, params, k.scaling(r, alpha, opts) if r else 1.0, opts


@pytest.mark.parametrize("kind", ["loha", "lokr", "oft", "ia3", "vera"])
@given(view=_views(), r=st.integers(1, 6), flag=st.booleans())
def test_identity_at_init(kind, view, r, flag):
    k, params, s, opts = _setup(kind, view, r, flag)
    W0 = torch.randn(view.shape)
    W = view.stored(merged(view.rows(W0), [(k, params, s, opts)], view))
    assert torch.equal(W, W0)
    if k.apply_bias is not None:
        b = torch.randn(*view.lead, view.out_features)
        assert torch.equal(k.apply_bias(b, params, view, opts), b)


def _randomize(params, frozen):
    with torch.no_grad():
        for name, t in params.items():
            if name not in frozen:
                t.copy_(0.3 * torch.randn_like(t))


@pytest.mark.parametrize("kinds", [("ia3",), ("vera",), ("oft",), ("lokr",), ("ia3", "vera", "oft", "lokr")])
@given(out=st.integers(1, 12), inn=st.integers(1, 12), r=st.integers(1, 5), flag=st.booleans(),
       transpose=st.booleans(), batch=st.integers(1, 3))
def test_factored_linear_equals_merged(kinds, out, inn, r, flag, transpose, batch):
    # The factored forms, composed in order around the base op, give F.linear with the merged
    # weight and bias; none builds an (out, in) tensor. The tensors train, as they do where the
    # forms run (LoKr's gives way to the merged weight where nothing needs a gradient).
    view = View((inn, out) if transpose else (out, inn), transpose=transpose)
    steps = []
    for kind in kinds:
        k, params, s, opts = _setup(kind, view, r, flag)
        _randomize(params, k.frozen)
        for name, t in params.items():
            t.requires_grad_(name not in k.frozen)
        steps.append((k, params, s, opts))
    W0, b0 = torch.randn(view.shape), torch.randn(out)
    x = torch.randn(batch, 2, inn)
    W = merged(view.rows(W0), steps, view)
    b = b0
    for k, params, _, opts in steps:
        if k.additive or k.apply_bias is None:
            continue
        b = k.apply_bias(b, params, view, opts)
    rows0 = view.rows(W0)
    got = factored("linear", x, lambda z: F.linear(z, rows0, b0), steps, view)
    torch.testing.assert_close(got, F.linear(x, W, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["loha", "lokr", "oft", "ia3", "vera"])
@given(view=_views(), r=st.integers(1, 6), flag=st.booleans())
def test_gradients_reach_every_trained_tensor(kind, view, r, flag):
    k, params, s, opts = _setup(kind, view, r, flag)
    _randomize(params, k.frozen)
    trained = {n: t.requires_grad_() for n, t in params.items() if n not in k.frozen}
    W0 = torch.randn(view.shape)
    W = view.stored(merged(view.rows(W0), [(k, params, s, opts)], view))
    (W * torch.randn_like(W)).sum().backward()
    for name, t in trained.items():
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()), name
    assert all(params[n].grad is None for n in k.frozen)


def test_factored_is_none_without_a_form():
    k, params, s, opts = _setup("loha", View((4, 6)), 2, False)
    assert factored("linear", torch.randn(2, 6), lambda z: z, [(k, params, s, opts)], View((4, 6))) is None


def test_kinds_compose_in_order():
    # An additive update before a rotation is rotated; after it, it is not.
    view = View((8, 8))
    add = _setup("vera", view, 3, False)
    rot = _setup("oft", view, 3, False)
    _randomize(add[1], add[0].frozen), _randomize(rot[1], rot[0].frozen)
    W0 = torch.randn(8, 8)
    first = merged(W0, [add, rot], view)
    second = merged(W0, [rot, add], view)
    delta = add[0].delta(add[1], view, add[2], add[3])
    torch.testing.assert_close(first, rot[0].apply(W0 + delta, rot[1], view, 1.0, rot[3]))
    torch.testing.assert_close(second, rot[0].apply(W0, rot[1], view, 1.0, rot[3]) + delta)
    assert not torch.allclose(first, second)


# -- options and the registry -------------------------------------------------------------------
def test_registry_holds_the_builtin_kinds_by_name():
    kinds = default_kinds()
    assert {"loha", "lokr", "oft", "ia3", "vera"} <= set(kinds)
    assert all(kinds[n].name == n for n in kinds)
    assert find_kind("oft").additive is False and find_kind("vera").additive is True


def test_peft_defaults():
    assert find_kind("vera").resolve()[0] == 256
    assert find_kind("loha").resolve()[:2] == (8, 8.0)
    r, _, opts = find_kind("oft").resolve()
    assert (r, opts["oft_block_size"], opts["use_cayley_neumann"], opts["eps"]) == (0, 32, True, 6e-5)
    assert find_kind("lokr").resolve()[2]["decompose_factor"] == -1


@pytest.mark.parametrize("kind, kwargs, match", [
    ("loha", dict(rank_dropout=1.5), r"option `rank_dropout` must be a float in \[0, 1\), got 1.5"),
    ("lokr", dict(decompose_factor=0), r"option `decompose_factor` must be a positive int, or -1"),
    ("oft", dict(r=4), r"set exactly one of `r` \(the number of blocks\) and `oft_block_size`, got r=4 "
                       r"and oft_block_size=32.*\(oft_block_size defaults to 32"),
    ("oft", dict(oft_block_size=0), r"got r=0 and oft_block_size=0"),
    ("oft", dict(oft_block_size=4, rotate="side"), r"option `rotate` must be 'in' or 'out', got 'side'"),
    ("vera", dict(r=0), r"inject\(kind='vera'\): `r` must be an int >= 1, got 0"),
    ("loha", dict(r=0), r"inject\(kind='loha'\): `r` must be an int >= 1, got 0"),
    ("ia3", dict(feedforward="yes"), r"option `feedforward` must be a bool"),
])
def test_bad_option_values_are_named(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_kind(kind).resolve(**kwargs)


def test_unknown_option_names_the_kind_s_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['block_size'\]; the options of 'oft' are"):
        find_kind("oft").resolve(block_size=4)


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown `kind` 'boft'; the kinds are \['full', 'ia3', 'loha', 'lokr', "
                                         r"'lora', 'oft', 'tokens', 'vera'\]"):
        find_kind("boft")


def test_a_user_kind_registers_as_data():
    def create(view, r, alpha, options):
        return {"gain": torch.ones(*view.lead, view.out_features)}

    def apply(W, params, view, scaling, options):
        return W * params["gain"][..., :, None] ** options["power"]

    kind = Kind("gain_test", create=create, apply=apply, default_r=None, default_alpha=None,
                options=(Option("power", 1, lambda v: isinstance(v, int), "an int"),))
    register_kind("gain_test", kind)
    try:
        k = find_kind("gain_test")
        r, alpha, opts = k.resolve(power=2)
        params = k.create(View((3, 4)), r, alpha, opts)
        W0 = torch.randn(3, 4)
        assert torch.equal(merged(W0, [(k, params, 1.0, opts)], View((3, 4))), W0)
    finally:
        from lora_inject import kind as kind_module
        del kind_module._KINDS["gain_test"]


def test_kind_definition_errors():
    with pytest.raises(ValueError, match="set exactly one of `delta`"):
        Kind("both", create=lambda *a: {}, delta=lambda *a: 0, apply=lambda *a: 0)
    with pytest.raises(ValueError, match="differs from the kind's own name"):
        register_kind("other", find_kind("ia3"))
    with pytest.raises(TypeError, match="must be a lora_inject.Kind"):
        register_kind("ia3", object())
