"""Property tests for every default rule (and a user's own rule), over random small layers.

The reference is the test's own: a copy of the plain layer run, through
``torch.func.functional_call``, with each adapted weight replaced by ``W0 + (alpha / r) * B @ A``
in the matrix view that :class:`strategies.Adapted` states (rows, or transposed).
"""

from __future__ import annotations

import copy
import re
from unittest import mock

import pytest
import torch
from _helpers import randomize, run
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import CASES, FAST, KINDS, Case, Mixer, matrix_dims, multihead_attention, r_max, rnn, rnn_tensor_names
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import lora_inject as li
from lora_inject import LoRA

F64 = torch.float64
ALPHAS = st.sampled_from([0.5, 1.0, 3.0, 16.0])


# -- helpers -------------------------------------------------------------------------------------
def plain(case: Case, dtype=torch.float32) -> nn.Module:
    return copy.deepcopy(case.model).to(dtype)


def plain_as_seen(case: Case, frozen) -> nn.Module:
    """``plain(case)`` with ``requires_grad=False`` on each adapted tensor for which ``frozen(a)``.

    A bit-exact comparison is only fair between runs of the same kernels, and PyTorch picks a
    layer's kernel by whether its weight needs a gradient: an RNN on a CPU with AVX512-BF16 runs
    another kernel for a frozen weight (its outputs differ by one float32 step). So the reference
    for an adapted model sees each weight as the adapted layer sees it: ``W0`` itself, frozen, for
    ``disabled()`` and for the base op of the factored path; ``W0 + s * B @ A``, which needs a
    gradient through the factors, on the merged path.
    """
    model = plain(case)
    for a in case.adapted:
        if frozen(a):
            getattr(model.get_submodule(a.module), a.tensor).requires_grad_(False)
    return model


def inject(model, case: Case, adapter="default", r=None, alpha=None):
    return li.inject(model, case.targets, r=r or case.r, alpha=case.alpha if alpha is None else alpha,
                     adapter=adapter, rules=case.rules)


def loras(model) -> dict[str, LoRA]:
    return dict(li.named_loras(model))


def factors(model, case: Case, adapter, r, alpha, leaves=False) -> dict[str, list]:
    """``{key: [(A, B, alpha / r)]}``: copies of the library's factors, scaled by the test."""
    found = loras(model)
    out = {}
    for a in case.adapted:
        A, B = (t.detach().clone().to(F64).requires_grad_(leaves)
                for t in (found[a.key].lora_A[adapter], found[a.key].lora_B[adapter]))
        out[a.key] = [(A, B, alpha / r)]
    return out


def merge(*updates):
    out = {}
    for u in updates:
        for k, v in u.items():
            out.setdefault(k, []).extend(v)
    return out


def delta(A: Tensor, B: Tensor, shape, transpose: bool) -> Tensor:
    d = B @ A  # (out, r) @ (r, in) -> (out, in)
    return d.T if transpose else d.reshape(shape)


def expected_weights(base: nn.Module, case: Case, updates, w0=None) -> dict[str, Tensor]:
    """``{key: W0 + sum s * view(B @ A)}`` with ``W0`` read from ``base`` (or given in ``w0``)."""
    weights = {}
    for a in case.adapted:
        W = w0[a.key] if w0 else getattr(base.get_submodule(a.module), a.tensor)
        for A, B, s in updates.get(a.key, []):
            W = W + s * delta(A, B, W.shape, a.transpose)
        weights[a.key] = W
    return weights


def reference(base: nn.Module, case: Case, updates, w0=None) -> list[Tensor]:
    return run(base, case, F64, params=expected_weights(base, case, updates, w0))


def assert_all_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is Tensor and torch.equal(g, w)


def assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def loss_of(outputs, seed) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)


def weight_of(model, a) -> Tensor:
    return getattr(model.get_submodule(a.module), a.tensor).clone()  # clone: a plain tensor


