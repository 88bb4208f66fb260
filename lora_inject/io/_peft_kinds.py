"""peft's files of the kinds besides LoRA (LoHa, LoKr, OFT, IA³, VeRA), both ways: our adapters of
one such kind to peft's config and tensors, and peft's back to entries.

peft's tuner of each kind wraps a few layer types (``_KIND_LAYERS``); an adapter elsewhere is
refused with the reason, since peft could not load it. The tensors keep peft's names below the
module (each kind's ``peft_key``), and VeRA's shared projections sit at the root
(``base_model.vera_A``/``vera_B``) where ``save_projection`` keeps them.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .._chain import find_lora, source
from .._kinds.lokr import peft_factor
from .._kinds.oft import block_size
from .._selection import named_modules
from .._tied import tensor_users, users_of
from .._view import View
from ..kind import find_kind, kernel
from ..lora import LoRA
from ..rule import find_rule, type_name
from ._entries import Copy, Entry, tensor_shape
from ._files import dtype_name
from ._peft import copy_tensors, full_tensors, saved_whole, tied_once
from ._peft_config import (
    KIND_FIELDS,
    KIND_TENSORS,
    KIND_TYPES,
    MHA_OUT,
    PREFIX,
    Saved,
    feedforward,
    kind_of,
    parents_of,
    pattern,
    targeted,
)

# The layers each kind's peft tuner wraps (its layers_mapping / _create_new_module)
_KIND_LAYERS = {"loha": ("Linear", "Conv1d", "Conv2d"), "lokr": ("Linear", "Conv1d", "Conv2d"),
                "oft": ("Linear", "Conv2d"), "ia3": ("Linear", "Conv1D", "Conv2d", "Conv3d"),
                "vera": ("Linear", "Conv1D")}
_VERA_SHARED = ("vera_A", "vera_B")
PEFT_VERSION = "0.21.2"  # the peft whose files these are (OFT reads its Cayley-Neumann form from 0.18 on)


def _kind_layer(kind: str, module: nn.Module, parent: nn.Module | None) -> str:
    """Why peft's ``kind`` tuner cannot wrap ``module``, or ``""`` where it can."""
    cls = type_before_parametrizations(module)
    layer = None
    if issubclass(cls, nn.Linear):
        layer = "Linear"
    elif issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = cls.__mro__[[c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) for c in cls.__mro__].index(True)].__name__
    elif any(f"{c.__module__}.{c.__qualname__}" == "transformers.pytorch_utils.Conv1D" for c in cls.__mro__):
        layer = "Conv1D"
    if layer is None or layer not in _KIND_LAYERS[kind]:
        return (f"of type {cls.__name__}, and lora_inject carries peft's {KIND_TYPES[kind]} on "
                f"{', '.join(_KIND_LAYERS[kind])} only")
    if layer == "Linear" and isinstance(parent, nn.MultiheadAttention):
        return MHA_OUT.replace("LoRA", KIND_TYPES[kind])
    if layer.startswith("Conv") and layer != "Conv1D" and kind != "ia3":  # IA³ scales a whole channel: any conv
        if kind == "oft" and module.groups != 1:  # LoHa's and LoKr's conv takes the layer's groups: exact
            return f"a {cls.__name__} with groups={module.groups} (peft's OFT sizes its blocks for groups=1 only)"
        if kind == "oft" and len(set(module.kernel_size)) > 1:
            return (f"a {cls.__name__} with kernel {tuple(module.kernel_size)} (peft's OFT sizes its blocks by "
                    "kernel_size[0]², and fails on a kernel that is not square)")
        pointwise = all(k == 1 for k in module.kernel_size)  # OFT's rotation of channels alone
        if module.padding_mode != "zeros" and not (kind == "oft" and pointwise):
            return f"a {cls.__name__} with padding_mode={module.padding_mode!r} (peft's update ignores it)"
        if kind == "oft" and any(d != 1 for d in module.dilation):
            return f"a {cls.__name__} with dilation {module.dilation} (peft's OFT refuses it)"
    return ""


