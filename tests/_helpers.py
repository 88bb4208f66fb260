"""Helpers the test files share: random adapter tensors (LoRA's factors, or any kind's), a LoRA
update as a tensor, what "the model is unchanged" means, and running a case of ``strategies.py``
in a dtype.

A plain module rather than fixtures: hypothesis tests and state machines use these too, where a
function-scoped fixture cannot reach.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

import lora_inject as li


def randomize(model: nn.Module, adapter: str | None = None, seed: int | None = None, *, std: float = 0.3,
              dtype: torch.dtype | None = None, magnitude: bool = False, every: bool = False) -> None:
    """Give the LoRA factors of ``model`` random values, so that their update is not trivial.

    Without ``seed``: every adapter's factors, from torch's global generator (which the autouse
    ``seed`` fixture seeds), ``normal_(0, std)`` on each module's A factors, then its B factors, in
    :func:`lora_inject.named_loras` order; with ``every``, ``normal_(0, std)`` on every tensor
    :func:`lora_inject.lora_parameters` yields instead (DoRA's magnitudes and the tensors of the
    other kinds too), in its order.

    With ``seed``: only ``adapter``'s factors, from a generator of their own seeded with ``seed``,
    in the order of the adapted tensors' names, each ``std * randn`` drawn in ``dtype`` (default:
    the factor's own); with ``magnitude``, also DoRA's magnitude times ``1 + std * randn``.
    """
    with torch.no_grad():
        if every:
            for p in li.lora_parameters(model):
                p.normal_(0, std)
            return
        if seed is None:
            for _, lora in li.named_loras(model):
                for p in [*lora.lora_A.values(), *lora.lora_B.values()]:
                    p.normal_(0, std)
            return
        gen = torch.Generator().manual_seed(seed)
        for _, lora in sorted(li.named_loras(model), key=lambda kv: kv[0]):
            for t in (lora.lora_A[adapter], lora.lora_B[adapter]):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype or t.dtype) * std)
            if magnitude:
                m = lora.lora_magnitude[adapter]
                m.mul_(1 + std * torch.randn(m.shape, generator=gen, dtype=m.dtype))


def delta(lora: li.LoRA, dtype: torch.dtype = torch.float32) -> Tensor:
    """The update ``sum_i s_i * B_i @ A_i`` of ``lora``'s active (plain LoRA) adapters, in the
    adapted tensor's stored shape, computed in ``dtype``."""
    total = sum(lora.adapter(n).scaling * (lora.lora_B[n].to(dtype) @ lora.lora_A[n].to(dtype))
                for n in lora.active)
    return lora.view.stored(total)


def noise(t: Tensor, gen: torch.Generator, name: str) -> Tensor:
    """A random value for the adapter tensor ``name`` (of any kind) like ``t``, from ``gen``: IA³'s
    scales ``ia3_l`` near 1, OFT's ``oft_R`` small (``0.1 n``), every other ``0.3 n``; ``n`` is drawn in
    float64, so that one seed gives the same values in every dtype and to peft's tensors too."""
    n = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
    return 1 + 0.3 * n if name == "ia3_l" else (0.1 if name == "oft_R" else 0.3) * n


def randomize_kind(model: nn.Module, adapter: str, seed: int) -> None:
    """Give every trained tensor of ``adapter`` (of any kind) a :func:`noise` value, from a
    generator seeded with ``seed``, in the order of the adapted tensors' names, then of the
    tensors' own, so that its update is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lora in sorted(li.named_loras(model), key=lambda kv: kv[0]):
            for name, t in sorted(lora.tensors(adapter).items()):
                if isinstance(t, nn.Parameter):
                    t.copy_(noise(t, gen, name))


def snapshot(model: nn.Module) -> dict:
    """Everything that "the model is unchanged" covers, held by reference where identity matters.

    ``state``: a copy of each state-dict entry; ``classes``: each module's class; ``params``: each
    Parameter object (shared ones under every name); ``order``: each module's own Parameter names in
    order; ``hooks``: each module's forward, forward-pre and load-state-dict-pre hooks; ``loras``:
    each adapted tensor's adapters, active adapters and scalings.
    """
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": {n: type(m) for n, m in model.named_modules(remove_duplicate=False)},
        "params": dict(model.named_parameters(remove_duplicate=False)),
        "order": [(n, list(m._parameters)) for n, m in model.named_modules()],
        "hooks": [(n, list(m._forward_hooks), list(m._forward_pre_hooks), list(m._load_state_dict_pre_hooks))
                  for n, m in model.named_modules()],
        "loras": [(n, list(lora.adapters), list(lora.active), dict(lora.scaling)) for n, lora in li.named_loras(model)],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Assert that ``model`` is as :func:`snapshot` saw it in ``before``: the same state-dict keys in
    the same order with bit-identical values of the same dtype (NaN where NaN was), the same module
    classes, the very same Parameter objects in the same order, the same hooks and the same adapters."""
    after = snapshot(model)
    assert list(after["state"]) == list(before["state"])
    for k, v in after["state"].items():
        torch.testing.assert_close(v, before["state"][k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert list(after["classes"]) == list(before["classes"])
    assert all(after["classes"][n] is c for n, c in before["classes"].items())
    assert list(after["params"]) == list(before["params"])
    assert all(after["params"][n] is p for n, p in before["params"].items())
    for key in ("order", "hooks", "loras"):
        assert after[key] == before[key], key


def cast(tree, dtype: torch.dtype):
    """Cast the floating tensors of ``tree``, keeping one tensor passed twice one tensor."""
    done: dict[int, Tensor] = {}

    def one(t):
        if not (isinstance(t, Tensor) and t.is_floating_point()):
            return t
        return done.setdefault(id(t), t.to(dtype))

    return tree_map(one, tree)


def run(model: nn.Module, case, dtype: torch.dtype = torch.float32, params=None) -> list[Tensor]:
    """The output tensors of ``model`` on the inputs of ``case`` (a ``strategies.Case``) cast to
    ``dtype``; through ``functional_call`` with ``params`` where given."""
    args, kwargs = cast((case.args, case.kwargs), dtype)
    out = model(*args, **kwargs) if params is None else functional_call(model, params, args, kwargs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
