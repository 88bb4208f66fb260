"""Per-sample adapters: each sample of a batch runs with its own adapter, or none, in one forward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from torch import Tensor, nn

from ._sites import adapter_names, loras, module_loras
from .rule import type_name

__all__ = ["per_sample"]

M = TypeVar("M", bound=nn.Module)


@contextmanager
def per_sample(model: M, adapters: Sequence[str | None]) -> Iterator[M]:
    r"""Give sample ``i`` of each batch adapter ``adapters[i]`` (``None``: no adapter) inside the block.

    This is peft's ``adapter_names=`` without changing any forward signature: every factored
    layer (``Linear``, transformers' ``Conv1D``, ``Embedding``, ``EmbeddingBag``, ``Conv`` with
    ``groups=1``) computes its base output once for the whole batch, and each adapter's
    low-rank branch runs on the rows of the samples that chose it only (gathered, a view where
    they are contiguous, and added back in place), so a mixed batch costs about one adapter's.
    The batch is dim 0 of the input each adapted layer receives (for ``EmbeddingBag`` with
    ``offsets``, its bags; an unbatched input, a vector to ``Linear`` or ``(C, ...)`` to a conv,
    is one sample), and it must equal ``len(adapters)``: it is never guessed from a
    flattened shape. A layer that flattens its input itself (transformers' ``Conv1D`` turns
    ``(batch, seq, in)`` into ``(batch * seq, in)``) keeps each sample's rows together; a model
    that flattens the batch before the layer is refused. Inside the block the
    active adapters are ignored: a sample gets exactly its own adapter, and a layer without it
    gives that sample the base output. DoRA adapters work too (each sample gets its adapter's magnitude). On exit each
    layer is as before, also on error; blocks nest.

    It is for inference, as in peft: the model must be in eval mode. A layer whose adapters go
    through the merged path (``MultiheadAttention``, RNNs, ``Bilinear``, ``ConvTranspose``,
    grouped ``Conv``, your own types) builds one weight for the whole batch, so it cannot do
    this; if it carries one of ``adapters``, the call is refused.

    Args:
        model (nn.Module): a model with LoRA adapters.
        adapters (sequence of str or None): one entry per sample of the batches to run.

    Yields:
        ``model``.

    Raises:
        TypeError: if ``adapters`` is not a sequence of str or None.
        ValueError: if ``adapters`` is empty or names an adapter that is not in the model.
        ValueError: in the forward, if an adapted layer's input has a batch (dim 0) other than
            ``len(adapters)``.
        RuntimeError: if the model is in training mode, or a layer on the merged path carries
            one of ``adapters``; also, in the forward, if an adapted weight reaches an op with no
            factored form.

    Example::

        >>> model.eval()
        >>> with li.per_sample(model, ["task_a", "task_b", None]):
        ...     out = model(x)          # x: a batch of 3; the last sample runs the base model
    """
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not all(
            a is None or isinstance(a, str) for a in adapters):
        raise TypeError(f"per_sample(): `adapters` must be a sequence of str or None, one per sample, "
                        f"got {adapters!r}.")
    if not adapters:
        raise ValueError("per_sample(): `adapters` must name one adapter (or None) per sample, got an "
                         "empty sequence.")
    entries = list(loras(model))
    used = sorted({a for a in adapters if a is not None})
    if used:
        adapter_names("per_sample", entries, used)
    for site in entries:
        lora, module = site.lora, site.module
        if lora.training:
            raise RuntimeError("per_sample(): the model is in training mode; per-sample adapters are for "
                               "inference. Call model.eval() first.")
        mine = [a for a in used if a in lora.adapters]
        other = next((a for a in mine if lora.adapter(a).kind != "lora"), None)
        if other is not None:
            raise RuntimeError(
                f"per_sample(): adapter {other!r} on `{site.where}` is of kind "
                f"{lora.adapter(other).kind!r}, whose update is merged into one weight for the whole batch, "
                "so its samples cannot differ; per_sample() takes kind='lora' adapters only. Run one "
                "forward per adapter with li.activate() instead.")
        if mine and not lora.factored:
            where = site.where
            raise RuntimeError(
                f"per_sample(): `{where}` of {type_name(module)} `{site.path}` carries adapter {mine[0]!r} on "
                "the merged path, where one weight serves the whole batch, so its samples cannot differ. "
                "Per-sample adapters need layers with a factored form (Linear, Conv1D, Embedding, "
                "EmbeddingBag, Conv with groups=1); run one forward per adapter with li.activate() instead."
            )
    checked = {id(site.module): (site.path, site.module) for site in entries
               if site.lora.factored and any(a in site.lora.adapters for a in used)}
    saved = [(site.lora, site.lora.per_sample) for site in entries]
    handles = []
    try:
        for qualname, module in checked.values():
            handles.append(module.register_forward_pre_hook(_batch_check(qualname), with_kwargs=True))
        for lora, _ in saved:
            lora.per_sample = tuple(adapters)
        yield model
    finally:
        for lora, before in saved:
            lora.per_sample = before
        for h in handles:
            h.remove()


def _unbatched_dim(module: nn.Module) -> int | None:
    """How many dims an unbatched input of ``module`` has, where it takes one (Linear and Conv1D:
    a vector; Conv: channels and the spatial dims), else None (a lookup's indices are all batch)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return len(module.kernel_size) + 1
    return None if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else 1


def _batch_check(qualname: str):
    """A forward pre-hook: the batch of the adapted module's input (dim 0; ``EmbeddingBag``'s
    bags by its offsets) must be one sample per name given to :func:`per_sample`."""

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = next((lora.per_sample for lora in module_loras(module) if lora.per_sample is not None), None)
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        if names is None or not isinstance(x, Tensor) or x.dim() == 0:
            return
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        if isinstance(module, nn.EmbeddingBag) and isinstance(offsets, Tensor):
            batch = offsets.shape[0] - int(module.include_last_offset)
            what = f"{batch} bags (by its offsets)"
        elif x.dim() == _unbatched_dim(module):  # one sample: dim 0 is its features or channels
            batch, what = 1, f"one unbatched sample (an input of shape {tuple(x.shape)})"
        else:
            batch, what = x.shape[0], f"a batch of {x.shape[0]} (dim 0 of its input of shape {tuple(x.shape)})"
        if batch != len(names):
            raise ValueError(
                f"per_sample(): {len(names)} adapter names were given, one per sample, but {type_name(module)} "
                f"`{qualname}` received {what}. Pass one name per sample; the batch is read from dim 0 "
                "of each adapted layer's input, never guessed from a flattened shape.")

    return check