def _warn_oft_kernels(fn: str, kind: str, views: dict[str, View]) -> None:
    """Warn where OFT sits on a conv with a kernel larger than 1: peft's own forward there is not
    its merge (it folds overlapping patches); lora_inject follows the merge, as peft's
    ``merge_and_unload()`` does."""
    wide = [name for name, v in views.items() if kind == "oft" and any(k > 1 for k in kernel(v))]
    if wide:
        warnings.warn(f"{fn}(): OFT on {', '.join(f'`{n}`' for n in wide)}, convs with a kernel larger than 1: "
                      "peft's unmerged forward there is not its own merge (it folds overlapping patches). "
                      "lora_inject gives the merged outputs, as peft's merge_and_unload() does; peft's unmerged "
                      "model gives others.", UserWarning, stacklevel=4)


def _site(fn: str, kind: str, name: str, module: nn.Module, parent: nn.Module | None) -> View:
    """The view of ``module.weight`` as the rule for its type sees it, or raise where peft's
    ``kind`` cannot adapt it."""
    why = _kind_layer(kind, module, parent)
    rule = find_rule(module)
    if not why and (rule is None or not rule.adapts("weight")):
        why = f"a {type_name(module)} without a rule that adapts its weight"
    if why:
        raise ValueError(f"{fn}(): `{name}` is {why}; peft's format cannot hold kind {kind!r} there.")
    return View(tensor_shape(module, "weight"), rule.transpose, False)


def _lokr_kernel(fn: str, kind: str, name: str, view: View, names) -> None:
    """Raise for LoKr where peft's ``make_kron`` does not give the Kronecker product of the
    update (LyCORIS's) that lora_inject computes: a full ``lokr_w2`` or a Tucker core ``lokr_t2``
    on a Conv1d (it takes ``torch.kron`` of a 2-D and a 3-D or 4-D tensor and reshapes it, or
    fails), and a Tucker core on a Conv2d whose kernel is ``(k, 1)`` with ``k > 1`` (peft's
    forward fails there)."""
    if kind != "lokr":
        return
    k = kernel(view)
    if len(k) == 1 and "lokr_w2" in names:
        raise ValueError(f"{fn}(): `{name}` is a Conv1d with LoKr's full `lokr_w2`, where peft's update is not "
                         "the Kronecker product of its factors (its make_kron misses the kernel dimension), so "
                         "the outputs would differ. Use r < max(out, in) factors / 2 (low-rank lokr_w2) or "
                         "format='lora_inject'.")
    if "lokr_t2" in names and (len(k) == 1 or len(k) == 2 and k[0] > 1 and k[1] == 1):
        layer = "Conv1d" if len(k) == 1 else f"Conv2d with kernel {tuple(k)}"
        raise ValueError(f"{fn}(): `{name}` is a {layer} with LoKr's Tucker core `lokr_t2` "
                         "(use_effective_conv2d), which peft's make_kron cannot combine with that kernel (its "
                         "forward fails). Use use_effective_conv2d=False or format='lora_inject'.")


def _peft_split(fn: str, e: Entry, view: View) -> Entry:
    """``e`` with peft's ``decompose_factor`` for its explicit LoKr ``factors``, or raise where peft's
    factorization gives none of that split."""
    if e.options.get("factors") is None:
        return e
    factor = peft_factor(view, e.r, e.options)
    if factor is None:
        raise ValueError(f"{fn}(): `{e.key}` is LoKr with factors={list(e.options['factors'])} (w1 "
                         f"{tuple(e.options['factors'][::2])}, w2 {tuple(e.options['factors'][1::2])}), a split that "
                         "peft's factorization gives for no decompose_factor (LyCORIS's large factors and "
                         "unbalanced_factorization give such splits), so peft could not read it. Save with "
                         "format='kohya' or 'lora_inject'.")
    return replace(e, options={**e.options, "factors": None, "decompose_factor": factor})


def _target_spec(modules: dict[str, nn.Module], targets: list[str]) -> list[str] | str:
    """peft's ``target_modules`` that select exactly ``targets``: the list, or a regex where a list
    entry would also match another module (peft matches an entry at the end of a path)."""
    names = [n for n in modules if n]
    if any(n not in targets and any(n.endswith("." + p) for p in targets) for n in names):
        return "|".join(f"(?:{re.escape(p)})" for p in targets)
    return targets


