"""Rules: which tensors of a module type get LoRA, and how each is seen as an (out x in) matrix."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Rule", "default_rules", "register_rule"]

RuleKey = type | str


@dataclass(frozen=True)
class Rule:
    r"""Say which tensors of a module type get LoRA, and how each one is viewed as a matrix.

    A tensor ``W`` is viewed as an ``(out, in)`` matrix so that LoRA's factors are
    ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)``, and
    ``W = W0 + (alpha / r) * (B @ A)`` seen back in ``W``'s own shape.

    * By default ``W`` of shape ``(d0, d1, ..., dk)`` is seen as ``(d0, d1 * ... * dk)``:
      the rows are the first dimension. This fits ``Linear`` ``(out, in)``, ``Conv``
      ``(out, in / groups, *kernel)``, ``Bilinear`` ``(out, in1, in2)`` and the stacked gate
      weights of RNNs. ``ConvTranspose`` weights are ``(in, out / groups, *kernel)``, so there
      the rows are the input channels.
    * ``transpose=True`` is for 2-D weights stored as ``(in, out)``, such as transformers'
      ``Conv1D``; ``Embedding`` uses it too, as peft does, so that ``A`` is
      ``(r, num_embeddings)`` and ``B`` is ``(embedding_dim, r)``.
    * ``experts=True`` is for weights with a leading experts dimension ``(E, ...)``: each
      expert gets its own factors, ``A`` of shape ``(E, r, in)`` and ``B`` of shape
      ``(E, out, r)``.

    Args:
        tensors (tuple of str): the names of the tensors to adapt. Each entry is a regular
            expression that must *fully* match at least one parameter or buffer of the module,
            such as ``"weight"`` or ``r"weight_(ih|hh)_l\d+(_reverse)?"``.
        transpose (bool): the tensor is stored as ``(in, out)``. Default: ``False``.
        experts (bool): the tensor has a leading experts dimension. Default: ``False``.
        factored (bool or callable): whether the module's forward reaches the weight only
            through an op that the fast path computes in factored form
            (``F.linear``, ``torch.addmm``, ``F.embedding``, ``F.embedding_bag``, ``F.conv*``).
            A callable gets the module and decides per instance. Only factored tensors accept
            ``dropout``. Default: ``False``.
        bias (callable or None): ``bias(tensor_name) -> str or None``, the name of the bias that
            is added to the output units of the tensor's matrix view (``"weight"`` ->
            ``"bias"``), or None where there is none (an ``Embedding``; a ``ConvTranspose``,
            whose rows are its inputs). A kind that changes the bias with the weight (IA³) reads
            it; ``None`` (the rule does not say) refuses such a kind on a module that has a
            ``bias``. Default: ``None``.

    Example::

        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gain = nn.Parameter(torch.ones(4, 4))
        ...     def forward(self, x):
        ...         return x @ self.gain
        >>> register_rule(Scale, Rule(("gain",), transpose=True))
    """

    tensors: tuple[str, ...]
    transpose: bool = False
    experts: bool = False
    factored: bool | Callable[[nn.Module], bool] = False
    bias: Callable[[str], str | None] | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.tensors, str) or not all(isinstance(t, str) for t in self.tensors):
            raise TypeError(
                f"Rule(): `tensors` must be a tuple of str, got {self.tensors!r}. "
                'Write Rule(("weight",)) rather than Rule("weight").'
            )
        if not self.tensors:
            raise ValueError("Rule(): `tensors` must name at least one tensor, got ().")
        compiled = []
        for t in self.tensors:
            try:
                compiled.append(re.compile(t))
            except re.error as e:
                raise ValueError(f"Rule(): `tensors` holds an invalid regex, {t!r}: {e}.") from None
        patterns = tuple(compiled)
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "_patterns", patterns)

    def tensor_names(self, module: nn.Module) -> list[str]:
        """Return the names of ``module``'s tensors that this rule adapts, in module order.

        Raises:
            ValueError: if an entry of ``tensors`` matches none of the module's tensors.
        """
        own = own_tensor_names(module)
        names: list[str] = []
        for entry, pattern in zip(self.tensors, self._patterns):
            hits = [n for n in own if pattern.fullmatch(n)]
            if not hits:
                raise ValueError(
                    f"inject(): the rule for {type_name(module)} names the tensor {entry!r}, "
                    f"which {type_name(module)} lacks; it has {own}. Fix the rule's `tensors`."
                )
            names += [n for n in hits if n not in names]
        return names

    def adapts(self, tensor_name: str) -> bool:
        """Return whether an entry of ``tensors`` fully matches ``tensor_name``."""
        return any(p.fullmatch(tensor_name) for p in self._patterns)

    def is_factored(self, module: nn.Module) -> bool:
        """Return whether ``module``'s forward reaches its adapted tensors through factored ops."""
        return self.factored(module) if callable(self.factored) else bool(self.factored)


