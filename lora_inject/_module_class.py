"""The class of its own that an adapted module gets, per copy: a deepcopy that gives the copy its
own class, assignments to the adapted tensor that choose which tensor ``W0`` is (never write it),
the forward of a layer whose weight only it can read (bitsandbytes), and refusals to pickle and
to script that say what to do."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize as _parametrize
from torch.nn.utils._named_member_accessor import swap_tensor
from torch.nn.utils.parametrize import type_before_parametrizations

from . import _quant as quant
from ._factored import FactoredWeight
from ._ops import beside
from .lora import Bias, LoRA
from .rule import type_name


def own_class(module: nn.Module) -> None:
    """Give the parametrized class of ``module`` what an adapted module needs, once: a deepcopy
    that gives the copy a class of its own, and refusals to pickle and to script that say what
    to do. What it replaces is kept, so that :func:`disown_class` puts it back.

    parametrize keeps a parametrized module's properties on a class made for that one module
    and edits it in place, but its deepcopy shares that class with the copy: removing LoRA
    from the copy would then take the property off the original too. This holds whether the
    class was made for our parametrization or for one registered before it (``orthogonal``).
    """
    cls = type(module)
    if "_lora_inject_saved" in vars(cls):
        return
    base = cls.__deepcopy__

    def __deepcopy__(self, memo):
        if not torch._C._are_functorch_transforms_active():
            # An RNN's `_flat_weights` may hold weights a torch.func transform made, wrappers that
            # outlive it and cannot be copied: the copy reads its weights again at its first forward.
            for w in self.__dict__.get("_flat_weights") or ():
                if isinstance(w, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(w):
                    memo.setdefault(id(w), None)
        replica = base(self, memo)
        if type(replica) is type(self):
            own = type(self)
            body = {k: v for k, v in vars(own).items() if k not in ("__dict__", "__weakref__")}
            replica.__class__ = type(own.__name__, own.__bases__, body)
        return replica

    setattr_ = cls.__setattr__

    def __setattr__(self, name, value):
        # nn.Module registers an nn.Parameter as a new parameter, which the parametrized tensor's
        # property forbids (KeyError): it goes to the property's setter, as a plain tensor does.
        if isinstance(value, nn.Parameter) and name in self.__dict__.get("_modules", {}).get(
                "parametrizations", ()) and isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr_(self, name, value)

    ours = {"__deepcopy__": __deepcopy__, "__getstate__": refuse_pickle, "__prepare_scriptable__": refuse_script,
            "__setattr__": __setattr__}
    cls._lora_inject_saved = {k: vars(cls).get(k) for k in ours}
    for k, v in ours.items():
        setattr(cls, k, v)


def own_setter(module: nn.Module, tensor_name: str) -> None:
    """Make assigning ``module.<tensor_name> = value`` choose which tensor ``W0`` is, never write it.

    parametrize's setter writes the result of ``right_inverse`` into the original with ``set_``,
    which rebinds the storage of the very ``W0`` that every value handed out before holds: once
    ``functional_call`` has swapped a tensor in, nothing could restore ``W0`` exactly. Where LoRA is
    the tensor's only parametrization, this setter puts the tensor that ``LoRA.right_inverse``
    gives in the original's place instead: a plain tensor becomes ``W0`` (as loading it under the
    state dict's key does), and a value LoRA handed out puts back the ``W0`` it was computed from,
    the same object, bit for bit. Elsewhere, parametrize's setter runs. :func:`own_class` must come
    first; :func:`disown_class` undoes it.

    ``functional_call`` (``torch.nn.utils.stateless``) swaps tensors in and out by name: it reads
    the attribute to put it back on exit, and on exit writes what it reads into the caller's dict.
    Those reads deal in the state dict's tensors, so where torch's swap reads the attribute it gets
    the stored ``W0`` itself, and a tensor it swaps in is stored as given: the caller's dict keeps
    its own tensors, the very objects, and the model gets its ``W0`` back."""
    cls = type(module)
    saved = cls._lora_inject_saved
    prop = vars(cls)[tensor_name]
    if getattr(prop.fget, "_lora_inject", False):
        return
    saved[tensor_name] = prop  # parametrize's: a bias unlinked and linked again has a new one

    def only_ours(self):
        plist = self.parametrizations[tensor_name]
        return plist if len(plist) == 1 and isinstance(plist[0], (LoRA, Bias)) and plist.is_tensor else None

    def read(self) -> Tensor:
        if torch.compiler.is_compiling():
            return prop.fget(self)
        if sys._getframe(1).f_code is _SWAP and (plist := only_ours(self)) is not None:
            return plist.original  # functional_call's swap: the state dict's tensor, W0 (or the bias)
        plist = self._modules["parametrizations"]._modules[tensor_name]
        lora = plist._modules.get("0")
        if len(plist._modules) == 1 and isinstance(lora, LoRA) and plist.is_tensor and _plain_call(plist, lora):
            # What parametrize's getter and the two module calls come to, without their Python frames.
            W = plist._parameters.get("original")
            return lora.forward(plist._buffers["original"] if W is None else W)
        return prop.fget(self)

    def assign(self, value: Tensor) -> None:
        plist = only_ours(self)
        if plist is None:
            prop.fset(self, value)
            return
        plist[0].__dict__["made"] = None  # a kept weight holds the W0 that is being replaced
        old = plist.original
        with torch.no_grad():
            new = plist[0].right_inverse(value)
        if new is old:
            return
        if new.dtype != old.dtype:
            what = "base weight W0" if isinstance(plist[0], LoRA) else "stored tensor"
            raise ValueError(
                f"lora_inject: assigning {type_name(self)}.{tensor_name}: its {what} is {old.dtype}, "
                f"got a tensor of {new.dtype}. Cast it first, e.g. `value.to({old.dtype})`.")
        swapped = _swapping()  # functional_call stores what it is given, as for a plain module's parameter
        if type(new) is Tensor and new.grad_fn is None and not torch._C._are_functorch_transforms_active() \
                and not swapped:
            new = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        (plist._parameters if "original" in plist._parameters else plist._buffers)["original"] = new

    read._lora_inject = True
    setattr(cls, tensor_name, property(read, assign))


_SWAP = swap_tensor.__code__  # torch.nn.utils.stateless swaps a module's tensors by name with it


def _swapping() -> bool:
    """Whether the attribute assignment under way comes from torch's ``swap_tensor``: a setter is
    called from ``Module.__setattr__``, with the class's own ``__setattr__`` (RNNs', ours) between."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code is _SWAP:
            return True
        frame = frame.f_back
    return False