def kinds_to_peft(fn: str, model: nn.Module, entries: list[Entry]) -> tuple[dict, dict[str, Tensor]]:
    """Translate entries of one kind other than LoRA to peft's config and tensors, or raise where
    peft's format cannot hold them."""
    full = [e for e in entries if e.kind == "full"]  # modules saved whole: peft's modules_to_save
    entries = [e for e in entries if e.kind != "full"]
    copies = saved_whole(full)
    bias = next((e for e in full if not any(e.module == c or e.module.startswith(f"{c}.") for c in copies)), None)
    if bias is not None or not entries:
        raise ValueError(f"{fn}(): `{(bias or full[0]).key}` is a full copy "
                         f"{'of a bias alone' if bias is not None else 'with no adapter beside it'}, which peft's "
                         "format holds beside a LoRA adapter only (peft's `bias`). Save with format='lora_inject'.")
    kinds = sorted({e.kind for e in entries})
    if len(kinds) > 1:
        raise ValueError(f"{fn}(): the adapter mixes the kinds {kinds}; peft's format holds one peft_type per "
                         "adapter. Save with format='lora_inject', or save each kind as its own adapter.")
    kind = kinds[0]
    if kind not in KIND_TYPES:
        raise ValueError(f"{fn}(): the adapter is of kind {kind!r}, which peft has no type for (peft's format "
                         f"holds {['lora', *KIND_TYPES]}). Save with format='lora_inject'.")
    modules = dict(named_modules(model))
    clash = next((e for e in entries if any(e.module == c or e.module.startswith(f"{c}.") for c in copies)), None)
    if clash is not None:
        raise ValueError(f"{fn}(): `{clash.module}` would be both a full copy (modules_to_save) and a "
                         f"{KIND_TYPES[kind]} layer in peft's format, which peft cannot hold. Save with "
                         "format='lora_inject'.")
    for e in full:
        _refuse_tied(fn, "modules_to_save copy", modules, e)
    views = _kind_views(fn, model, modules, kind, entries)
    _warn_oft_kernels(fn, kind, {e.module: views[e.key] for e in entries})
    if kind == "lokr":
        entries = [_peft_split(fn, e, views[e.key]) for e in entries]
    options = _one_setting(fn, kind, entries)
    config = _kind_config(model, modules, kind, entries, views, options)
    K = find_kind(kind)
    tensors = {}
    for e in entries:
        for name, t in e.extra.items():
            if name not in _VERA_SHARED:
                tensors[f"{PREFIX}{e.module}.{K.peft_key(name)}"] = t.contiguous()
    if kind == "vera":
        A, B = _vera_projections(fn, K, entries, views, options)
        if options["save_projection"]:
            tensors["base_model.vera_A"], tensors["base_model.vera_B"] = A, B
    if copies:
        config["modules_to_save"] = sorted(copies, key=list(modules).index)
        tensors.update(copy_tensors(modules, copies, {e.key: e for e in full}))
    return config, tensors


def _kind_views(fn: str, model: nn.Module, modules: dict[str, nn.Module], kind: str,
                entries: list[Entry]) -> dict[str, View]:
    """The view of each entry's weight as peft's ``kind`` tuner sees it, by entry key, or raise
    where peft could not give the model's outputs (a tensor other than a submodule's weight, a
    custom rule's transpose, a module at several paths, OFT rotating the output)."""
    parents = parents_of(modules)
    at: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        at.setdefault(id(m), []).append(name)
    views = {}
    for e in entries:
        if e.module:
            _site(fn, kind, e.module, modules[e.module], parents[e.module])
        if not e.module or e.tensor != "weight" or e.experts:
            raise ValueError(f"{fn}(): `{e.key}` ({e.type}) has no equivalent in peft's format: peft's "
                             f"{KIND_TYPES[kind]} adapts the `weight` of a submodule. Save with "
                             "format='lora_inject'.")
        views[e.key] = _site(fn, kind, e.module, modules[e.module], parents[e.module])
        if (views[e.key].transpose, tuple(views[e.key].shape)) != (e.transpose, tuple(e.shape)):
            raise ValueError(f"{fn}(): `{e.key}` was adapted with transpose={e.transpose} (a custom rule), but peft "
                             f"reads a {e.type} with transpose={views[e.key].transpose}. Save with "
                             "format='lora_inject'.")
        _lokr_kernel(fn, kind, e.module, views[e.key], e.extra)
        _refuse_tied(fn, KIND_TYPES[kind], modules, e)
        if kind == "ia3":
            _ia3_grouped(fn, e.module, modules[e.module], e.options["feedforward"])
        where = at.get(id(modules[e.module]), [])
        if len(where) > 1:
            raise ValueError(f"{fn}(): {e.type} `{e.module}` sits at {len(where)} paths in the model ({where}); "
                             "peft would adapt it at each, so it would not give this model's outputs. Save with "
                             "format='lora_inject', or untie the module.")
        if kind == "oft" and e.options.get("rotate", "in") != "in":
            raise ValueError(f"{fn}(): `{e.key}` is OFT with rotate={e.options['rotate']!r}; peft's OFT on a "
                             f"{e.type} rotates the input. Save with format='lora_inject'.")
    return views


