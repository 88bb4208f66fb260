"""The LoRA parametrization: ``W -> W + sum over active adapters of s * (B @ A)``."""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from .dora import magnitude_shape
from .dora import merged as dora_merged
from .inits import WEIGHT_INITS, BufferDict

__all__ = ["LoRA"]

INITS = ("default", "gaussian", "pissa", "olora")  # the last two read W0: see inits.py
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which updates are summed: float32 for half precision, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


class LoRA(nn.Module):
    r"""Parametrize one tensor as ``W + sum_i s_i * view(B_i @ A_i)`` over the active adapters.

    It is registered with :func:`torch.nn.utils.parametrize.register_parametrization` by
    :func:`lora_inject.inject`, and holds every named adapter of that tensor:
    ``lora_A[name]`` of shape ``(r, in)`` and ``lora_B[name]`` of shape ``(out, r)`` (with a
    leading experts dimension for expert weights). ``W`` is never written: the update is
    computed on the fly, so ``W0`` stays bit-identical while LoRA is attached.

    Variants change this parametrization only, so they work for every rule: a DoRA adapter
    (``dora=True``) also holds ``lora_magnitude[name]`` of shape ``(out,)`` (see
    :mod:`lora_inject.dora`); the ``"pissa"``/``"olora"`` inits keep their initial factors
    as buffers ``lora_A0[name]``/``lora_B0[name]`` (see :mod:`lora_inject.inits`).

    ``right_inverse`` is the identity: assigning ``module.weight = X`` sets ``W0`` to ``X``.
    """

    def __init__(
        self, shape: torch.Size, *, transpose: bool = False, experts: bool = False,
        factored: bool = False,
    ) -> None:
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # Plain attributes, set at once: Module.__setattr__ costs ~1 µs a call.
        self.__dict__.update(
            shape=tuple(shape),
            transpose=transpose,
            experts=experts,
            factored=factored,
            config={},  # adapter -> {"r", "alpha", "dropout", "init", "targets"}
            scaling={},  # adapter -> float
            active=[],  # adapter names, in order
            memo=None,  # (input, output) within one forward of the adapted module
            memo_depth=0,
            per_sample=None,  # each sample's adapter name or None, inside lora_inject.per_sample()
            cache=None,  # inside lora_inject.cached(): () or (key, merged weight)
        )

    # -- shapes -----------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        core = self.shape[1:] if self.experts else self.shape
        return core[-1] if self.transpose else core[0]

    @property
    def in_features(self) -> int:
        core = self.shape[1:] if self.experts else self.shape
        return core[0] if self.transpose else math.prod(core[1:])

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    # -- adapters ---------------------------------------------------------------------------
    def add(
        self, name: str, *, r: int, alpha: float, dropout: float = 0.0, init: str = "default",
        dtype: torch.dtype, device: torch.device, targets: str | None = None, rslora: bool = False,
        dora: bool = False,
    ) -> None:
        """Create adapter ``name`` with fresh factors, and make it active.

        The ``"pissa"``/``"olora"`` factors and DoRA's magnitude depend on ``W0``: they are
        set by :func:`lora_inject.inits.init_from_weight` (``inject`` calls it)."""
        lead = (self.shape[0],) if self.experts else ()
        A = torch.empty(*lead, r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(*lead, self.out_features, r, dtype=dtype, device=device)
        init_factors(A, B, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.config[name] = {"r": r, "alpha": alpha, "dropout": dropout, "init": init, "targets": targets,
                             "rslora": rslora, "dora": dora}
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        if init in WEIGHT_INITS:
            self._dict("lora_A0", BufferDict)[name] = torch.zeros_like(A)
            self._dict("lora_B0", BufferDict)[name] = torch.zeros_like(B)
        if dora:
            m = torch.ones(*magnitude_shape(self), dtype=dtype, device=device)
            self._dict("lora_magnitude", nn.ParameterDict)[name] = nn.Parameter(m)
        self.active.append(name)

    def drop(self, name: str) -> None:
        """Delete adapter ``name``."""
        del self.lora_A[name], self.lora_B[name], self.config[name], self.scaling[name]
        for extra in _EXTRAS:
            if name in self._modules.get(extra, ()):
                del self._modules[extra][name]
        if name in self.active:
            self.active.remove(name)

    def _dict(self, attr: str, kind: type[nn.Module]) -> nn.Module:
        if attr not in self._modules:
            self.add_module(attr, kind())
        return self._modules[attr]

    def tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors by attribute: ``lora_A``, ``lora_B``, and ``lora_magnitude``
        (DoRA), ``lora_A0``/``lora_B0`` (frozen, PiSSA/OLoRA) where present. The state-dict key
        of each is ``<this module's prefix>.<attribute>.<name>``."""
        out = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        out.update({e: self._modules[e][name] for e in _EXTRAS if name in self._modules.get(e, ())})
        return out

    def factor_pair(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` such that adapter ``name``'s update is ``s * B @ A`` in the matrix view:
        ``lora_A``/``lora_B``, with the frozen ``A0``/``-B0`` appended along ``r`` when present."""
        A, B = self.lora_A[name], self.lora_B[name]
        if name in self._modules.get("lora_A0", ()):
            A = torch.cat([A, self.lora_A0[name]], dim=-2)  # (.., 2r, in)
            B = torch.cat([B, -self.lora_B0[name]], dim=-1)  # (.., out, 2r)
        return A, B

    def update(self, name: str, dtype: torch.dtype) -> Tensor:
        """Adapter ``name``'s update ``s * B @ A`` in the matrix view ``(.., out, in)``, in ``dtype``."""
        A, B = self.factor_pair(name)
        return torch.matmul(B.to(dtype), A.to(dtype)) * self.scaling[name]  # (.., out, r) @ (.., r, in)

    # -- the update -------------------------------------------------------------------------
    def delta(self, names: list[str] | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Return ``sum_i s_i * view(B_i @ A_i)`` over ``names`` (default: the active ones),
        in ``W``'s shape, computed in ``dtype`` (default: float32, or float64 for float64)."""
        names = self.active if names is None else names
        first = self.lora_A[names[0]] if names else None
        dtype = dtype or compute_dtype(first.dtype if first is not None else torch.float32)
        total = None
        for name in names:
            d = self.update(name, dtype)  # (.., out, in)
            total = d if total is None else total + d
        if total is None:
            lead = (self.shape[0],) if self.experts else ()
            total = torch.zeros(*lead, self.out_features, self.in_features, dtype=dtype)
        if self.transpose:
            total = total.mT  # (.., out, in) -> (.., in, out), the stored layout
        return total.reshape(self.shape)

    def merged(self, W: Tensor, names: list[str] | None = None) -> Tensor:
        """Return ``W + delta(names)``, summed in float32 (or wider) and cast to ``W.dtype``
        (for DoRA adapters, the weight of :mod:`lora_inject.dora`)."""
        names = self.active if names is None else names
        if any(self.config[n].get("dora") for n in names):
            return dora_merged(self, W, names)
        ct = torch.promote_types(compute_dtype(W.dtype), self._factor_dtype())
        return (W.to(ct) + self.delta(names, ct)).to(W.dtype)

    def merge_(self, W: Tensor, names: list[str]) -> None:
        """Add ``delta(names)`` into ``W`` in place: with ``addmm_`` where ``W`` is already in the
        compute dtype, else through ``merged`` (float32 sum, cast back)."""
        ct = torch.promote_types(compute_dtype(W.dtype), self._factor_dtype())
        if W.dtype != ct or not W.is_contiguous() or self._variant(names):
            W.copy_(self.merged(W, names))
            return
        lead = (self.shape[0],) if self.experts else ()
        rows, cols = (self.in_features, self.out_features) if self.transpose else (
            self.out_features, self.in_features)
        M = W.view(*lead, rows, cols)
        for name in names:
            A, B = self.lora_A[name].to(ct), self.lora_B[name].to(ct)
            L, R = (A.mT, B.mT) if self.transpose else (B, A)  # stored update = s * L @ R
            (M.baddbmm_ if self.experts else M.addmm_)(L, R, alpha=self.scaling[name])

    def merge_is_finite(self, W: Tensor, names: list[str]) -> bool:
        """Whether ``merged(W, names)`` is finite, from a cheap bound where it suffices."""
        if W.is_meta:
            return True
        if self._variant(names):
            return bool(torch.isfinite(self.merged(W, names)).all())
        factors = [t for n in names for t in (self.lora_A[n], self.lora_B[n])]
        if not all(bool(torch.isfinite(t).all()) for t in factors):
            return False
        if W.numel():
            lo, hi = W.aminmax()
            bound = max(abs(float(lo)), abs(float(hi)))
            for n in names:
                a, b = (float(t.abs().max()) if t.numel() else 0.0 for t in (self.lora_A[n], self.lora_B[n]))
                bound += abs(self.scaling[n]) * self.config[n]["r"] * a * b
            if bound < torch.finfo(W.dtype).max / 2:  # NaN compares False, and falls through
                return True
        return bool(torch.isfinite(self.merged(W, names)).all())

    def _variant(self, names: list[str]) -> bool:
        """Whether an adapter among ``names`` is DoRA or has frozen initial factors."""
        return any(n in self._modules.get(e, ()) for n in names for e in _EXTRAS)

    def _factor_dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).dtype if len(self.lora_A) else torch.float32

    def forward(self, W: Tensor) -> Tensor:
        if self.per_sample is not None:  # lora_inject.per_sample(): the fast path picks rows
            if not any(n in self.lora_A for n in self.per_sample if n is not None):
                return W
            if not self.factored:
                raise RuntimeError(f"per_sample(): a LoRA of shape {self.shape} is on the merged path, where "
                                   "one weight serves the whole batch; per-sample adapters need the fast path.")
            from .weight import LoraWeight

            return LoraWeight.wrap(W, self)
        if not self.active:
            return W
        if self.cache is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._cached(W)
        if self.factored:
            from .weight import LoraWeight

            return LoraWeight.wrap(W, self)
        if self.memo is not None and self.memo[0] is W:
            return self.memo[1]
        out = self.merged(W)
        if self.memo_depth:
            self.memo = (W, out)
        return out

    def _cached(self, W: Tensor) -> Tensor:
        """Inside :func:`lora_inject.cached`: the merged weight, rebuilt only when ``W``, a factor
        or the active adapters change (their storage or version counter)."""
        tensors = [W, *(t for n in self.active for t in self.tensors(n).values())]
        key = (tuple(self.active), tuple((t.data_ptr(), t._version) for t in tensors),
               tuple(self.scaling[n] for n in self.active))
        if not self.cache or self.cache[0] != key:
            self.cache = (key, self.merged(W))
        return self.cache[1]

    def right_inverse(self, W: Tensor) -> Tensor:
        return W

    def extra_repr(self) -> str:
        items = ", ".join(
            f"{n}: r={c['r']}, alpha={c['alpha']}{'' if n in self.active else ' (inactive)'}"
            for n, c in self.config.items()
        )
        return f"shape={self.shape}, {items}"


_EXTRAS = ("lora_magnitude", "lora_A0", "lora_B0")


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The scaling ``s`` of an update ``s * B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def init_factors(A: Tensor, B: Tensor, init: str) -> None:
    """Initialise ``A`` and ``B`` in place so that ``B @ A == 0``."""
    with torch.no_grad():
        if A.is_meta:
            return  # nothing to fill; initialise after materialising
        if A.numel() == 0 or B.numel() == 0:
            A.zero_(), B.zero_()
            return
        rows = A.reshape(-1, A.shape[-1])  # each expert's A rows share the fan-in `in`
        if init == "default":
            nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(rows, std=1 / A.shape[-2])
        elif init in WEIGHT_INITS:
            A.zero_()  # set from W0 by inits.init_from_weight
        else:  # validated by inject
            raise ValueError(f"inject(): unknown `init` {init!r}; use one of {INITS}.")
        B.zero_()


def check_adapter_name(fn: str, name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{fn}(): `adapter` must be a str, got {type(name).__name__}.")
    if not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"{fn}(): `adapter` must be a Python identifier (it becomes part of state-dict "
            f"keys), got {name!r}. Use letters, digits and '_', such as 'default' or 'task_1'."
        )
    return name