def own_forward(module: nn.Module, tensor_name: str) -> None:
    """For a weight that only the module's own forward can read (bitsandbytes' quantized
    ``Linear``: it reads the weight's quantization state): run that forward on the stored weight,
    and add LoRA's low-rank branch to its output. That is exact for a layer linear in its weight,
    ``x @ W.T + b``. :func:`own_class` must come first; :func:`disown_class` undoes both."""
    cls = type(module)
    if "forward" in cls._lora_inject_saved:
        return
    cls._lora_inject_saved["forward"] = vars(cls).get("forward")

    def forward(self, input, *args, **kwargs):
        weight = getattr(self, tensor_name)  # LoRA's value: factored while an adapter is active
        original = self.parametrizations[tensor_name].original
        if type(weight) is not FactoredWeight and quant.scheme(weight) is None:
            # Merged (a kind other than LoRA is active): the dense adapted weight, and the layer's
            # own math, x @ W.T + b, on it.
            bias = self.bias
            return F.linear(input, weight.to(input.dtype), None if bias is None else bias.to(input.dtype))
        out = type_before_parametrizations(self).forward(_Stored(self, tensor_name, original), input, *args, **kwargs)
        quant.adopt(self, original)  # what that forward moved to the module goes back on the weight
        if type(weight) is not FactoredWeight:
            return out
        return beside(input, weight, out, self.bias)

    cls.forward = forward


_GLOBAL_HOOKS = (_module._global_backward_pre_hooks, _module._global_backward_hooks, _module._global_forward_hooks,
                 _module._global_forward_pre_hooks)


def _plain_call(*modules: nn.Module) -> bool:
    """Whether calling each of ``modules`` is its ``forward`` and nothing more, and parametrize's
    getter computes the tensor afresh: no hooks (theirs or global), no JIT tracing, no
    ``parametrize.cached()``."""
    if _parametrize._cache_enabled or torch._C._get_tracing_state() is not None or any(_GLOBAL_HOOKS):
        return False
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
    return True


class _Stored:
    """``module`` as its own forward sees it, with ``name`` reading the stored tensor."""

    __slots__ = ("_module", "_name", "_tensor")

    def __init__(self, module: nn.Module, name: str, tensor: Tensor) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_tensor", tensor)

    def __getattr__(self, name: str):
        return self._tensor if name == self._name else getattr(self._module, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._module, name, value)


def disown_class(module: nn.Module) -> None:
    """Undo :func:`own_class`, for a module that stays parametrized by others."""
    cls = type(module)
    saved = vars(cls).get("_lora_inject_saved")
    if saved is None:
        return
    for k, v in saved.items():
        if isinstance(v, property) and k not in vars(cls):  # the tensor's parametrizations are gone
            continue
        if v is None:
            delattr(cls, k)
        else:
            setattr(cls, k, v)
    del cls._lora_inject_saved


def refuse_pickle(self: nn.Module):
    """Replace parametrize's refusal to pickle (``torch.save(model)``) with one that says what to do."""
    raise RuntimeError(
        f"torch.save(model) and pickle cannot save the parametrized {type_name(self)} module: "
        "PyTorch saves parametrized modules only through state_dict(). Save the adapter with "
        "lora_inject.save_adapter(model, path) or torch.save(lora_inject.lora_state_dict(model), path); "
        "or take LoRA out with lora_inject.remove(model) (merging it) to get a plain model that pickles."
    )


def refuse_script(self: nn.Module):
    """Refuse ``torch.jit.script`` of an adapted module with a message that says what to do."""
    raise RuntimeError(
        f"torch.jit.script cannot compile the adapted {type_name(self)} module: its weight is a LoRA "
        "parametrization (lora_inject). Merge the adapters first with lora_inject.remove(model), which "
        "gives a plain model that scripts; or use torch.export.export or torch.compile, which work on "
        "the adapted model.")
