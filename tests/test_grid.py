"""The factored weight under every PyTorch transform: a grid of op x layout x variant x dtype x mode.

Each case adapts one layer whose forward reaches its weight through one factored op, and checks
it against the same thing on the plain layer (``remove(merge=False)`` of a copy) run with the
merged weight, built here by hand from ``W0`` and the factors (DoRA as peft defines it), in
outputs and in gradients; the output also equals ``remove(merge=True)`` of a copy. The modes:
eager, no_grad, inference_mode, autocast bf16/fp16, torch.func (grad, vmap, jacrev, jvp,
functional_call), torch.compile (fullgraph, aot_eager) and torch.export.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from transformers.pytorch_utils import Conv1D

import lora_inject as li


class MatmulRows(nn.Module):
    """``x @ W`` with ``W`` (out, in) adapted by rows: the op's output carries the *input* units."""

    def __init__(self, n=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x):
        return torch.matmul(x, self.weight)


class MatmulTransposed(nn.Module):
    """``x @ W`` with ``W`` stored (in, out): the op's output carries the output units."""

    def __init__(self, n_in=5, n_out=7):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)

    def forward(self, x):
        return x @ self.weight


class AddmmRows(MatmulRows):
    def __init__(self, n=6):
        super().__init__(n)
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(x.shape)


class LinearTransposed(MatmulTransposed):
    """``F.linear`` on a weight stored (in, out): its output carries the stored dim 0."""

    def forward(self, x):
        return F.linear(x, self.weight)


RULES = {
    **li.default_rules(),
    MatmulRows: li.Rule(("weight",), factored=True),
    AddmmRows: li.Rule(("weight",), factored=True),
    MatmulTransposed: li.Rule(("weight",), transpose=True, factored=True),
    LinearTransposed: li.Rule(("weight",), transpose=True, factored=True),
}

# name: (layer, input, whether the rule is transposed)
LAYERS = {
    "linear": (lambda: nn.Linear(5, 7), lambda: torch.randn(3, 4, 5), False),
    "conv1d-hf-addmm": (lambda: Conv1D(7, 5), lambda: torch.randn(3, 4, 5), True),
    "matmul-rows": (MatmulRows, lambda: torch.randn(3, 4, 6), False),
    "matmul-transposed": (MatmulTransposed, lambda: torch.randn(3, 4, 5), True),
    "addmm-rows": (AddmmRows, lambda: torch.randn(3, 4, 6), False),
    "linear-transposed": (LinearTransposed, lambda: torch.randn(3, 4, 7), True),
    "embedding": (lambda: nn.Embedding(11, 6, padding_idx=2), lambda: torch.randint(0, 11, (3, 4)), True),
    "embedding-bag": (lambda: nn.EmbeddingBag(11, 6, mode="mean"), lambda: torch.randint(0, 11, (3, 4)), True),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, dilation=2), lambda: torch.randn(2, 4, 9), False),
    "conv2d": (lambda: nn.Conv2d(3, 5, (3, 2), stride=2), lambda: torch.randn(2, 3, 6, 5), False),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(1, 2, 4, 3, 3), False),
}
VARIANTS = ["plain", "dora", "two", "dropout-eval"]
DTYPES = {"fp32": torch.float32, "bf16-weights": torch.bfloat16}


def adapted(layer_name: str, variant: str, dtype: torch.dtype):
    make, inputs, transpose = LAYERS[layer_name]
    torch.manual_seed(0)
    layer = make().to(dtype)
    kw = dict(r=2, alpha=3, rules=RULES, dtype=torch.float32)
    if variant == "two":
        li.inject(layer, "", adapter="a", **kw)
        li.inject(layer, "", adapter="b", dora=True, **kw)
    else:
        li.inject(layer, "", adapter="a", dora=variant == "dora", dropout=0.1 if variant == "dropout-eval" else 0.0,
                  **kw)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "magnitude" in n else 0.0))
    if variant == "dropout-eval":
        layer.eval()
    li.mark_only_lora_as_trainable(layer)
    x = inputs()
    return layer, (x.to(dtype) if x.is_floating_point() else x), transpose


def factor_names(layer) -> list[str]:
    return [n for n, _ in layer.named_parameters() if ".lora_" in n]


def merged_weight(w0, params, lora, transpose):
    """``W0`` with the active adapters applied, by hand: plain ones add ``s B A``; a DoRA one turns
    the weight so far ``W`` into ``m / ||W0 + s B A|| * (W + s B A)``, the norm without gradient."""
    ct = torch.promote_types(w0.dtype, torch.float32)
    M0 = (w0.t() if transpose else w0.reshape(w0.shape[0], -1)).to(ct)
    W = M0
    for name in lora.active:
        A, B = (params[f"parametrizations.weight.0.lora_{k}.{name}"].to(ct) for k in "AB")
        update = lora.scaling[name] * (B @ A)
        if lora.config[name]["dora"]:
            m = params[f"parametrizations.weight.0.lora_magnitude.{name}"].to(ct)
            W = (m / torch.linalg.vector_norm(M0 + update, dim=1).detach()).unsqueeze(1) * (W + update)
        else:
            W = W + update
    return (W.t() if transpose else W.reshape(w0.shape)).to(w0.dtype)


def reference(layer, transpose):
    """``f(params, x)``: the plain layer, run with the weight merged by hand from ``params``."""
    lora = layer.parametrizations.weight[0]
    w0 = layer.parametrizations.weight.original.detach()
    plain = li.remove(copy.deepcopy(layer), merge=False)

    def f(params, x):
        return functional_call(plain, {"weight": merged_weight(w0, params, lora, transpose)}, (x,))

    return f