def _ia3_grouped(fn: str, name: str, module: nn.Module, feedforward: bool) -> None:
    """Raise for IA³ scaling the input of a grouped conv: peft's vector has one value per input
    channel, lora_inject's one per column of the weight (``in_channels / groups``)."""
    groups = getattr(module, "groups", 1)
    if feedforward and groups != 1:
        raise ValueError(f"{fn}(): `{name}` is a conv with groups={groups} whose input IA³ scales (feedforward): "
                         f"peft's vector there has one value per input channel, lora_inject's one per column of the "
                         "weight, so neither could read the other's. Save with format='lora_inject', or scale its "
                         "output (leave it out of feedforward).")


def _ia3_side(K, view: View, configured: bool, got: dict[str, Tensor]) -> bool:
    """Whether IA³'s vector on a layer of ``view`` scales the input (feedforward): as the config
    says, unless, on a layer with no kernel, the saved vector has the other side's shape alone
    (``(1, in)`` against ``(out, 1)``). peft
    fixes a layer's side from the first adapter it puts there, so a later adapter of one model may
    have been trained, and saved, on the side its own config does not name: it is read as it ran."""
    vector = got.get("ia3_l")
    if vector is None or kernel(view):  # a conv's sides are both (1, channels, 1..): told apart by count alone
        return configured
    with torch.device("meta"):
        sides = {side: tuple(K.create(view, None, None, {"feedforward": side})["ia3_l"].shape)
                 for side in (True, False)}
    if tuple(vector.shape) == sides[configured] or tuple(vector.shape) != sides[not configured]:
        return configured
    return not configured


def _refuse_tied(fn: str, what: str, modules: dict[str, nn.Module], e: Entry) -> None:
    """Raise where ``e``'s tensor is tied to other users, which read its update too: peft's ``what``
    (a kind's tuner, or a ``modules_to_save`` copy) would change it at ``e.module`` alone."""
    lora = find_lora(modules[e.module], e.tensor)
    tied = ", ".join(f"`{u.qualname}.{u.tensor_name}`" for u in (users_of(lora) if lora is not None else ()))
    if tied:
        raise ValueError(f"{fn}(): `{e.key}` is one tensor tied to {tied}, which read its update too; peft's "
                         f"{what} would change `{e.module}` alone, so it would not give this model's outputs. Save "
                         "with format='lora_inject', or untie the tensors (transformers: tie_word_embeddings=False) "
                         "before injecting.")


def _one_setting(fn: str, kind: str, entries: list[Entry]) -> dict:
    """The options peft's config holds once per adapter (:data:`KIND_FIELDS`; OFT's and VeRA's rank
    too), the same on every entry, or raise where the entries differ in them."""
    fields = KIND_FIELDS[kind]
    shared = {tuple((f, e.options[f]) for f in fields) for e in entries}
    if kind == "oft":  # the rank is OFT's block count, part of its structure: one per adapter in peft
        shared = {(*s, ("r", e.r), ("oft_block_size", e.options["oft_block_size"])) for s, e in
                  zip([tuple((f, e.options[f]) for f in fields) for e in entries], entries)}
    if kind == "vera":
        shared = {(*tuple((f, e.options[f]) for f in fields), ("r", e.r)) for e in entries}
    if len(shared) > 1:
        raise ValueError(f"{fn}(): peft's {KIND_TYPES[kind]} has one setting per adapter for "
                         f"{sorted({f for s in shared for f, _ in s})}, but this adapter's tensors differ in them "
                         f"({sorted(shared)}). Save with format='lora_inject'.")
    return dict(next(iter(shared)))


