"""Tied tensors: one tensor stored by several modules, as a language model's input embedding and
its head share ``(vocab, dim)``, adapted once for all of them.

The module that ``inject`` selects first holds the :class:`~lora_inject.LoRA`; every other module
that stores the same tensor (the *users*) gets a :class:`Tied` parametrization that reads that
LoRA's value. So the lookup and the head both read ``W0 + ΔW``, from one set of adapter tensors:
``loras()`` finds the LoRA once, its state dict keys appear once, and the helpers (``activate``,
``disabled``, ``lora_parameters``, ``save_adapter``) see one adapted tensor. ``W0`` stays one
Parameter, so ``remove(merge=True)`` writes the merged weight once and the tie holds after it.

The LoRA's view is the tensor's, not the module's: an ``Embedding`` and a ``Linear`` head see the
same stored ``(vocab, dim)`` tensor and the same stored update, and the ops of the fast path work
in the stored layout (:meth:`~lora_inject._view.View.stored_factors`), so each user runs its own op
on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._chain import find_lora, parametrized, source
from ._hooks import hook, unhook
from ._module_class import disown_class, own_class
from ._selection import named_modules, qualified
from .lora import Bias, LoRA

TIED = "tied"  # on a LoRA's __dict__: the users of its tensor besides its own module, as User records


class Tied(Bias):
    """Parametrize another user of a tensor that a :class:`~lora_inject.LoRA` adapts: it reads that
    LoRA's value. It holds no tensor of its own and is not the LoRA's parent (so no key appears
    twice), and the tensor keeps its key in the state dict, as :class:`~lora_inject.lora.Bias`
    (whose kind of link it is) does."""

    def forward(self, W: Tensor) -> Tensor:
        return self.weight(W)

    def right_inverse(self, value: Tensor) -> Tensor:
        return self.weight.right_inverse(value)

    def extra_repr(self) -> str:
        return f"tied to {self.weight_name}"


@dataclass
class User:
    """Another module that stores the adapted tensor: where, and its parameters' order before."""

    qualname: str
    module: nn.Module
    tensor_name: str
    order: list[str]


def tensor_users(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Map the id of each stored tensor to ``(module path, module, tensor name)`` of every module
    that stores it, in ``named_modules`` order (a parametrized tensor by its first original)."""
    users: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for qualname, module in named_modules(model):
        if isinstance(module, LoRA):
            continue
        names = [n for d in (module._parameters, module._buffers) for n, t in d.items() if t is not None]
        for n in names + [n for n in parametrized(module) if n not in names]:
            users.setdefault(id(source(module, n)), []).append((qualname, module, n))
    return users


def tied_to(module: nn.Module, tensor_name: str) -> LoRA | None:
    """The LoRA that ``module.<tensor_name>`` reads through a :class:`Tied` link, or None."""
    plist = parametrized(module).get(tensor_name)
    link = next((p for p in plist if isinstance(p, Tied)), None) if plist is not None else None
    return None if link is None else link.weight


def others(fn: str, where: str, users: list[tuple[str, nn.Module, str]], module: nn.Module,
           tensor_name: str) -> list[tuple[str, nn.Module, str]]:
    """The users of a tensor besides ``module.<tensor_name>``, each of which can take a link.

    Raises:
        ValueError: if another user has a parametrization of its own on the tensor (``weight_norm``),
            which one link cannot follow.
    """
    rest = [u for u in users if not (u[1] is module and u[2] == tensor_name)]
    for qualname, m, t in rest:
        plist = parametrized(m).get(t)
        if plist is not None and not (len(plist) == 1 and isinstance(plist[0], Tied)):
            raise ValueError(
                f"{fn}(): `{where}` is one tensor shared with `{qualified(qualname, t)}`, which has a "
                f"parametrization of its own ({type(plist[0]).__name__}), so an adapter on the shared tensor "
                "cannot reach it. Remove that parametrization, untie the weights, or leave these modules "
                "out with `exclude=`.")
    return rest


def tie(lora: LoRA, where: str, rest: list[tuple[str, nn.Module, str]]) -> None:
    """Link each of ``rest`` (see :func:`others`) to ``lora``, the LoRA of ``where``; all or nothing."""
    done: list[User] = []
    try:
        for qualname, m, t in rest:
            user = User(qualname, m, t, list(m._parameters))
            parametrize.register_parametrization(m, t, Tied(lora, where))
            done.append(user)
            own_class(m)
            hook(m)
    except BaseException:
        for user in reversed(done):
            _untie(user, source(user.module, user.tensor_name))
        raise
    lora.__dict__.setdefault(TIED, []).extend(done)


def untie(lora: LoRA, stored: Tensor) -> None:
    """Take the links to ``lora`` off its users, each storing ``stored`` again (the tensor that
    ``lora``'s own module stores once it is removed), so the tie holds."""
    for user in reversed(lora.__dict__.pop(TIED, [])):
        _untie(user, stored)


def _untie(user: User, stored: Tensor) -> None:
    m, t = user.module, user.tensor_name
    parametrize.remove_parametrizations(m, t, leave_parametrized=False)
    if t in m._parameters:
        m._parameters[t] = stored
    else:
        m._buffers[t] = stored
    params = m._parameters
    kept = {k: params[k] for k in user.order if k in params}
    kept.update({k: v for k, v in params.items() if k not in kept})
    params.clear()
    params.update(kept)
    if not any(find_lora(m, n) or tied_to(m, n) for n in parametrized(m)):
        unhook(m)
        if parametrize.is_parametrized(m):  # by others, whose class it keeps
            disown_class(m)


def users_of(lora: LoRA) -> list[User]:
    """The other users that ``lora``'s tensor is linked to (see :func:`tie`)."""
    return list(lora.__dict__.get(TIED, ()))
