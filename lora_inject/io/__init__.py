"""Adapters on disk: ``save_adapter`` writes one adapter of a model, ``load_adapter`` puts it back.

Our format is a directory that holds two files:

* ``adapter.safetensors``: for each adapted tensor ``p.weight``, the factors ``p.weight.lora_A``
  ``(r, in)`` and ``p.weight.lora_B`` ``(out, r)`` (with a leading experts dimension for expert
  weights), in their own dtype, and where the adapter has them DoRA's magnitude
  ``p.weight.lora_magnitude`` and the frozen initial factors ``p.weight.lora_A0``/``lora_B0`` of
  the ``"pissa"``/``"olora"`` inits;
* ``adapter.json``: the format and library versions, the adapter's name, dtype and targets, the
  sha256 of the weights file, and for each adapted tensor its module path and type, its shape, r,
  alpha, rslora, dora, dropout, init and rule (``transpose``, ``experts``, ``factored``).

peft's format (``adapter_model.safetensors`` and ``adapter_config.json``) is read and checked by
:mod:`lora_inject.io._peft_config`, and translated by :mod:`lora_inject.io._peft` (LoRA) and
:mod:`lora_inject.io._peft_kinds` (LoHa, LoKr, OFT, IA³, VeRA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import TypeVar

import torch
from torch import nn

from .. import _quant as quant
from ..lora import LoRA, check_adapter_name
from ..rule import own_tensor_names, type_name
from . import _diffusion as diffusion
from . import _ours as ours
from . import _peft as peft
from . import _peft_config as peft_config
from ._entries import Copy, Entry, apply, collect, tensor_shape
from ._files import write_atomic, write_pickled, write_safetensors
from ._peft_kinds import kinds_from_peft, kinds_to_peft
from ._wrappers import placed, unwrapped

__all__ = ["load_adapter", "save_adapter"]  # write_entries, peft_entries: for the command line

M = TypeVar("M", bound=nn.Module)
FORMATS = ("lora_inject", "peft", "kohya")
_ADAPTER_FILES = (ours.CONFIG, peft_config.CONFIG, peft_config.PICKLE, ours.WEIGHTS, peft_config.WEIGHTS)


def save_adapter(model: nn.Module, path: str | os.PathLike, *, adapter: str = "default",
                 format: str = "lora_inject", safe_serialization: bool = True, lora_bias: bool = False) -> None:
    r"""Write adapter ``adapter`` of ``model`` to the directory ``path``.

    With ``format="lora_inject"`` the directory gets ``adapter.safetensors`` (the factors) and
    ``adapter.json`` (everything needed to inject them again: per tensor r, alpha, rslora, the
    rule and shape; the targets, dtype and library version). With ``format="peft"`` it gets
    ``adapter_model.safetensors`` and ``adapter_config.json``, which
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads, and ``AutoPeftModel`` too (the
    config names the base class in ``auto_mapping`` and ``base_model_name_or_path`` is
    ``model.config.name_or_path``). That covers ``Linear``, transformers' ``Conv1D``,
    ``Embedding``, ``Conv1d/2d/3d`` with ``groups=1``, ``MultiheadAttention`` (packed
    ``in_proj_weight`` and its out_proj) and expert weights (``target_parameters``); an update of
    full rank on any other tensor is written whole (``bias="all"``, or the module in
    ``modules_to_save``), and so is an adapter's kind ``"full"``; kind ``"tokens"`` is peft's
    ``trainable_token_indices``, and a tied tensor's update is written at each module that reads it.
    Per-tensor r and alpha go to ``rank_pattern``/``alpha_pattern``.
    An adapter of kind ``"loha"``, ``"lokr"``, ``"oft"``, ``"ia3"`` or ``"vera"`` is written as
    peft's ``LOHA``, ``LOKR``, ``OFT``, ``IA3`` or ``VERA`` adapter, on the layers peft's tuner
    for it wraps (LoHa and LoKr: Linear, Conv1d, Conv2d; OFT: Linear, Conv2d; IA³: Linear,
    Conv1D, Conv2d, Conv3d; VeRA: Linear, Conv1D; convs with groups=1), and refused elsewhere.

    With ``format="peft"``, ``safe_serialization=False`` writes the weights as
    ``adapter_model.bin`` (``torch.save``), as peft's ``save_pretrained(safe_serialization=False)``
    does, and ``lora_bias=True`` writes peft's ``lora_bias``: the update of each LoRA layer's bias
    becomes ``lora_B.bias`` (``b`` with ``s * b`` the update, ``s`` the layer's LoRA scaling; zeros
    where the bias has none), where by default the updated bias is written whole (``bias="lora_only"``).

    With ``format="kohya"``, ``path`` is the ``.safetensors`` file to write, in the kohya-ss
    layout that diffusers' ``load_lora_weights`` and LyCORIS read: LoRA as
    ``lora_down``/``lora_up``/``alpha`` (``dora_scale`` for DoRA), LoHa and LoKr as LyCORIS'
    tensors, each module named by its path flattened with ``_`` behind ``lora_unet_`` (a UNet,
    a transformer or another module) or ``lora_te_`` (a text encoder); ``model`` may be a
    pipeline, whose text encoders get ``lora_te1_``/``lora_te2_`` beside a second one.

    Each file is written to a temporary file in ``path`` and renamed into place, so an
    interrupted save never leaves a half-written file under the final name (and the weights'
    sha256 in ``adapter.json`` catches a weights file from another save). A directory holds one
    adapter: once both new files are in place, the other format's files (and a pickled
    ``adapter_model.bin``) are deleted, so a failed save leaves the adapter that was there before.

    The paths are those of the model inside ``torch.compile``'s wrapper and inside a module that
    holds it as its only child ``module`` (DDP, DataParallel): an adapter saved from a compiled
    or wrapped model has the plain model's paths, and loads into it (and into peft).

    Args:
        model (nn.Module): a model that carries ``adapter``.
        path (str or os.PathLike): the directory to write; it is created if needed.
        adapter (str): the adapter to save. Default: ``"default"``.
        format (str): ``"lora_inject"``, ``"peft"`` or ``"kohya"``. Default: ``"lora_inject"``.
        safe_serialization (bool): with ``format="peft"``, ``False`` writes ``adapter_model.bin``
            instead of ``adapter_model.safetensors``. Default: ``True``.
        lora_bias (bool): with ``format="peft"``, write bias updates as peft's ``lora_B.bias``
            (``lora_bias=True``; Linear, Conv1D and Conv LoRA layers only). Default: ``False``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``path`` is not a str or
            ``os.PathLike`` of str, ``format`` or ``adapter`` is not a str, or
            ``safe_serialization`` or ``lora_bias`` is not a bool.
        ValueError: if ``format`` is unknown, ``safe_serialization=False`` or ``lora_bias=True`` is
            given with ``format="lora_inject"``, ``path`` is empty, ``path`` exists and is not a directory (a file, a
            dangling symlink), the model has no adapter ``adapter``, or (for ``format="peft"``)
            a tensor has no equivalent in peft's format.
        RuntimeError: if the factors are sharded (flattened by FSDP1, or DTensors under FSDP2:
            unshard the FSDP modules first; see the README's "Distributed training"), or still
            on the meta device. Nothing is written then.

    Example::

        >>> inject(model, "attn", r=8)
        >>> save_adapter(model, "my_adapter")
        >>> load_adapter(fresh_model, "my_adapter")
    """
    fn = "save_adapter"
    if not (format == "kohya" and diffusion.is_pipeline(model)):
        _check_model(fn, model)
    if not isinstance(format, str):
        raise TypeError(f"{fn}(): `format` must be a str, one of {FORMATS}, got {type(format).__name__}.")
    if format not in FORMATS:
        raise ValueError(f"{fn}(): `format` must be one of {FORMATS}, got {format!r}.")
    for flag, value, default in (("safe_serialization", safe_serialization, True), ("lora_bias", lora_bias, False)):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}(): `{flag}` must be a bool, got {type(value).__name__}.")
        if value != default and format != "peft":
            raise ValueError(f"{fn}(): `{flag}={value}` is an option of peft's format, but `format` is {format!r} "
                             "(always safetensors, bias updates as they are). Pass format='peft', or leave "
                             f"{flag} out.")
    path = _check_path(fn, path)
    if format == "kohya":
        if os.path.isdir(path):
            raise ValueError(f"{fn}(): with format='kohya', `path` is the .safetensors file to write, got {path!r}, "
                             "which is a directory. Pass a file name inside it.")
        target = model if diffusion.is_pipeline(model) else unwrapped(model)
        blob = write_safetensors(diffusion.to_kohya(fn, target, adapter), {"format": "pt"})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, blob)
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        what = "a symlink to nothing" if os.path.islink(path) and not os.path.exists(path) else "not a directory"
        raise ValueError(f"{fn}(): `path` {path!r} exists and is {what}; an adapter is a directory. "
                         "Pass a new path, or remove that one first.")
    model = unwrapped(model)  # paths as in the bare model, not under compile's or DDP's wrapper
    write_entries(fn, model, collect(fn, model, adapter), path, format=format, adapter=adapter,
                  safe_serialization=safe_serialization, lora_bias=lora_bias)


def write_entries(fn: str, model: nn.Module, entries: list[Entry], path: str, *, format: str, adapter: str,
                  safe_serialization: bool = True, lora_bias: bool = False) -> None:
    """Write ``entries`` (with paths in ``model``) to ``path`` in ``format``, as :func:`save_adapter` does."""
    if format == "kohya":
        blob = write_safetensors(diffusion.to_kohya(fn, model, adapter, entries), {"format": "pt"})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, blob)
        return
    meta = next((e.key for e in entries if any(t.is_meta for t in e.tensors.values())), None)
    if meta is not None:
        raise RuntimeError(f"{fn}(): the factors of `{meta}` are on the meta device, so they have no values "
                           "to save. Materialise the model first (model.to_empty(device=...), then "
                           "li.init_lora(model) or load the factors), then save.")
    if format == "peft" and any(e.kind not in peft.COMPANIONS for e in entries):
        if lora_bias:
            other = next(e.kind for e in entries if e.kind not in peft.COMPANIONS)
            raise ValueError(f"{fn}(): `lora_bias=True` is a setting of peft's LoRA, but adapter {adapter!r} is of "
                             f"kind {other!r}. Leave lora_bias out.")
        config, tensors = kinds_to_peft(fn, model, entries)
    elif format == "peft":
        config, tensors = peft.to_peft(fn, model, entries, lora_bias=lora_bias)
    else:
        config, tensors = ours.to_ours(entries, adapter)
    weights, config_name = (
        (peft_config.WEIGHTS if safe_serialization else peft_config.PICKLE, peft_config.CONFIG) if format == "peft"
        else (ours.WEIGHTS, ours.CONFIG))
    blob = write_safetensors(tensors, {"format": "pt"}, integers=format == "peft") if safe_serialization \
        else write_pickled(tensors)
    os.makedirs(path, exist_ok=True)  # only once everything to write is ready
    if format != "peft":
        config["sha256"] = hashlib.sha256(blob).hexdigest()
        config["config_sha256"] = ours.config_digest(config)
    write_atomic(os.path.join(path, weights), blob)
    write_atomic(os.path.join(path, config_name), (json.dumps(config, indent=2) + "\n").encode())
    # One adapter per directory: only now that the new one is whole, drop what would shadow it or be
    # shadowed by it (the other format's files, a pickled adapter_model.bin), config first.
    for stale in _ADAPTER_FILES:
        if stale not in (weights, config_name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, stale))


def peft_entries(fn: str, model: nn.Module, saved: peft_config.Saved) -> tuple[list[Entry], list[Copy]]:
    """peft's adapter ``saved`` as entries and exact copies for ``model``, by its kind: LoRA's
    (with its full copies and token rows) or another kind's, as :func:`load_adapter` reads it."""
    if peft_config.kind_of(saved.config) is None:
        return peft.from_peft(fn, model, saved)
    return kinds_from_peft(fn, model, saved)  # peft's LoHa, LoKr, OFT, IA³ or VeRA


def load_adapter(model: M, path: str | os.PathLike, *, adapter: str | None = None,
                 dtype: torch.dtype | None = None, strict: bool = True) -> M:
    r"""Load the adapter saved in the directory ``path`` into ``model``, in place.

    The format is detected: ``adapter.json`` is ours, ``adapter_config.json`` is peft's. If the
    model does not carry the adapter yet, it is injected with the saved r, alpha, scaling and
    rule of every tensor, and the outputs equal those of the saved model exactly. If the model
    already carries it, on exactly those tensors, it is swapped in place (same Parameter
    objects, so an optimizer or a compiled model holding them stays valid): a saved rank below
    the slot's is zero-padded to it, with the saved adapter's own scaling (alpha is rescaled to
    the slot's rank), and under ``torch.compile`` nothing recompiles. Everything is checked
    before anything changes: if the call raises, the model is exactly as it was.

    ``model`` may be compiled or wrapped (DDP, or any module holding it as its only child): the
    saved paths are looked up at the model itself first, then under each such wrapper, then
    without the leading names all of them share (an adapter saved through a wrapper, loaded into
    the bare model); the first placement where every saved tensor exists with its type and shape
    is used. A directory that holds both formats' configs is refused.

    From peft's format this reads ``r``, ``lora_alpha``, ``target_modules`` (a list, or a regex
    that must fully match), ``exclude_modules``, ``layers_to_transform``/``layers_pattern``,
    ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``, ``lora_dropout`` and
    ``target_parameters`` (onto expert weights ``(E, out, in)``, or ``(E, in, out)`` where the
    module says ``is_transposed``); ``fan_in_fan_out`` follows the layer type, as in peft. The
    tensors of ``modules_to_save`` modules (so ``task_type="SEQ_CLS"`` heads) load as kind
    ``"full"``, the saved copies, and ``trainable_token_indices`` (or a ``TRAINABLE_TOKENS``
    adapter) as kind ``"tokens"``; other full
    tensors (``bias="all"`` or ``"lora_only"``; ``save_embedding_layers``) that equal the base are
    skipped, and the others become the exact update ``W_saved - W0``, a LoRA of full rank with an
    identity factor: then ``remove(merge=False)`` restores the base tensor and ``merge=True``
    writes the saved one. A tied embedding and head take one adapter, which both read; peft's
    updates of the two must agree (peft's ``ensure_weight_tying``, or an adapter saved here).
    An integer tensor of such a copy (a BatchNorm's ``num_batches_tracked``) has no update: where
    it differs from the model's, it is copied into it exactly (``remove`` does not undo that).
    A ``MultiheadAttention`` gets peft's semantics, in which out_proj's update counts twice.
    peft's ``LOHA``, ``LOKR``, ``OFT``, ``IA3`` and ``VERA`` adapters load as adapters of the
    kinds ``"loha"``, ``"lokr"``, ``"oft"``, ``"ia3"`` and ``"vera"``, their structure (LoKr's
    full or low-rank factors, OFT's block size) checked against the saved shapes.
    ``lora_bias`` (a bias on ``lora_B``) becomes the exact update ``s * b`` of the layer's bias,
    so a merge adds it to the bias as peft's does. ``adapter_model.bin`` (peft's
    ``safe_serialization=False``) is read with ``torch.load(weights_only=True)``: a pickle that
    asks for any object but tensors is refused, never run.
    What cannot be reproduced (other peft types, an update on one user of a tied tensor only,
    inits that change the base weights, grouped conv, ...) is refused.

    A ``.safetensors`` file (or a folder holding one, and no config) is read in the layout its
    keys say (see :mod:`lora_inject.io._kohya`): kohya-ss (``lora_unet_``, ``lora_te_``,
    ``lora_te1_``, ``lora_te2_``; ``lora_down``/``lora_up``/``alpha``, LoCon, Tucker's
    ``lora_mid``, ``dora_scale``), LyCORIS (LoHa ``hada_*`` and LoKr ``lokr_*`` as adapters of
    the kinds ``"loha"`` and ``"lokr"``, full ``diff``/``diff_b``) and diffusers (``unet.``,
    ``transformer.``, ``text_encoder.`` with ``lora_A``/``lora_B``, alphas from its metadata).
    ``model`` may then be a diffusers pipeline, each component taking its own keys; given a
    single module, a file of several components loads the one that fits the module and warns
    naming the others. The file's names are matched against the live model's (paths flattened
    with ``_``; a UNet's original ``input_blocks``/``middle_block``/``output_blocks`` names;
    Flux's original names, with its fused q/k/v projections split onto the model's). Keys that
    match no module are refused, listing them and the nearest module names; with
    ``strict=False`` they are skipped with a warning.

    Args:
        model (nn.Module or a diffusers pipeline): the base model, or a model that already
            carries the adapter; a pipeline for a diffusion file only.
        path (str or os.PathLike): a directory written by :func:`save_adapter` or by peft's
            ``save_pretrained``, or a diffusion ``.safetensors`` file (or a folder holding one).
        adapter (str, optional): the name to load it under. Default: the saved name for our
            format, ``"default"`` for peft's.
        dtype (torch.dtype, optional): the factors' dtype in the model. Default: as saved for
            our format; for peft's, float16 and bfloat16 factors are upcast to float32, as
            peft does by default (``autocast_adapter_dtype=True``); for a diffusion file, the
            adapted weight's dtype, as diffusers gives them.
        strict (bool): a diffusion file only: whether a key of the model's own component that
            matches none of its modules is refused (``True``), or skipped with a warning.
            Default: ``True``.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``path`` is not a str or
            ``os.PathLike`` of str, ``adapter`` is not a str, ``dtype`` is not a floating
            ``torch.dtype``, or a saved tensor has a dtype that LoRA factors cannot have.
        ValueError: if ``path`` is empty or holds no adapter, or two (both formats' configs),
            a diffusion file's keys match no module (or only some, with ``strict=True``),
            a file is missing, truncated or corrupt, the adapter was saved from another model
            (unknown module paths, other types or shapes), it does not match the adapter the
            model already carries (other tensors, a rank above the slot's), or peft's config
            uses a feature that cannot be translated.
    """
    fn = "load_adapter"
    if not diffusion.is_pipeline(model):
        _check_model(fn, model)
    path = _check_path(fn, path)
    if adapter is not None:
        check_adapter_name(fn, adapter)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{fn}(): `dtype` must be a floating torch.dtype or None, got {dtype!r}.")
    if not isinstance(strict, bool):
        raise TypeError(f"{fn}(): `strict` must be a bool, got {type(strict).__name__}.")
    has_config = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, c)) for c in (ours.CONFIG, peft_config.CONFIG))
    file = None if has_config else diffusion.find_file(path)
    if file is not None or diffusion.is_pipeline(model):
        if file is None:
            raise ValueError(f"{fn}(): `path` must be a .safetensors file of the kohya-ss, LyCORIS or diffusers "
                             f"layout (or a folder holding one) to load into a pipeline, got {path!r}.")
        diffusion.load(fn, model if diffusion.is_pipeline(model) else unwrapped(model), file,
                       adapter=adapter or "default", dtype=dtype, strict=strict)
        return model
    if not os.path.isdir(path):
        raise ValueError(f"{fn}(): `path` must be a directory written by save_adapter() or by "
                         f"peft's save_pretrained(), or a .safetensors file of the kohya-ss, LyCORIS or diffusers "
                         f"layout, got {path!r}, which is not a directory.")
    has_ours, has_peft = (os.path.exists(os.path.join(path, c)) for c in (ours.CONFIG, peft_config.CONFIG))
    if has_ours and has_peft:
        raise ValueError(
            f"{fn}(): {path!r} holds two adapters: {ours.CONFIG} + {ours.WEIGHTS} (lora_inject's format) and "
            f"{peft_config.CONFIG} + {peft_config.WEIGHTS} (peft's), so which one is meant is unclear. Delete the "
            "files of the one you do not want, or save the adapter again (save_adapter() leaves one adapter in a "
            "directory)."
        )
    copies = []
    if has_ours:
        saved_name, entries = ours.from_ours(fn, path)
        by_module: dict[str, list[Entry]] = {}
        for e in entries:
            by_module.setdefault(e.module, []).append(e)
        model_root, prefix = placed(model, by_module, lambda m, p: _fits(m, by_module[p]))
        entries = [dataclasses.replace(e, module=e.module[len(prefix):]) for e in entries]
    elif has_peft:
        saved = peft_config.read_peft(fn, path)
        model_root, _ = placed(model, saved.module_paths(),
                               lambda m, p: m is not None and not isinstance(m, LoRA))
        saved_name, (entries, copies) = "default", peft_entries(fn, model_root, saved)
    else:
        lone = [f for f in (ours.WEIGHTS, peft_config.WEIGHTS) if os.path.exists(os.path.join(path, f))]
        below = sorted(d for d in os.listdir(path) if any(  # peft saves a named adapter in a subfolder
            os.path.isfile(os.path.join(path, d, c)) for c in (ours.CONFIG, peft_config.CONFIG)))
        if lone:
            what = f"it has {lone[0]} but its config is missing"
        elif below:
            what = (f"it holds no adapter files itself, but its subfolder {below[0]!r} is an adapter: pass "
                    f"{os.path.join(path, below[0])!r}")
        else:
            what = "it holds no adapter files"
        raise ValueError(
            f"{fn}(): {path!r} is not an adapter directory: {what}. Expected {ours.CONFIG} + {ours.WEIGHTS} "
            f"(save_adapter) or {peft_config.CONFIG} + {peft_config.WEIGHTS} (peft)."
        )
    if dtype is None and has_peft:
        half = (torch.float16, torch.bfloat16)  # peft's autocast_adapter_dtype
        entries = [e.cast(torch.float32) if e.dtype in half else e for e in entries]
    elif dtype is not None:
        entries = [e.cast(dtype) for e in entries]
    apply(fn, model_root, entries, adapter or saved_name, copies)
    return model


def _check_model(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(): `model` must be an nn.Module, got {type(model).__name__}.")


def _check_path(fn: str, path: object) -> str:
    """``path`` as a str, or raise naming the argument."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}(): `path` must be a str or os.PathLike naming a directory, got "
                        f"{type(path).__name__}.")
    path = os.fspath(path)
    if not isinstance(path, str):  # an os.PathLike of bytes
        raise TypeError(f"{fn}(): `path` must name a directory as a str, got {type(path).__name__} from "
                        "os.fspath(path). Pass os.fsdecode(path).")
    if not path:
        raise ValueError(f"{fn}(): `path` must name a directory, got an empty string. Pass '.' for the "
                         "current directory.")
    return path


def _fits(module: nn.Module | None, saved: list[Entry]) -> bool:
    """Whether ``module`` holds the tensors of the entries ``saved``, with their type and shape."""
    if module is None or isinstance(module, LoRA):
        return False
    names = own_tensor_names(module)
    return all(quant.same_layer(e.type, type_name(module)) and e.tensor in names
               and tensor_shape(module, e.tensor) == tuple(e.shape) for e in saved)