def _kind_config(model: nn.Module, modules: dict[str, nn.Module], kind: str, entries: list[Entry],
                 views: dict[str, View], options: dict) -> dict:
    """peft's ``adapter_config.json`` for ``entries`` of ``kind``: the targets, the options of
    :func:`_one_setting`, LoHa's and LoKr's ranks and alphas by pattern, IA³'s feedforward modules."""
    fields = KIND_FIELDS[kind]
    targets = [e.module for e in sorted(entries, key=lambda e: list(modules).index(e.module))]
    cls = type_before_parametrizations(model)
    config = {
        "peft_type": KIND_TYPES[kind], "task_type": None, "inference_mode": True, "revision": None,
        "peft_version": PEFT_VERSION,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        if hasattr(cls, "from_pretrained") else None,
        "target_modules": _target_spec(modules, targets), "exclude_modules": None, "modules_to_save": None,
        **{f: options[f] for f in fields},
    }
    if kind in ("loha", "lokr"):
        ranks, alphas = {e.module: e.r for e in entries}, {e.module: e.alpha for e in entries}
        r0 = Counter(ranks.values()).most_common(1)[0][0]
        a0 = Counter(alphas.values()).most_common(1)[0][0]
        names = [n for n in modules if n]
        exact = {p: ("^" if any(n != p and n.endswith("." + p) for n in names) else "") + re.escape(p)
                 for p in ranks}
        config.update(r=r0, alpha=a0, rank_pattern={exact[p]: r for p, r in ranks.items() if r != r0},
                      alpha_pattern={exact[p]: a for p, a in alphas.items() if a != a0}, init_weights=True,
                      layers_to_transform=None, layers_pattern=None)
    conv1d = any(v.transpose for v in views.values()) and not any(not v.transpose for v in views.values())
    if kind == "oft":
        config.update(r=options["r"], oft_block_size=options["oft_block_size"], fan_in_fan_out=False,
                      bias="none", init_weights=True, layers_to_transform=None, layers_pattern=None)
    if kind == "ia3":
        ff = [e.module for e in entries if e.options["feedforward"]]
        by_list = all(any(t.endswith(f) for f in ff) == (t in ff) for t in targets)
        config.update(feedforward_modules=ff if by_list else "|".join(f"(?:{re.escape(p)})" for p in ff) or [],
                      fan_in_fan_out=conv1d, init_ia3_weights=True)
    if kind == "vera":
        config.update(r=options["r"], fan_in_fan_out=conv1d, bias="none", init_weights=True, vera_dropout=0.0,
                      layers_to_transform=None, layers_pattern=None)
    return config


def _vera_projections(fn: str, K, entries: list[Entry], views: dict[str, View], options: dict):
    """VeRA's shared ``vera_A`` ``(r, in_max)`` and ``vera_B`` ``(out_max, r)``, from the slices the
    sites hold; raise unless the slices are of one projection, the one peft rebuilds from the key
    where it is not saved."""
    wide = max(entries, key=lambda e: views[e.key].in_features)
    tall = max(entries, key=lambda e: views[e.key].out_features)
    A, B = wide.extra["vera_A"], tall.extra["vera_B"]
    for e in entries:
        v = views[e.key]
        if not (torch.equal(e.extra["vera_A"], A[:, :v.in_features].to(e.extra["vera_A"]))
                and torch.equal(e.extra["vera_B"], B[:v.out_features].to(e.extra["vera_B"]))):
            raise ValueError(f"{fn}(): VeRA's projections on `{e.key}` are not slices of those of `{wide.key}` "
                             f"and `{tall.key}`; peft shares one pair per adapter. Save with "
                             "format='lora_inject'.")
    if not options["save_projection"]:
        made = K.shared(list(views.values()), options["r"], options)
        if not (torch.equal(made["vera_A"].to(A), A) and torch.equal(made["vera_B"].to(B), B)):
            raise ValueError(f"{fn}(): VeRA's projections differ from those projection_prng_key="
                             f"{options['projection_prng_key']} gives, and save_projection=False would have peft "
                             "rebuild them from the key. Inject with save_projection=True, or save with "
                             "format='lora_inject'.")
    return A.contiguous(), B.contiguous()


