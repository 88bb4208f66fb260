"""The adapted weight against PyTorch's OpInfo database, as PyTorch and torchao test their tensor
subclasses: for every op whose samples take a float matrix first, the op on a FactoredWeight equals
the op on the merged dense weight, in value and in the gradients to the factors A and B; or the op
is on `lora_inject._factored.REFUSED` and raises an error that names lora_inject.

Which ops are out of scope is decided by category, never by name:

* in-place ops (OpInfo names ending in ``_``): they would write a value that is computed, not stored;
* ops none of whose first 30 samples has a 2-D float32 strided tensor as its first input;
* samples on which the dense op itself raises (a value the sample needs, such as a symmetric
  positive-definite matrix, is not kept exactly by W0 + dW): the next sample is tried;
* ops whose dense result differs between two calls on the same input under the same seed
  (uninitialised outputs such as ``empty_like``): only their shape and dtype are compared.

Random ops (dropout, bernoulli...) are compared for real: both calls run under the same seed.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten

from lora_inject._factored import REFUSED, FactoredWeight, Term, merge
from lora_inject._view import View

pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

SCALING = 0.5


def _first_matrix_samples(op):
    for i, sample in enumerate(op.sample_inputs("cpu", torch.float32, requires_grad=op.supports_autograd)):
        if i >= 30:
            return
        x = sample.input
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == torch.float32 and x.numel() \
                and x.layout == torch.strided:
            yield sample


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN matching NaN."""
    try:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    except AssertionError:
        return False
    return True


def _call(op, weight, sample):
    torch.manual_seed(1)
    return op(weight, *sample.args, **sample.kwargs)


def _compare(op, sample) -> str:
    """'pass', 'refused', 'skip' (the dense op raises on it), or an AssertionError."""
    m, n = sample.input.shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, n, generator=g).requires_grad_(op.supports_autograd)
    B = torch.randn(m, 2, generator=g).requires_grad_(op.supports_autograd)
    with torch.no_grad():  # W0 + s B A is the sample's own matrix, up to rounding
        w0 = sample.input.detach() - SCALING * B @ A
    terms, view = [Term(A, B, SCALING)], View((m, n))
    dense = merge(w0, terms, view)
    try:
        want = _call(op, dense, sample)
    except Exception:
        return "skip"
    try:
        got = _call(op, FactoredWeight(w0, terms, view), sample)
    except Exception as e:
        assert op.name in dict(REFUSED) and "lora_inject" in str(e), f"{op.name} raised: {e}"
        return "refused"
    assert op.name not in dict(REFUSED), f"{op.name} is on the refusal list but ran"
    got, want = tree_flatten(got)[0], tree_flatten(want)[0]
    assert len(got) == len(want), op.name
    again = tree_flatten(_call(op, dense, sample))[0]
    deterministic = all(not isinstance(w, torch.Tensor) or _same(w, a) for w, a in zip(want, again))
    for a, b in zip(got, want):
        if not isinstance(b, torch.Tensor):
            assert a == b, op.name
        elif not deterministic:
            assert (a.shape, a.dtype) == (b.shape, b.dtype), op.name
        else:
            assert type(a) is torch.Tensor, f"{op.name} returned a {type(a).__name__}"
            torch.testing.assert_close(a, b, equal_nan=True, msg=lambda s: f"{op.name}: {s}")
    pairs = [(a, b) for a, b in zip(got, want) if isinstance(b, torch.Tensor) and b.requires_grad
             and b.is_floating_point() and b.layout == torch.strided]
    if op.supports_autograd and pairs and deterministic:
        cot = [torch.randn_like(b) for _, b in pairs]
        expected = torch.autograd.grad([b for _, b in pairs], [A, B], cot, allow_unused=True)
        actual = torch.autograd.grad([a for a, _ in pairs], [A, B], cot, allow_unused=True)
        for x, y, t in zip(actual, expected, (A, B)):
            x = torch.zeros_like(t) if x is None else x
            y = torch.zeros_like(t) if y is None else y
            torch.testing.assert_close(x, y, equal_nan=True, msg=lambda s: f"{op.name} grad: {s}")
    return "pass"


@pytest.mark.slow
def test_every_op_on_a_float_matrix_equals_the_op_on_the_merged_weight_or_is_refused():
    counts, failures = collections.Counter(), []
    with warnings.catch_warnings():  # the database's samples warn (beta sparse layouts, deprecations)
        warnings.simplefilter("ignore")
        _run_all(counts, failures)
    print(dict(counts))
    assert not failures, failures
    assert counts["pass"] >= 400  # the database's float-matrix ops, all of them checked


def _run_all(counts, failures):
    for op in op_db:
        if op.name.endswith("_"):
            counts["in-place (out of scope)"] += 1
            continue
        outcome = "no float-matrix sample (out of scope)"
        for sample in _first_matrix_samples(op):
            try:
                outcome = _compare(op, sample)
            except Exception as e:  # AssertionError: a wrong result; anything else: a broken comparison
                failures.append(f"{op.name}: {str(e).splitlines()[0]}")
                outcome = "failed"
            if outcome != "skip":
                break
        counts[outcome] += 1