def own_tensor_names(module: nn.Module) -> list[str]:
    # Parameters and buffers that are set (not None), and tensors already parametrized.
    names = [n for n, t in module._parameters.items() if t is not None]
    names += [n for n, t in module._buffers.items() if t is not None]
    plist = getattr(module, "parametrizations", None)
    if isinstance(plist, nn.ModuleDict):
        names += list(plist.keys())
    return names


def type_name(module: nn.Module) -> str:
    """Name a module's type as the user wrote it, parametrized or not."""
    from torch.nn.utils.parametrize import type_before_parametrizations

    return type_before_parametrizations(module).__name__


def _groups_of_one(module: nn.Module) -> bool:
    return getattr(module, "groups", 1) == 1


def _bias(tensor_name: str) -> str:
    return "bias"


def _no_bias(tensor_name: str) -> None:
    return None


def _rnn_bias(tensor_name: str) -> str:
    return tensor_name.replace("weight", "bias", 1)  # weight_ih_l0 -> bias_ih_l0


def _mha_bias(tensor_name: str) -> str:
    # in_proj_weight (3E, E) goes with in_proj_bias (3E,); q/k/v_proj_weight share that bias with
    # the others, so its shape does not fit theirs and a kind that changes it is refused there.
    return "in_proj_bias"


_LINEAR = Rule(("weight",), factored=True, bias=_bias)
_CONV = Rule(("weight",), factored=_groups_of_one, bias=_bias)
_CONV_T = Rule(("weight",), bias=_no_bias)


def _plain_lookup(module: nn.Module) -> bool:
    # max_norm renormalises rows in place, scale_grad_by_freq rescales the weight's gradient,
    # mode="max" is not linear in the weight: these lookups run on the merged weight.
    return (module.max_norm is None and not module.scale_grad_by_freq
            and getattr(module, "mode", "sum") != "max")


_EMBEDDING = Rule(("weight",), transpose=True, factored=_plain_lookup, bias=_no_bias)
_RNN = Rule((r"weight_(ih|hh)_l\d+(_reverse)?",), bias=_rnn_bias)
_RNN_CELL = Rule(("weight_ih", "weight_hh"), bias=_rnn_bias)

_DEFAULT_RULES: dict[RuleKey, Rule] = {
    nn.Linear: _LINEAR,
    nn.Bilinear: Rule(("weight",), bias=_bias),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV_T,
    nn.ConvTranspose2d: _CONV_T,
    nn.ConvTranspose3d: _CONV_T,
    nn.Embedding: _EMBEDDING,
    nn.EmbeddingBag: _EMBEDDING,
    nn.MultiheadAttention: Rule(("in_proj_weight|q_proj_weight|k_proj_weight|v_proj_weight",), bias=_mha_bias),
    nn.RNNBase: _RNN,
    nn.RNNCellBase: _RNN_CELL,
    # transformers' GPT-2 style Conv1D: weight stored as (in, out), forward is torch.addmm.
    # Named by string so that transformers is not a runtime dependency.
    "transformers.pytorch_utils.Conv1D": Rule(("weight",), transpose=True, factored=True, bias=_bias),
    # bitsandbytes' quantized Linear layers: their own forward runs on the stored weight, with the
    # low-rank branch added (see lora_inject._quant). torchao's weights sit on a plain nn.Linear.
    "bitsandbytes.nn.modules.Linear4bit": _LINEAR,
    "bitsandbytes.nn.modules.Linear8bitLt": _LINEAR,
}


def default_rules() -> dict[RuleKey, Rule]:
    """Return a copy of the registry: module types (or their ``"module.QualName"``) to rules.

    Pass a changed copy as ``inject(..., rules=...)`` to override rules for one call.
    """
    return dict(_DEFAULT_RULES)


def register_rule(module_type: RuleKey, rule: Rule) -> None:
    """Register ``rule`` for ``module_type`` and its subclasses, for every later ``inject``.

    Args:
        module_type (type or str): an ``nn.Module`` subclass, or its ``"module.QualName"``
            when importing it is not wanted.
        rule (Rule): what to adapt.

    Raises:
        TypeError: if ``module_type`` is not an ``nn.Module`` subclass or a str, or ``rule``
            is not a :class:`Rule`.
    """
    if not (isinstance(module_type, str) or (isinstance(module_type, type)
                                               and issubclass(module_type, nn.Module))):
        raise TypeError(
            f"register_rule(): `module_type` must be an nn.Module subclass or a "
            f"'module.QualName' str, got {module_type!r}."
        )
    if not isinstance(rule, Rule):
        raise TypeError(
            f"register_rule(): `rule` must be a lora_inject.Rule, got {type(rule).__name__}."
        )
    _DEFAULT_RULES[module_type] = rule


def find_rule(module: nn.Module, rules: Mapping[RuleKey, Rule] | None = None) -> Rule | None:
    """Return the rule of the most specific registered type in ``module``'s MRO, or None."""
    from torch.nn.utils.parametrize import type_before_parametrizations

    table = _DEFAULT_RULES if rules is None else rules
    for cls in type_before_parametrizations(module).__mro__:
        rule = table.get(cls) or table.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None