def kinds_from_peft(fn: str, model: nn.Module, saved: Saved) -> tuple[list[Entry], list[Copy]]:
    """Translate peft's LoHa, LoKr, OFT, IA³ or VeRA adapter ``saved`` into entries and exact copies
    for ``model`` (its full tensors as :func:`~lora_inject.io._peft.full_tensors` reads them), or
    raise where it cannot be reproduced."""
    file, weights, config, tensors = saved.file, saved.weights, saved.config, dict(saved.tensors)
    kind = kind_of(config)
    K = find_kind(kind)
    modules = dict(named_modules(model))
    parents = parents_of(modules)
    users = tensor_users(model)
    sites = {}
    for name, module in modules.items():
        if name and targeted(config, name) and not isinstance(module, LoRA):
            try:
                sites[name] = _site(fn, kind, name, module, parents[name])
            except ValueError as e:
                raise ValueError(f"{str(e).rstrip('.')}; {file} targets it, so nothing was loaded.") from None
            other = [q for q, _, t in users.get(id(source(module, "weight")), []) if (q, t) != (name, "weight")]
            if other:
                tied = ", ".join(f"`{q}`" for q in other)
                raise ValueError(f"{fn}(): {file} adapts `{name}.weight` with {KIND_TYPES[kind]}, but in this model "
                                 f"it is one tensor tied to {tied}, which lora_inject adapts for all its users where "
                                 "peft applies it at one only. Load it into an untied model (transformers: "
                                 "tie_word_embeddings=False); nothing was loaded.")
    if not sites:
        raise ValueError(f"{fn}(): `target_modules` in {file} selects no module of the model; it was saved from "
                         "another model.")
    shared = _vera_shared(fn, saved, K, sites, tensors) if kind == "vera" else {}
    entries, sided = [], []
    for name, view in sites.items():
        module = modules[name]
        opts = {f: config[f] for f in KIND_FIELDS[kind] if f in config}
        r, alpha = None, None
        if kind in ("loha", "lokr"):
            r = pattern(fn, config, "rank_pattern", name, config.get("r", 8))
            alpha = float(pattern(fn, config, "alpha_pattern", name, config.get("alpha", 8)))
        elif kind == "vera":
            r = config.get("r", 256)
        got = {n: tensors.pop(f"{PREFIX}{name}.{K.peft_key(n)}") for n in KIND_TENSORS[kind]
               if f"{PREFIX}{name}.{K.peft_key(n)}" in tensors}
        if kind == "ia3":
            configured = feedforward(config, name)
            opts["feedforward"] = _ia3_side(K, view, configured, got)
            if opts["feedforward"] != configured:
                sided.append(f"`{name}` ({'input' if opts['feedforward'] else 'output'})")
            _ia3_grouped(fn, name, module, opts["feedforward"])
        if kind == "oft":  # the block size, from oft_R's shape (peft may have adjusted the config's)
            r, opts["oft_block_size"], opts["rotate"] = 0, _oft_block(fn, saved, name, view, got), "in"
        r, alpha, opts = K.resolve(r, alpha, **opts)
        with torch.device("meta"):
            made = K.create(view, r, alpha, opts)
        shapes = {n: tuple(t.shape) for n, t in made.items()}
        if set(got) != set(shapes) or any(tuple(got[n].shape) != s for n, s in shapes.items()):
            have = {f"{K.peft_key(n)}": tuple(t.shape) for n, t in got.items()}
            need = {f"{K.peft_key(n)}": s for n, s in shapes.items()}
            raise ValueError(f"{fn}(): {weights} holds {have or 'nothing'} for `{name}`, but "
                             f"{KIND_TYPES[kind]}{'' if r is None else f' with r={r}'} and {file}'s options on its "
                             f"weight of shape "
                             f"{tuple(view.shape)} makes {need}. It was saved from another model or config.")
        _lokr_kernel(fn, kind, name, view, got)
        bad = next((n for n, t in got.items() if not t.dtype.is_floating_point), None)
        if bad is not None:
            raise TypeError(f"{fn}(): `{PREFIX}{name}.{K.peft_key(bad)}` in {weights} has dtype "
                            f"{dtype_name(got[bad].dtype)}; an adapter's tensors are floating point. The file is "
                            "corrupt.")
        if shared:
            got.update(K.share(shared, view, r, opts))
            got = {n: t.to(got["vera_lambda_b"].dtype) for n, t in got.items()}
        rule = find_rule(module)
        entries.append(Entry(module=name, tensor="weight", type=type_name(module), shape=tuple(view.shape), A=None,
                             B=None, r=r, alpha=alpha, transpose=view.transpose, factored=rule.is_factored(module),
                             extra=got, kind=kind, options=opts))
    own = tuple(f".{K.peft_key(n)}" for n in KIND_TENSORS[kind])
    stray = next((k for k in sorted(tensors) if k.endswith(own)), None)  # the kind's, on a module not selected
    if stray is not None:
        raise ValueError(f"{fn}(): {weights} holds `{stray}` {tuple(tensors[stray].shape)}, which no module that "
                         f"`target_modules` in {file} selects takes; it was saved from another model, so nothing "
                         "was loaded.")
    more, copies = full_tensors(fn, saved, modules, tensors, {(e.module, e.tensor) for e in entries})
    _warn_oft_kernels(fn, kind, sites)
    if sided:
        warnings.warn(f"{fn}(): IA³'s vector on {', '.join(sided)} scales the side named, not the one the config's "
                      "feedforward_modules give: peft fixes a layer's side from the first adapter it puts there, and "
                      "trained and saved this one so. It is read as it ran.", UserWarning, stacklevel=3)
    return tied_once(fn, file, model, entries + more, config), copies