def structure(model: nn.Module):
    """Classes, hook counts, state-dict keys (in order) and parameter ids, to compare exactly."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._load_state_dict_pre_hooks))
         for n, m in model.named_modules()],
        list(model.state_dict()),
        [(n, id(p)) for n, p in model.named_parameters()],
    )


def set_factored(model, value: bool):
    for lora in loras(model).values():
        lora.factored = value


# -- which tensors are adapted --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_adapts_exactly_the_rule_tensors(kind, data):
    case = data.draw(CASES[kind], label="case")
    model = inject(plain(case), case)
    found = loras(model)
    assert sorted(found) == sorted(a.key for a in case.adapted)
    for a in case.adapted:
        out, fin = matrix_dims(case.model, a)
        lora = found[a.key]
        assert lora.lora_A["default"].shape == (case.r, fin)
        assert lora.lora_B["default"].shape == (out, case.r)
        assert lora.factored == a.fast
        assert lora.lora_A["default"].dtype == torch.float32
        assert isinstance(model.get_submodule(a.module), type(case.model.get_submodule(a.module)))


# -- (a) identical right after inject -------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_outputs_identical_after_inject(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = run(plain_as_seen(case, frozen=lambda a: a.fast), case)  # the factored path runs op(x, W0)
    assert_all_equal(run(inject(plain(case), case), case), base)


# -- (b) forward equals the independent float64 reference, on both paths ---------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_forward_matches_reference(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = plain(case, F64)
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, dtype=F64)
    want = reference(base, case, factors(model, case, "default", case.r, case.alpha))
    assert_all_close(run(model, case, F64), want)
    set_factored(model, False)  # the merged path too
    assert_all_close(run(model, case, F64), want)


# -- (c) gradients of A and B equal the reference's -----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_gradients_match_reference(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = plain(case, F64)
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, dtype=F64)
    updates = factors(model, case, "default", case.r, case.alpha, leaves=True)
    leaves = [t for a in case.adapted for A, B, _ in updates[a.key] for t in (A, B)]
    grads = torch.autograd.grad(loss_of(reference(base, case, updates), case.seed), leaves,
                                allow_unused=True, materialize_grads=True)
    found = loras(model)
    mine = [t for a in case.adapted for t in (found[a.key].lora_A["default"], found[a.key].lora_B["default"])]
    for path in ("default", "merged"):
        if path == "merged":
            set_factored(model, False)
        for t in mine:
            t.grad = None
        loss_of(run(model, case, F64), case.seed).backward()
        for t, g in zip(mine, grads):
            torch.testing.assert_close(t.grad if t.grad is not None else torch.zeros_like(t), g)


# -- (d) merged outputs equal unmerged ones ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_merge_matches_unmerged(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = plain(case, F64)
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, dtype=F64)
    want_w = expected_weights(base, case, factors(model, case, "default", case.r, case.alpha))
    unmerged = run(model, case, F64)
    li.remove(model, merge=True)
    assert structure(model)[:3] == structure(base)[:3]
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert_all_close(run(model, case, F64), unmerged)
    for a in case.adapted:
        torch.testing.assert_close(weight_of(model, a), want_w[a.key])


# -- (e) remove(merge=False) restores exactly -------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_remove_unmerged_restores_exactly(kind, data):
    case = data.draw(CASES[kind], label="case")
    model = plain(case)
    before = structure(model)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model, case)
    inject(model, case)
    randomize(model, "default", case.seed, dtype=F64)
    loss_of(run(model, case), case.seed).backward()
    li.remove(model, merge=False)
    assert structure(model) == before
    for (n, m), (_, cls) in zip(model.named_modules(), before[0]):
        assert type(m) is cls and not hasattr(m, "parametrizations"), n
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in values.items())
    assert_all_equal(run(model, case), base)


# -- (f) lora_state_dict round trip ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_lora_state_dict_round_trip(kind, data):
    case = data.draw(CASES[kind], label="case")
    source = inject(plain(case), case)
    randomize(source, "default", case.seed, dtype=F64)
    sd = li.lora_state_dict(source)
    full = source.state_dict()
    assert len(sd) == 2 * len(case.adapted) and set(sd) <= set(full)
    assert all(re.search(r"\.lora_[AB]\.default$", k) for k in sd)
    torch.manual_seed(case.seed + 1)  # different initial factors
    target = inject(plain(case), case)
    result = target.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(set(full) - set(sd))
    assert_all_equal(run(target, case), run(source, case))


# -- (g) disabled gives the base outputs, and restores on exit --------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_disabled_gives_base_outputs(kind, data):
    case = data.draw(CASES[kind], label="case")
    base = run(plain_as_seen(case, frozen=lambda a: True), case)  # disabled: every layer sees W0, frozen
    model = inject(inject(plain(case), case), case, adapter="other")
    for adapter in ("default", "other"):
        randomize(model, adapter, case.seed + len(adapter), dtype=F64)
    li.activate(model, "other")
    active = run(model, case)
    with li.disabled(model):
        assert_all_equal(run(model, case), base)
        with li.disabled(model):
            assert_all_equal(run(model, case), base)
        assert_all_equal(run(model, case), base)
    assert all(lora.active == ["other"] for lora in loras(model).values())
    assert_all_equal(run(model, case), active)
    with pytest.raises(KeyError), li.disabled(model):
        raise KeyError("inside")
    assert all(lora.active == ["other"] for lora in loras(model).values())
    assert_all_equal(run(model, case), active)


# -- (h) two adapters add up -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_two_adapters_add_up(kind, data):
    case = data.draw(CASES[kind], label="case")
    r2, alpha2 = data.draw(st.integers(1, r_max(case)), label="r2"), data.draw(ALPHAS, label="alpha2")
    base = plain(case, F64)
    model = inject(inject(copy.deepcopy(base), case, adapter="one"), case, adapter="two", r=r2, alpha=alpha2)
    randomize(model, "one", case.seed, dtype=F64)
    randomize(model, "two", case.seed + 1, dtype=F64)
    one = factors(model, case, "one", case.r, case.alpha)
    two = factors(model, case, "two", r2, alpha2)
    for chosen, updates in ((["one", "two"], merge(one, two)), (["one"], one), (["two"], two), ([], {})):
        li.activate(model, chosen)
        want = expected_weights(base, case, updates)
        for a in case.adapted:
            torch.testing.assert_close(weight_of(model, a), want[a.key])
        assert_all_close(run(model, case, F64), reference(base, case, updates))


# -- (i) stacked with weight_norm (before ours) and spectral_norm (after ours) -----------------------
def dense_weights(model: nn.Module, case: Case) -> nn.Module:
    """Refill the adapted weights at random: an Embedding's zero padding row has no direction to keep."""
    gen = torch.Generator().manual_seed(case.seed)
    with torch.no_grad():
        for a in case.adapted:
            W = getattr(model.get_submodule(a.module), a.tensor)
            W.copy_(torch.randn(W.shape, generator=gen, dtype=W.dtype))
    return model


