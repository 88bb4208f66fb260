"""Hypothesis strategies: small random layers of every type that has a default rule, with inputs.

Each strategy draws a :class:`Case`: a fresh float32 layer (the root of its own model), its
inputs, the ``targets`` to inject with, ``r`` and ``alpha``, and the tensors LoRA must adapt,
each with the matrix view the tests use for their own reference (rows, or transposed).
Shapes stay small: channels per group x groups, kernels up to 3, sides up to 8, ``r`` from 1
to the smallest ``min(out, in)`` of the adapted tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_inject as li

__all__ = ["Adapted", "CASES", "Case", "Mixer", "matrix_dims", "r_max", "rnn_tensor_names"]

SIDE = 8
seeds = st.integers(0, 2**31 - 1)


@dataclass(frozen=True)
class Adapted:
    """One tensor that LoRA must adapt: where it is, and how the tests view it as a matrix.

    ``transpose=False``: ``W`` of shape ``(d0, d1, ..)`` is the matrix ``(d0, d1 * ..)``.
    ``transpose=True``: ``W`` of shape ``(in, out)`` is the matrix ``W.T``.
    ``fast``: the rule computes it in factored form.
    """

    module: str
    tensor: str
    transpose: bool = False
    fast: bool = False

    @property
    def key(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass
class Case:
    kind: str
    model: nn.Module
    args: tuple
    kwargs: dict
    targets: str
    adapted: tuple[Adapted, ...]
    r: int = 1
    alpha: float = 1.0
    rules: dict | None = None
    seed: int = 0

    def __repr__(self) -> str:
        shapes = [tuple(a.shape) for a in self.args if isinstance(a, torch.Tensor)]
        return (f"Case({self.kind}: {self.model!r}, inputs {shapes}, kwargs {self.kwargs}, "
                f"targets {self.targets!r}, r={self.r}, alpha={self.alpha}, seed={self.seed})")


def matrix_dims(model: nn.Module, a: Adapted) -> tuple[int, int]:
    """``(out, in)`` of ``a``'s matrix view."""
    shape = getattr(model.get_submodule(a.module), a.tensor).shape
    return (shape[1], shape[0]) if a.transpose else (shape[0], math.prod(shape[1:]))


def r_max(case: Case) -> int:
    """The largest ``r`` that fits every adapted tensor of ``case``."""
    return min(min(matrix_dims(case.model, a)) for a in case.adapted)