def _vera_shared(fn: str, saved: Saved, K, sites: dict[str, View], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """VeRA's shared projections for ``sites``: those ``saved`` holds (taken out of ``tensors``), else
    the ones its ``projection_prng_key`` gives; raise where the saved ones do not fit the model."""
    file, weights, config = saved.file, saved.weights, saved.config
    r = config.get("r", 256)
    options = {o.name: config.get(o.name, o.default) for o in K.options}
    if config.get("vera_dropout"):
        raise ValueError(f"{fn}(): {file} has vera_dropout={config['vera_dropout']!r}; lora_inject's VeRA has "
                         "no dropout, so nothing was loaded.")
    want = K.shared([View(tuple(v.shape), v.transpose, False) for v in sites.values()], r, options)
    if not options["save_projection"]:  # peft rebuilds them from the key, whatever the file holds
        for x in _VERA_SHARED:
            tensors.pop(f"base_model.{x}", None)
    if not any(k in tensors for k in ("base_model.vera_A", "base_model.vera_B")):
        return want
    shared = {}
    for x in _VERA_SHARED:
        t = tensors.pop(f"base_model.{x}", None)
        if t is None or tuple(t.shape) != tuple(want[x].shape):
            raise ValueError(f"{fn}(): {weights} holds `base_model.{x}` of shape "
                             f"{None if t is None else tuple(t.shape)}, but VeRA with r={r} on the modules "
                             f"{file} targets needs {tuple(want[x].shape)}. It was saved from another model.")
        shared[x] = t
    return shared


def _oft_block(fn: str, saved: Saved, name: str, view: View, got: dict[str, Tensor]) -> int:
    """OFT's block size on ``name``, from the shape of the ``oft_R`` that ``saved`` holds for it (peft
    may have adjusted its config's), or raise where that is no block of the module's inputs."""
    if "oft_R" not in got:
        raise ValueError(f"{fn}(): {saved.file} targets `{name}`, but {saved.weights} lacks "
                         f"`{PREFIX}{name}.oft_R.weight`. It was saved from another model.")
    try:
        b = block_size(got["oft_R"].shape[-1]) if got["oft_R"].dim() == 2 else 0
    except ValueError:
        b = 0
    if b < 1 or view.in_features % b:  # a block of 1: peft's adjustment where nothing else divides
        raise ValueError(f"{fn}(): `{PREFIX}{name}.oft_R.weight` has shape {tuple(got['oft_R'].shape)}, "
                         f"which is no OFT block of the {view.in_features} inputs of `{name}`. It was saved "
                         "from another model.")
    return b