def norm_except_dim0(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))


@pytest.mark.parametrize("merge_on_remove", [pytest.param(True, id="merge"), pytest.param(False, id="no_merge")])
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=max(2, settings.default.max_examples // 6))
@given(data=st.data())
def test_weight_norm_before_ours_survives_remove(kind, merge_on_remove, data):
    case = data.draw(CASES[kind], label="case")
    bare = dense_weights(plain(case, F64), case)
    normed = copy.deepcopy(bare)
    for a in case.adapted:
        weight_norm(normed.get_submodule(a.module), a.tensor, dim=0)
    gv = {a.key: [t.clone() for t in originals(normed, a)] for a in case.adapted}
    base = run(normed, case, F64)
    before = structure(normed)
    model = inject(normed, case)
    assert [type(p).__name__ for p in model.get_submodule(case.adapted[0].module)
            .parametrizations[case.adapted[0].tensor]] == ["_WeightNorm", "LoRA"]
    randomize(model, "default", case.seed, dtype=F64)
    updates = factors(model, case, "default", case.r, case.alpha)
    w0 = {k: g * v / norm_except_dim0(v) for k, (g, v) in gv.items()}
    want = reference(bare, case, updates, w0)
    assert_all_close(run(model, case, F64), want)
    li.remove(model, merge=merge_on_remove)
    assert structure(model) == before
    assert not loras(model)
    for a in case.adapted:
        assert [type(p).__name__ for p in model.get_submodule(a.module).parametrizations[a.tensor]] == [
            "_WeightNorm"]
    if merge_on_remove:
        assert_all_close(run(model, case, F64), want)
        target = expected_weights(bare, case, updates, w0)
        for a in case.adapted:
            torch.testing.assert_close(weight_of(model, a), target[a.key])
    else:
        for a in case.adapted:
            assert all(torch.equal(t, u) for t, u in zip(originals(model, a), gv[a.key]))
        assert_all_equal(run(model, case, F64), base)


def originals(model, a) -> list[Tensor]:
    plist = model.get_submodule(a.module).parametrizations[a.tensor]
    return [plist.original] if plist.is_tensor else [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


@pytest.mark.parametrize("merge_on_remove", [pytest.param(True, id="merge"), pytest.param(False, id="no_merge")])
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=max(2, settings.default.max_examples // 6))
@given(data=st.data())
def test_spectral_norm_after_ours_survives_remove(kind, merge_on_remove, data):
    # torch's weight_norm takes two originals (g, v), so it can only be the first parametrization on a
    # tensor; spectral_norm is the normalisation torch lets stack after another one.
    case = data.draw(CASES[kind], label="case")
    bare = dense_weights(plain(case, F64), case)
    model = inject(copy.deepcopy(bare), case)
    randomize(model, "default", case.seed, dtype=F64)
    for a in case.adapted:
        spectral_norm(model.get_submodule(a.module), a.tensor)
    model.eval()  # no power iteration: sigma = u . (W v) with the stored u, v
    ids = {a.key: id(originals(model, a)[0]) for a in case.adapted}
    updates = factors(model, case, "default", case.r, case.alpha)

    def normalised(updates):
        weights = expected_weights(bare, case, updates)
        for a in case.adapted:
            sn = model.get_submodule(a.module).parametrizations[a.tensor][-1]
            W = weights[a.key]
            mat = W.movedim(sn.dim, 0).reshape(W.shape[sn.dim], -1) if W.dim() > 1 else W
            weights[a.key] = W / torch.dot(sn._u, mat @ sn._v)
        return weights

    want = run(bare, case, F64, params=normalised(updates))
    assert_all_close(run(model, case, F64), want)
    li.remove(model, merge=merge_on_remove)
    assert not loras(model)
    for a in case.adapted:
        plist = model.get_submodule(a.module).parametrizations[a.tensor]
        assert [type(p).__name__ for p in plist] == ["_SpectralNorm"]
        assert id(plist.original) == ids[a.key]
        if not merge_on_remove:
            assert torch.equal(plist.original, getattr(bare.get_submodule(a.module), a.tensor))
    assert_all_close(run(model, case, F64), want if merge_on_remove else run(bare, case, F64,
                                                                            params=normalised({})))


# -- MultiheadAttention and RNN specifics -----------------------------------------------------------
@FAST
@given(case=multihead_attention(target="out_proj"))
def test_mha_out_proj_alone_changes_the_output(case):
    base = plain(case, F64)
    model = inject(copy.deepcopy(base), case)
    assert sorted(loras(model)) == ["out_proj.weight"]
    randomize(model, "default", case.seed, dtype=F64)
    got, before = run(model, case, F64), run(base, case, F64)
    assert not torch.allclose(got[0], before[0])  # the attention output itself
    assert_all_close(got, reference(base, case, factors(model, case, "default", case.r, case.alpha)))


@pytest.mark.parametrize("target", ["all", "own", "out_proj"])
@FAST
@given(data=st.data())
def test_mha_inference_paths_match_reference(target, data):
    # In eval mode without grad, self-attention takes PyTorch's native kernel unless a weight
    # has a __torch_function__ (the factored out_proj), which sends it down the Python path.
    case = data.draw(multihead_attention(target=target, self_attention=True), label="case")
    base = plain(case, F64).eval()
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, dtype=F64)
    want = reference(base, case, factors(model, case, "default", case.r, case.alpha))
    native = torch._native_multi_head_attention
    calls = []
    counted = {}
    real = LoRA.merged

    def counting(self, W, names=None, *rest):
        counted[id(self)] = counted.get(id(self), 0) + 1
        return real(self, W, names, *rest)

    def spy(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    with torch.no_grad(), mock.patch.object(torch, "_native_multi_head_attention", spy), \
            mock.patch.object(LoRA, "merged", counting):
        assert_all_close(run(model, case, F64), want)
    assert len(calls) == (target == "own")
    assert [counted.get(id(lo), 0) for lo in loras(model).values() if not lo.factored] == [1] * (target != "out_proj")


@FAST
@given(case=rnn(num_layers=2, bidirectional=True))
def test_rnn_rule_covers_every_gate_weight(case):
    names = rnn_tensor_names(2, True)
    assert len(names) == 8 and all(n in dict(case.model.named_parameters()) for n in names)
    model = inject(plain(case), case)
    assert sorted(loras(model)) == sorted(names)
    assert all(not n.startswith(("bias", "weight_hr")) for n in loras(model))


@pytest.mark.parametrize("strategy", [
    pytest.param(multihead_attention(target="all"), id="mha_all"),
    pytest.param(multihead_attention(target="own"), id="mha_own"),
    pytest.param(rnn(), id="rnn"),
])
@FAST
@given(data=st.data())
def test_merged_weight_built_once_per_forward(strategy, data):
    case = data.draw(strategy, label="case")
    calls: dict[int, int] = {}
    real = LoRA.merged

    def counting(self, W, names=None, *rest):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return real(self, W, names, *rest)

    base = plain(case, F64)
    model = inject(copy.deepcopy(base), case)
    randomize(model, "default", case.seed, dtype=F64)
    merged_path = [lora for lora in loras(model).values() if not lora.factored]
    assert merged_path
    with mock.patch.object(LoRA, "merged", counting):
        for step in (1, 2):
            loss_of(run(model, case, F64), case.seed).backward()
            assert [calls.get(id(lora), 0) for lora in merged_path] == [step] * len(merged_path)
    # Nothing stale from the previous forward: new factors show at once.
    randomize(model, "default", case.seed + 1, dtype=F64)
    want = reference(base, case, factors(model, case, "default", case.r, case.alpha))
    assert_all_close(run(model, case, F64), want)


# -- a user's own type, registered once ----------------------------------------------------------
def test_user_type_registered_with_register_rule(monkeypatch):
    from lora_inject import rule

    monkeypatch.setattr(rule, "_DEFAULT_RULES", rule.default_rules())
    model = nn.Sequential(Mixer(3, 2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="Mixer"):
        li.inject(copy.deepcopy(model), "0")
    li.register_rule(Mixer, li.Rule(("kernel",)))
    li.inject(model, "0", r=2)
    assert sorted(loras(model)) == ["0.kernel"]
    assert parametrize.is_parametrized(model[0], "kernel") and isinstance(model[0], Mixer)
