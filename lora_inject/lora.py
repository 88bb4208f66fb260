"""The LoRA parametrization: ``W -> W + sum over active adapters of s * (B @ A)``."""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

__all__ = ["LoRA"]

INITS = ("default", "gaussian")
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
    ) -> None:
        """Create adapter ``name`` with fresh factors, and make it active."""
        lead = (self.shape[0],) if self.experts else ()
        A = torch.empty(*lead, r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(*lead, self.out_features, r, dtype=dtype, device=device)
        init_factors(A, B, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.config[name] = {"r": r, "alpha": alpha, "dropout": dropout, "init": init, "targets": targets,
                             "rslora": rslora}
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        self.active.append(name)

    def drop(self, name: str) -> None:
        """Delete adapter ``name``."""
        del self.lora_A[name], self.lora_B[name], self.config[name], self.scaling[name]
        if name in self.active:
            self.active.remove(name)

    # -- the update -------------------------------------------------------------------------
    def delta(self, names: list[str] | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Return ``sum_i s_i * view(B_i @ A_i)`` over ``names`` (default: the active ones),
        in ``W``'s shape, computed in ``dtype`` (default: float32, or float64 for float64)."""
        names = self.active if names is None else names
        first = self.lora_A[names[0]] if names else None
        dtype = dtype or compute_dtype(first.dtype if first is not None else torch.float32)
        total = None
        for name in names:
            A = self.lora_A[name].to(dtype)
            B = self.lora_B[name].to(dtype)
            d = torch.matmul(B, A) * self.scaling[name]  # (.., out, r) @ (.., r, in) -> (.., out, in)
            total = d if total is None else total + d
        if total is None:
            lead = (self.shape[0],) if self.experts else ()
            total = torch.zeros(*lead, self.out_features, self.in_features, dtype=dtype)
        if self.transpose:
            total = total.mT  # (.., out, in) -> (.., in, out), the stored layout
        return total.reshape(self.shape)

    def merged(self, W: Tensor, names: list[str] | None = None) -> Tensor:
        """Return ``W + delta(names)``, summed in float32 (or wider) and cast to ``W.dtype``."""
        ct = torch.promote_types(compute_dtype(W.dtype), self._factor_dtype())
        return (W.to(ct) + self.delta(names, ct)).to(W.dtype)

    def merge_(self, W: Tensor, names: list[str]) -> None:
        """Add ``delta(names)`` into ``W`` in place: with ``addmm_`` where ``W`` is already in the
        compute dtype, else through ``merged`` (float32 sum, cast back)."""
        ct = torch.promote_types(compute_dtype(W.dtype), self._factor_dtype())
        if W.dtype != ct or not W.is_contiguous():
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

    def _factor_dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).dtype if len(self.lora_A) else torch.float32

    def forward(self, W: Tensor) -> Tensor:
        if not self.active:
            return W
        if self.factored:
            from .weight import LoraWeight

            return LoraWeight.wrap(W, self)
        if self.memo is not None and self.memo[0] is W:
            return self.memo[1]
        out = self.merged(W)
        if self.memo_depth:
            self.memo = (W, out)
        return out

    def right_inverse(self, W: Tensor) -> Tensor:
        return W

    def extra_repr(self) -> str:
        items = ", ".join(
            f"{n}: r={c['r']}, alpha={c['alpha']}{'' if n in self.active else ' (inactive)'}"
            for n, c in self.config.items()
        )
        return f"shape={self.shape}, {items}"


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