def params_of(layer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in layer.named_parameters() if ".lora_" in n}


def adapted_fn(layer):
    def f(params, x):
        return functional_call(layer, params, (x,))

    return f


def tol(dtype, mode):
    if mode == "autocast-fp16":
        return 1e-2
    if dtype == torch.bfloat16 or mode == "autocast-bf16":
        return 4e-2
    return 1e-5


def close(got, want, t):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    scale = want.detach().float().abs().max().item() + 1
    torch.testing.assert_close(got.detach().double(), want.detach().double(), rtol=t, atol=t * scale)


def outputs_and_grads(f, params, x, probe=None):
    out = f(params, x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if probe is None else probe
    names = list(params)
    grads = torch.autograd.grad((out.float() * probe).sum(), [params[n] for n in names])
    return out, dict(zip(names, grads))


CASES = [pytest.param(layer, variant, dname, id=f"{layer}-{variant}-{dname}")
         for layer in LAYERS for variant in VARIANTS for dname in DTYPES]


@pytest.mark.parametrize("layer_name, variant, dname", CASES)
@pytest.mark.parametrize("mode", ["eager", "autocast-bf16", "autocast-fp16"])
def test_outputs_and_gradients_equal_the_merged_plain_layer(layer_name, variant, dname, mode):
    layer, x, transpose = adapted(layer_name, variant, DTYPES[dname])
    params = params_of(layer)
    ours, ref = adapted_fn(layer), reference(layer, transpose)
    t = tol(DTYPES[dname], mode)
    if mode == "eager":
        merged = li.remove(copy.deepcopy(layer), merge=True)
        close(ours(params, x), merged(x), t)
        got, got_grads = outputs_and_grads(ours, params, x)
        want, want_grads = outputs_and_grads(ref, params, x)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16 if mode == "autocast-bf16" else torch.float16):
            got, got_grads = outputs_and_grads(ours, params, x)
            want, want_grads = outputs_and_grads(ref, params, x)
    close(got, want, t)
    for n in params:
        close(got_grads[n], want_grads[n], t)


@pytest.mark.parametrize("layer_name, variant, dname", CASES)
def test_no_grad_and_inference_mode_equal_the_merged_plain_layer(layer_name, variant, dname):
    layer, x, transpose = adapted(layer_name, variant, DTYPES[dname])
    params = params_of(layer)
    want = reference(layer, transpose)(params, x)
    t = tol(DTYPES[dname], "eager")
    with torch.no_grad():
        out = layer(x)
    assert not out.requires_grad
    close(out, want, t)
    with torch.inference_mode():
        out = layer(x)
    close(out, want, t)


FUNC_CASES = [pytest.param(layer, variant, id=f"{layer}-{variant}") for layer in LAYERS for variant in VARIANTS]


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("layer_name, variant", FUNC_CASES)
def test_torch_func_transforms_equal_the_merged_plain_layer(layer_name, variant):
    layer, x, transpose = adapted(layer_name, variant, torch.float64)
    params = {n: p.detach().double() for n, p in params_of(layer).items()}
    layer.double()
    ours, ref = adapted_fn(layer), reference(layer, transpose)
    t = 1e-9

    def loss(f):
        return lambda p, x: f(p, x).square().sum()

    names = list(params)
    got = grad(loss(ours))(params, x)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    want = dict(zip(names, torch.autograd.grad(loss(ref)(leaves, x), [leaves[n] for n in names])))
    for n in params:
        close(got[n], want[n], t)
    xs = torch.stack([x, x.flip(0)]) if not x.is_floating_point() else torch.stack([x, -x])
    close(vmap(ours, in_dims=(None, 0))(params, xs), torch.stack([ref(params, xi) for xi in xs]), t)
    first = names[0]
    jac_ours = jacrev(lambda a: ours({**params, first: a}, x))(params[first])
    jac_ref = torch.autograd.functional.jacobian(lambda a: ref({**params, first: a}, x), params[first])
    close(jac_ours, jac_ref, t)
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    if layer_name == "embedding-bag":  # PyTorch has no forward AD for embedding_bag: both refuse alike
        for f in (ours, ref):
            with pytest.raises(NotImplementedError, match="forward AD with _embedding_bag"):
                jvp(lambda p, f=f: f(p, x), (params,), (tangents,))
    else:
        _, tan_ours = jvp(lambda p: ours(p, x), (params,), (tangents,))
        _, tan_ref = jvp(lambda p: ref(p, x), (params,), (tangents,))
        close(tan_ours, tan_ref, t)
    if x.is_floating_point():
        jac_x = vmap(jacrev(lambda x: ours(params, x).sum()))(xs)
        jac_ref = [torch.autograd.functional.jacobian(lambda x: ref(params, x).sum(), xi) for xi in xs]
        close(jac_x, torch.stack(jac_ref), t)
    other = {n: p + 0.25 for n, p in params.items()}
    close(ours(other, x), ref(other, x), t)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("layer_name, variant", FUNC_CASES)
def test_compile_and_export_equal_eager(layer_name, variant):
    torch._dynamo.reset()
    layer, x, transpose = adapted(layer_name, variant, torch.float32)
    params = params_of(layer)
    want, want_grads = outputs_and_grads(reference(layer, transpose), params, x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got, got_grads = outputs_and_grads(lambda p, x: compiled(x), params, x)
    close(got, want, 1e-5)
    for n in params:
        close(got_grads[n], want_grads[n], 1e-5)
    exported = torch.export.export(layer, (x,)).module()
    with torch.no_grad():
        close(exported(x), want, 1e-5)
    torch._dynamo.reset()