def _finish(draw, kind, seed, build, targets, adapted, *, kwargs=None, rules=None) -> Case:
    """Build the layer and inputs under ``seed``, then draw ``r`` and ``alpha`` to fit them."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, args = build()
    r_max = min(min(matrix_dims(model, a)) for a in adapted)
    r = draw(st.integers(1, r_max))
    alpha = draw(st.sampled_from([0.5, 1.0, 2.0, 16.0]))
    return Case(kind, model, tuple(args), kwargs or {}, targets, tuple(adapted), r, alpha, rules, seed)


def _lead(draw, max_dims=2):
    """Leading (batch) dims: none, or up to ``max_dims`` small ones."""
    return tuple(draw(st.lists(st.integers(1, 3), max_size=max_dims)))


@st.composite
def linear(draw):
    fin, fout, bias, lead = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.booleans()), _lead(draw)
    return _finish(draw, "linear", draw(seeds),
                   lambda: (nn.Linear(fin, fout, bias=bias), [torch.randn(*lead, fin)]),
                   "", [Adapted("", "weight", fast=True)])


@st.composite
def bilinear(draw):
    n1, n2, out, n = (draw(st.integers(1, 5)) for _ in range(4))
    bias = draw(st.booleans())
    return _finish(draw, "bilinear", draw(seeds),
                   lambda: (nn.Bilinear(n1, n2, out, bias=bias), [torch.randn(n, n1), torch.randn(n, n2)]),
                   "", [Adapted("", "weight")])


@st.composite
def conv(draw, d: int):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.tuples(*[st.integers(1, 3)] * d))
    dilation, stride = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pads = st.sampled_from(["valid", "same"] if stride == 1 else ["valid"]) | st.integers(0, 2)
    padding = draw(pads)
    least = [max(dilation * (k - 1) + 1, padding + 1 if isinstance(padding, int) else 1) for k in kernel]
    sides = [draw(st.integers(lo, SIDE)) for lo in least]
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    bias = draw(st.booleans())
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
    return _finish(
        draw, f"conv{d}d", draw(seeds),
        lambda: (cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, padding_mode=mode), [torch.randn(*batch, cin, *sides)]),
        "", [Adapted("", "weight", fast=groups == 1)],
    )


@st.composite
def conv_transpose(draw, d: int):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.tuples(*[st.integers(1, 3)] * d))
    dilation, stride = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    sides = [draw(st.integers(1, SIDE)) for _ in range(d)]
    # Keep every output side positive: (side-1)*stride - 2p + dilation*(k-1) + output_padding + 1 >= 1.
    cap = min(((s - 1) * stride + dilation * (k - 1) + output_padding) // 2 for s, k in zip(sides, kernel))
    padding = draw(st.integers(0, min(2, cap)))
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    bias = draw(st.booleans())
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1]
    return _finish(
        draw, f"conv_transpose{d}d", draw(seeds),
        lambda: (cls(cin, cout, kernel, stride=stride, padding=padding, output_padding=output_padding,
                     groups=groups, bias=bias, dilation=dilation), [torch.randn(*batch, cin, *sides)]),
        "", [Adapted("", "weight")],
    )


@st.composite
def embedding(draw):
    num, dim = draw(st.integers(1, 10)), draw(st.integers(1, 8))
    padding_idx = draw(st.none() | st.integers(-num, num - 1))
    scale_grad = draw(st.booleans())
    lead = _lead(draw)
    return _finish(
        draw, "embedding", draw(seeds),
        lambda: (nn.Embedding(num, dim, padding_idx=padding_idx, scale_grad_by_freq=scale_grad),
                 [torch.randint(0, num, lead)]),
        "", [Adapted("", "weight", transpose=True, fast=not scale_grad)],
    )


@st.composite
def embedding_bag(draw):
    num, dim = draw(st.integers(1, 10)), draw(st.integers(1, 8))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    padding_idx = draw(st.none() | st.integers(0, num - 1))
    flat = draw(st.booleans())  # 1-D input with offsets, or 2-D input (bags, length)
    weighted = mode == "sum" and draw(st.booleans())
    scale_grad = mode != "max" and draw(st.booleans())  # max mode refuses it
    if flat:
        n = draw(st.integers(0, 8))
        starts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
        include_last = draw(st.booleans())
        offsets = [0, *starts] + ([n] if include_last else [])
        shape = (n,)
    else:
        include_last, offsets = False, None
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))

    def build():
        model = nn.EmbeddingBag(num, dim, mode=mode, padding_idx=padding_idx, scale_grad_by_freq=scale_grad,
                                include_last_offset=include_last)
        x = torch.randint(0, num, shape)
        args = [x, None if offsets is None else torch.tensor(offsets, dtype=torch.long)]
        if weighted:
            args.append(torch.randn(shape))
        return model, args

    return _finish(draw, f"embedding_bag_{mode}", draw(seeds), build, "",
                   [Adapted("", "weight", transpose=True, fast=mode != "max" and not scale_grad)])


@st.composite
def multihead_attention(draw, *, target: str | None = None, self_attention: bool = False):
    """``self_attention``: batch-first, with one tensor as query, key and value, as PyTorch's
    native inference path wants."""
    heads, head_dim = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kdim, vdim = draw(st.none() | st.integers(1, 5)), draw(st.none() | st.integers(1, 5))
    bias, bias_kv, zero_attn, batch_first = (draw(st.booleans()) for _ in range(4))
    if self_attention:
        heads, kdim, vdim, bias, bias_kv, zero_attn, batch_first = 2, None, None, True, False, False, True
    embed = heads * head_dim
    L, S, N = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.sampled_from([None, 1, 2]))
    N = (N or 1) if self_attention else N  # batched
    kwargs = {"need_weights": draw(st.booleans()), "average_attn_weights": draw(st.booleans())}
    target = target or draw(st.sampled_from(["all", "own", "out_proj"]))
    packed = kdim in (None, embed) and vdim in (None, embed)
    own = [Adapted("", "in_proj_weight")] if packed else [
        Adapted("", f"{p}_proj_weight") for p in "qkv"]
    out = [Adapted("out_proj", "weight", fast=True)]
    adapted = {"all": own + out, "own": own, "out_proj": out}[target]
    targets = {"all": "", "own": "^$", "out_proj": "out_proj"}[target]

    def seq(n, width):
        if N is None:
            return torch.randn(n, width)
        return torch.randn(N, n, width) if batch_first else torch.randn(n, N, width)

    def build():
        model = nn.MultiheadAttention(embed, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                      kdim=kdim, vdim=vdim, batch_first=batch_first)
        if self_attention:
            x = seq(L, embed)
            return model, [x, x, x]
        return model, [seq(L, embed), seq(S, kdim or embed), seq(S, vdim or embed)]

    return _finish(draw, f"mha_{target}", draw(seeds), build, targets, adapted, kwargs=kwargs)


def rnn_tensor_names(num_layers: int, bidirectional: bool) -> list[str]:
    """Every ``weight_ih_l*`` and ``weight_hh_l*``, the ``_reverse`` ones included."""
    suffixes = ["", "_reverse"] if bidirectional else [""]
    return [f"weight_{g}_l{k}{s}" for k in range(num_layers) for s in suffixes for g in ("ih", "hh")]


@st.composite
def rnn(draw, *, num_layers: int | None = None, bidirectional: bool | None = None):
    cls = draw(st.sampled_from([nn.RNN, nn.LSTM, nn.GRU]))
    size, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    num_layers = num_layers or draw(st.integers(1, 2))
    bidirectional = draw(st.booleans()) if bidirectional is None else bidirectional
    bias, batch_first = draw(st.booleans()), draw(st.booleans())
    extra = {}
    if cls is nn.RNN:
        extra["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if cls is nn.LSTM:
        extra["proj_size"] = draw(st.integers(0, hidden - 1))
    L, N = draw(st.integers(1, 4)), draw(st.sampled_from([None, 1, 2]))

    def build():
        model = cls(size, hidden, num_layers=num_layers, bias=bias, batch_first=batch_first,
                    bidirectional=bidirectional, **extra)
        if N is None:
            x = torch.randn(L, size)
        else:
            x = torch.randn(N, L, size) if batch_first else torch.randn(L, N, size)
        return model, [x]

    adapted = [Adapted("", n) for n in rnn_tensor_names(num_layers, bidirectional)]
    return _finish(draw, cls.__name__.lower(), draw(seeds), build, "", adapted)


@st.composite
def rnn_cell(draw):
    cls = draw(st.sampled_from([nn.RNNCell, nn.LSTMCell, nn.GRUCell]))
    size, hidden, bias, N = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.booleans()), draw(
        st.sampled_from([None, 1, 3]))
    extra = {"nonlinearity": draw(st.sampled_from(["tanh", "relu"]))} if cls is nn.RNNCell else {}

    def build():
        return cls(size, hidden, bias=bias, **extra), [torch.randn(size) if N is None else torch.randn(N, size)]

    return _finish(draw, cls.__name__.lower(), draw(seeds), build, "",
                   [Adapted("", "weight_ih"), Adapted("", "weight_hh")])


@st.composite
def hf_conv1d(draw):
    nx, nf, lead = draw(st.integers(1, 8)), draw(st.integers(1, 8)), _lead(draw)
    return _finish(draw, "hf_conv1d", draw(seeds),
                   lambda: (Conv1D(nf, nx), [torch.randn(*lead, nx)]),
                   "", [Adapted("", "weight", transpose=True, fast=True)])


class Mixer(nn.Module):
    """A user's own layer: ``y[.., o] = sum_ab x[.., a, b] * kernel[o, a, b] + shift[o]``."""

    def __init__(self, out: int, a: int, b: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(out, a, b) / math.sqrt(a * b))
        self.register_buffer("shift", torch.randn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ab,oab->...o", x, self.kernel) + self.shift


MIXER_RULE = li.Rule(("kernel",))


@st.composite
def mixer(draw):
    out, a, b, lead = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), _lead(draw)
    return _finish(draw, "user_mixer", draw(seeds),
                   lambda: (Mixer(out, a, b), [torch.randn(*lead, a, b)]),
                   "", [Adapted("", "kernel")], rules={**li.default_rules(), Mixer: MIXER_RULE})


CASES = {
    "linear": linear(),
    "bilinear": bilinear(),
    "conv1d": conv(1),
    "conv2d": conv(2),
    "conv3d": conv(3),
    "conv_transpose1d": conv_transpose(1),
    "conv_transpose2d": conv_transpose(2),
    "conv_transpose3d": conv_transpose(3),
    "embedding": embedding(),
    "embedding_bag": embedding_bag(),
    "multihead_attention": multihead_attention(),
    "rnn": rnn(),
    "rnn_cell": rnn_cell(),
    "hf_conv1d": hf_conv1d(),
    "user_type": mixer(),
}


# The table of cases for pytest.mark.parametrize, and a quarter of the profile's examples per
# test (6 under "ci"); a bigger profile searches deeper.
KINDS = [pytest.param(kind, id=kind) for kind in CASES]
FAST = settings(max_examples=max(2, settings.default.max_examples // 4))
