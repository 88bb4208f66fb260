"""The kohya-ss and LyCORIS layouts, and diffusers' own: one file's keys grouped by module, each
module's tensors turned into entries for a live module, and entries written back as kohya keys.

kohya-ss names a module by its path with ``.`` flattened to ``_`` behind a component prefix
(``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``, ``lora_te3_``; LyCORIS on a bare
module: ``lycoris_``), and gives each tensor a suffix:

* LoRA (LoCon on a conv): ``lora_down.weight`` ``(r, in, *kernel)``, ``lora_up.weight``
  ``(out, r, 1, ..)``, optionally ``lora_mid.weight`` ``(r, r, *kernel)`` (Tucker: then the down
  is ``(r, in, 1, ..)``) and ``dora_scale``; the update is ``alpha / r * up @ (mid) @ down``;
* LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optionally ``hada_t1`` and
  ``hada_t2`` (Tucker), scaled by ``alpha / r``;
* LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``
  (with ``lokr_t2`` for Tucker), scaled by ``alpha / r``, and by 1 where both halves are full;
* full: ``diff`` (the whole update of the weight) and ``diff_b`` (of the bias);

with ``alpha`` a 0-d tensor (missing or 0 means ``alpha = r``). diffusers' layout keys each
module by its dotted path behind a component (``unet.``, ``transformer.``, ``text_encoder.``),
with peft's ``lora_A.weight``/``lora_B.weight`` (and ``lora_magnitude_vector`` for DoRA).

DoRA's ``dora_scale`` holds the norm along either axis: ``(out, 1, ..)`` per output unit (as
peft's), or ``(1, in, ..)`` per input unit (LyCORIS with ``wd_on_output=False``); as ComfyUI
does, the shape says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._kinds.lokr import peft_factor
from .._view import View
from ..rule import find_rule, type_name
from ._entries import Entry

# The component each kohya prefix names; "unet" is the denoiser, a pipeline's unet or transformer.
PREFIXES = {"lora_unet": "unet", "lora_transformer": "unet", "lora_te1": "text_encoder",
            "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3", "lora_te": "text_encoder",
            "lycoris": None}
LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
SUFFIXES = (*LORA, *LOHA, *LOKR, *FULL, "alpha", "dora_scale")
PEFT = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "alpha")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


@dataclass
class Saved:
    """One module of a file: where the file puts it, and its tensors by suffix."""

    name: str  # the module's name in the file's keys, prefix included
    component: str | None  # the component it belongs to ("unet", "text_encoder", ..), None for the module itself
    path: str  # its name inside the component: flattened with '_' (kohya), or dotted (diffusers)
    flat: bool  # kohya's flattened names
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"lora"``, ``"loha"``, ``"lokr"`` or ``"full"``."""
        keys = set(self.tensors)
        if keys & set(LOHA):
            return "loha"
        if keys & set(LOKR):
            return "lokr"
        if keys & set(FULL):
            return "full"
        return "lora"

    def keys(self) -> list[str]:
        """The file's keys of this module."""
        return [f"{self.name}.{s}" for s in self.tensors]

    @property
    def rank(self) -> int | None:
        t = self.tensors
        for k in ("lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if k in t:
                return int(t[k].shape[0])
        return None

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None or a.numel() != 1 else float(a)


def group(fn: str, file: str, tensors: dict[str, Tensor]) -> tuple[str, list[Saved]]:
    """``(layout, modules)``: the file's keys grouped by module, the layout being ``"kohya"``
    (kohya-ss and LyCORIS) or ``"diffusers"``.

    Raises:
        ValueError: if a key fits neither layout, or the file mixes them.
    """
    modules: dict[str, Saved] = {}
    layouts = set()
    for key, t in tensors.items():
        head, _, rest = key.partition(".")
        prefix = next((p for p in PREFIXES if head == p or head.startswith(p + "_")), None)
        if prefix is not None and rest in SUFFIXES:
            layouts.add("kohya")
            m = modules.setdefault(head, Saved(head, PREFIXES[prefix], head[len(prefix) + 1:], True))
            m.tensors[rest] = t
            continue
        suffix = next((s for s in PEFT if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(
                f"{fn}(): {file} holds `{key}`, which is no LoRA key of the kohya-ss, LyCORIS or diffusers "
                f"layout (kohya: lora_unet_/lora_te_...<module>.{{lora_down.weight, lora_up.weight, alpha, "
                "hada_w1_a, lokr_w1, diff, ...}; diffusers: unet.<module>.lora_A.weight). Nothing was loaded.")
        layouts.add("diffusers")
        name = key[:-len(suffix) - 1]
        first, _, inner = name.partition(".")
        component, path = (first, inner) if first in COMPONENTS and inner else (None, name)
        modules.setdefault(name, Saved(name, component, path, False)).tensors[suffix] = t
    if len(layouts) > 1:
        raise ValueError(f"{fn}(): {file} mixes the kohya-ss and diffusers layouts; save each adapter in one.")
    if not modules:
        raise ValueError(f"{fn}(): {file} holds no tensors; it is no adapter.")
    return layouts.pop(), list(modules.values())


def _need(fn: str, saved: Saved, *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in saved.tensors]
    if missing:
        raise ValueError(f"{fn}(): `{saved.name}` has {sorted(saved.tensors)} but lacks {missing}; the file is "
                         "truncated or corrupt. Nothing was loaded.")
    return [saved.tensors[n] for n in names]


def to_entries(fn: str, saved: Saved, path: str, module: nn.Module, rows: slice | None = None) -> list[Entry]:
    """The entries that put ``saved`` onto ``module`` (at ``path``): on its weight, and on its bias
    for a full ``diff_b``; ``rows`` takes only those output rows of the saved update (a fused
    q/k/v projection split onto its parts).

    Raises:
        ValueError: if the tensors do not fit ``module``, or hold what cannot be reproduced.
    """
    W = module.weight
    shape = tuple(W.shape)
    rule = find_rule(module)
    factored = rule is not None and rule.adapts("weight") and rule.is_factored(module)
    if rule is not None and rule.adapts("weight") and (rule.transpose or rule.experts):
        raise ValueError(f"{fn}(): `{saved.name}` targets {type_name(module)} `{path}`, whose weight is stored "
                         "transposed or per expert; the kohya-ss layout has no such weight.")
    base = dict(module=path, tensor="weight", type=type_name(module), shape=shape, factored=factored)
    t = {k: v for k, v in saved.tensors.items()}
    if rows is not None:
        t = _rows(fn, saved, t, rows)
    kind = saved.kind

    def wrong(what: str) -> ValueError:
        return ValueError(f"{fn}(): `{saved.name}` {what}, which does not fit {type_name(module)} `{path}` of "
                          f"shape {shape}. The file was made for another model. Nothing was loaded.")

    if kind == "full":
        return _full_entries(module, base, t, shape, wrong)
    if kind == "lora":
        return [_lora_entry(fn, saved, base, t, shape, wrong)]
    if "dora_scale" in t:
        raise ValueError(f"{fn}(): `{saved.name}` is a {kind.upper()} with DoRA (dora_scale); lora_inject's "
                         f"{kind} kind has no DoRA, so it cannot be loaded unmerged. Nothing was loaded.")
    if kind == "loha":
        return [_loha_entry(fn, saved, base, t, shape, wrong)]
    return [_lokr_entry(fn, saved, base, t, shape, wrong)]


def _full_entries(module: nn.Module, base: dict, t: dict[str, Tensor], shape: tuple, wrong) -> list[Entry]:
    """A full update's entries: the weight's ``diff``, and the bias's ``diff_b`` where the file has it."""
    entries = []
    if "diff" in t:
        entries.append(_full(dict(base), t["diff"], shape, wrong))
    if "diff_b" in t:
        bias = getattr(module, "bias", None)
        if bias is None:
            raise wrong("holds a bias update `diff_b`, but the module has no bias")
        entries.append(_full(dict(base, tensor="bias", shape=tuple(bias.shape), factored=False),
                             t["diff_b"], tuple(bias.shape), wrong))
    return entries


def _lora_entry(fn: str, saved: Saved, base: dict, t: dict[str, Tensor], shape: tuple, wrong) -> Entry:
    """A LoRA's entry: its down and up factors (through ``lora_mid`` for LyCORIS's Tucker form), and
    DoRA's magnitude where the file has one."""
    out, alpha = shape[0], saved.alpha
    _need(fn, saved, *(keys := ("lora_down.weight", "lora_up.weight") if saved.flat else
                       ("lora_A.weight", "lora_B.weight")))
    down, up = (t[k] for k in keys)
    r = int(down.shape[0])
    if "lora_mid.weight" in t:  # Tucker: A[a, i, k] = sum_b mid[a, b, k] down[b, i]
        mid = t["lora_mid.weight"]
        if mid.dim() < 3 or tuple(mid.shape[:2]) != (r, r) or down.reshape(r, -1).shape[1] * math.prod(
                mid.shape[2:]) != math.prod(shape[1:]):
            raise wrong(f"has lora_mid {tuple(mid.shape)} and lora_down {tuple(down.shape)}")
        down = torch.einsum("ab...,bi->ai...", mid.float(), down.reshape(r, -1).float()).to(down.dtype)
    A = down.reshape(r, -1)
    B = up.reshape(up.shape[0], -1)
    if B.shape[1] != r or (A.shape[1], B.shape[0]) != (math.prod(shape[1:]), out):
        raise wrong(f"has a down {tuple(down.shape)} and an up {tuple(up.shape)}")
    extra = {}
    scale = t.get("dora_scale", t.get("lora_magnitude_vector"))
    if scale is not None:
        extra["lora_magnitude"], axis = _magnitude(fn, saved, scale, shape)
    return Entry(**base, A=A, B=B, r=r, alpha=float(r if not alpha else alpha), dora=bool(extra),
                 dora_axis=axis if extra else "out", extra=extra)


def _loha_entry(fn: str, saved: Saved, base: dict, t: dict[str, Tensor], shape: tuple, wrong) -> Entry:
    """A LoHa's entry: its four factors, and the Tucker cores of ``use_effective_conv2d`` where the
    file has them."""
    w1a, w1b, w2a, w2b = _need(fn, saved, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    r = int(w1b.shape[0])
    tucker = "hada_t1" in t
    params = {k: t[k] for k in LOHA if k in t}
    if tucker and len(shape) == 3:  # LyCORIS keeps a 1-D kernel as (r, r, k); the kind holds (r, r, k, 1)
        params = {k: v[..., None] if k.startswith("hada_t") and v.dim() == 3 else v for k, v in params.items()}
    options = {"use_effective_conv2d": tucker}
    return _kind_entry(base, "loha", r, saved.alpha, options, params, View(shape), wrong)


def _lokr_entry(fn: str, saved: Saved, base: dict, t: dict[str, Tensor], shape: tuple, wrong) -> Entry:
    """A LoKr's entry: the structure follows from which factors the file holds, its rank from the
    low-rank ones, and the split from their shapes."""
    out, alpha, view = shape[0], saved.alpha, View(shape)
    params = {k: t[k] for k in LOKR if k in t}
    if "lokr_w1" not in params:
        _need(fn, saved, "lokr_w1_a", "lokr_w1_b")
    if "lokr_w2" not in params:
        _need(fn, saved, "lokr_w2_a", "lokr_w2_b")
    w1 = params.get("lokr_w1")
    a, c = tuple(w1.shape) if w1 is not None else (params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1])
    if "lokr_w2_b" in params and "lokr_t2" not in params:
        params["lokr_w2_b"] = params["lokr_w2_b"].reshape(params["lokr_w2_b"].shape[0], -1)
    if "lokr_t2" in params and len(shape) == 3 and params["lokr_t2"].dim() == 3:
        params["lokr_t2"] = params["lokr_t2"][..., None]
    low = next((params[k] for k in ("lokr_w1_b", "lokr_w2_b") if k in params), None)
    if low is None:  # both halves full: LyCORIS scales by 1 whatever alpha says
        r = max(out // a, math.prod(shape[1:2]) // c if len(shape) > 1 else 1)
        alpha = float(r)
    else:
        r = int(low.shape[0])
    options = {"use_effective_conv2d": "lokr_t2" in params, "decompose_both": "lokr_w1_a" in params}
    channels = shape[1] if len(shape) > 1 else 1
    if min(a, c) < 1 or out % a or channels % c:
        raise wrong(f"holds LoKr factors {({k: tuple(v.shape) for k, v in params.items()})} that do not "
                    f"split {shape}")
    # the saved shapes give the split (LyCORIS's differs from peft's for a large factor and with
    # unbalanced_factorization); peft's decompose_factor where one gives it
    options["factors"] = [a, out // a, c, channels // c]
    factor = peft_factor(view, r, options)
    if factor is not None:
        options.update(factors=None, decompose_factor=factor)
    return _kind_entry(base, "lokr", r, alpha, options, params, view, wrong)


def _kind_entry(base: dict, kind: str, r: int, alpha: float | None, options: dict, params: dict, view: View,
                wrong) -> Entry:
    from ..kind import find_kind

    k = find_kind(kind)
    resolved = {o.name: o.default for o in k.options}
    resolved.update(options)
    with torch.device("meta"):
        made = k.create(view, r, float(alpha or r), resolved)
    if set(made) != set(params) or any(tuple(made[n].shape) != tuple(params[n].shape) for n in made):
        raise wrong(f"holds {kind} tensors {({n: tuple(v.shape) for n, v in params.items()})}, but r={r} needs "
                    f"{({n: tuple(v.shape) for n, v in made.items()})}")
    return Entry(**base, A=None, B=None, r=r, alpha=float(alpha or r), kind=kind, options=resolved,
                 extra=dict(params))


def _full(base: dict, diff: Tensor, shape: tuple[int, ...], wrong) -> Entry:
    """The whole update ``diff`` as a LoRA of full rank with an identity factor."""
    if tuple(diff.shape) != shape and diff.numel() != math.prod(shape):
        raise wrong(f"has a full update of shape {tuple(diff.shape)}")
    view = View(shape)
    delta = view.rows(diff.reshape(shape).float())
    out, inn = delta.shape
    eye = torch.eye(min(out, inn), dtype=torch.float32)
    A, B = (delta, eye) if out <= inn else (eye, delta)
    r = min(out, inn)
    return Entry(**base, A=A.to(diff.dtype), B=B.to(diff.dtype), r=r, alpha=float(r))


def _magnitude(fn: str, saved: Saved, scale: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, str]:
    """DoRA's magnitude and its axis: ``(out,)`` from a ``dora_scale`` ``(out, 1, ..)`` (or peft's
    ``(out,)``), ``(in,)`` from LyCORIS' ``(1, in, ..)`` (``wd_on_out=False``), told by the shape as
    ComfyUI does (a square ``Linear``'s ``(1, n)`` is the input axis, its ``(n, 1)`` the output)."""
    if scale.numel() == shape[0] and (scale.dim() == 1 or scale.shape[0] == shape[0]):
        return scale.reshape(shape[0]), "out"
    if len(shape) > 1 and scale.dim() > 1 and scale.shape[0] == 1 and scale.numel() == shape[1]:
        return scale.reshape(shape[1]), "in"
    raise ValueError(f"{fn}(): `{saved.name}.dora_scale` has shape {tuple(scale.shape)}, which fits neither axis of "
                     f"a weight of shape {shape}. The file is corrupt. Nothing was loaded.")


def _rows(fn: str, saved: Saved, t: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """The tensors of a fused projection's update restricted to output ``rows``."""
    if saved.kind != "lora" or "lora_mid.weight" in t or "dora_scale" in t:
        raise ValueError(f"{fn}(): `{saved.name}` is a fused projection of kind {saved.kind} (with "
                         f"{sorted(t)}); only a plain LoRA splits onto its parts. Nothing was loaded.")
    up = "lora_up.weight" if saved.flat else "lora_B.weight"
    return {**t, up: t[up][rows]}


# -- writing -----------------------------------------------------------------------------------
def from_entry(name: str, e: Entry) -> dict[str, Tensor]:
    """The kohya-layout tensors of entry ``e`` under the module name ``name``.

    Raises:
        ValueError: where the layout has no room for it.
    """
    shape = tuple(e.shape)
    if e.transpose or e.experts or e.tensor != "weight":
        raise ValueError(f"save_adapter(): `{e.key}` is a {e.type}'s {e.tensor!r} (transpose={e.transpose}, "
                         f"experts={e.experts}); the kohya-ss layout holds weights of Linear and Conv layers only.")
    if e.kind == "lora":
        if e.init != "default" and e.extra.keys() - {"lora_magnitude"}:
            raise ValueError(f"save_adapter(): `{e.key}` uses init={e.init!r}, whose frozen factors the "
                             "kohya-ss layout cannot hold.")
        s = e.alpha / math.sqrt(e.r) if e.rslora else e.alpha / e.r
        out = {f"{name}.lora_down.weight": e.A.reshape(e.r, *shape[1:2], *shape[2:]) if len(shape) > 2 else e.A,
               f"{name}.lora_up.weight": e.B.reshape(shape[0], e.r, *[1] * (len(shape) - 2)),
               f"{name}.alpha": torch.tensor(float(s * e.r))}
        if "lora_magnitude" in e.extra:
            m = e.extra["lora_magnitude"]
            out[f"{name}.dora_scale"] = (m.reshape(shape[0], *[1] * (len(shape) - 1)) if e.dora_axis == "out"
                                         else m.reshape(1, shape[1], *[1] * (len(shape) - 2)))
        return out
    if e.kind not in ("loha", "lokr"):
        raise ValueError(f"save_adapter(): `{e.key}` is of kind {e.kind!r}; the kohya-ss/LyCORIS layout holds "
                         "LoRA, LoHa and LoKr. Save it with format='lora_inject' or 'peft'.")
    from ..kind import find_kind

    s = find_kind(e.kind).scaling(e.r, e.alpha, e.options)
    params = dict(e.extra)
    if e.kind == "lokr" and "lokr_w1" in params and "lokr_w2" in params:
        params["lokr_w1"] = params["lokr_w1"] * s  # LyCORIS scales two full halves by 1
        alpha = float(e.r)
    else:
        alpha = float(s * e.r)
    out = {f"{name}.{k}": v for k, v in params.items()}
    out[f"{name}.alpha"] = torch.tensor(alpha)
    return out
