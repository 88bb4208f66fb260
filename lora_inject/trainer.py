"""A ``transformers.Trainer`` whose checkpoints hold the adapter, not the whole model.

This module needs ``transformers``; the rest of lora_inject does not import it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers.trainer
from transformers import Trainer

from ._sites import loras
from .io import load_adapter, save_adapter
from .params import lora_parameters

__all__ = ["AdapterTrainer"]

TRAINING_ARGS = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME


@contextmanager
def _adapters_attached(model) -> Iterator[None]:
    """Tell transformers, while ``Trainer`` checks the model, that adapters are attached.

    ``Trainer`` refuses a model quantized by ``from_pretrained(quantization_config=...)`` unless
    it is a ``PeftModel`` or has ``_hf_peft_config_loaded`` set, the flag that transformers' own
    ``add_adapter``/``load_adapter`` set. A model with our adapters is set up for training the same
    way, so the flag is set for the check, and put back after: left set, transformers would look
    for a peft config that the model does not have (``model.load_adapter``, ``active_adapters``).
    """
    if not (isinstance(model, torch.nn.Module) and getattr(model, "is_quantized", False)
            and not getattr(model, "_hf_peft_config_loaded", False) and any(True for _ in loras(model))):
        yield
        return
    own = "_hf_peft_config_loaded" in vars(model)
    before = vars(model).get("_hf_peft_config_loaded")
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if own:
            model._hf_peft_config_loaded = before
        else:
            del model._hf_peft_config_loaded


class AdapterTrainer(Trainer):
    r"""``transformers.Trainer`` for a model adapted with :func:`lora_inject.inject`.

    Every checkpoint (``checkpoint-N/``) and :meth:`save_model` write the adapter with
    :func:`lora_inject.save_adapter`, with the optimizer, scheduler, RNG and trainer state that
    ``Trainer`` writes beside it, instead of the whole model. ``train(resume_from_checkpoint=...)``
    and ``load_best_model_at_end`` read it back with :func:`lora_inject.load_adapter`, into the
    same Parameters, so a resumed run trains on exactly as an uninterrupted one.
    ``lora_inject.load_adapter(base, "out/checkpoint-N")`` reads a checkpoint too.

    A model that transformers quantized (``from_pretrained(..., quantization_config=
    BitsAndBytesConfig(...))``) trains too: ``Trainer`` refuses a "purely quantized" model, and
    this one is told that adapters are attached, as peft's are.

    Under FSDP (accelerate's FSDP2: ``fully_shard`` per block and the root), ``Trainer`` would
    write each checkpoint as a sharded copy of the whole model (``pytorch_model_fsdp_0/``) and
    never call the save above. Here every rank unshards the adapted modules, the main one writes
    the adapter as it does without FSDP, and the optimizer's shards are written as accelerate
    writes them (``optimizer_0/``); a resumed run loads the adapter into the sharded factors, each
    rank its own shard, so it matches an uninterrupted run as under DDP.

    A checkpoint holds the adapter only, so only the adapter may train: :meth:`train` refuses a
    model with any other parameter that requires grad (call
    :func:`lora_inject.mark_only_lora_as_trainable` first). A module that trains whole, such as a
    new classification head, is part of the adapter with ``inject(..., modules_to_save=[...])``:
    it trains, and every checkpoint holds it. The optimizer that ``Trainer``
    builds then holds the factors alone, and its ``optimizer.pt`` stays small.

    Args:
        *args: as for ``transformers.Trainer``.
        adapter (str): the adapter to save. Default: ``"default"``.
        adapter_format (str): ``"lora_inject"`` or ``"peft"``; peft's format is also what
            ``peft.PeftModel.from_pretrained`` reads. Default: ``"lora_inject"``.
        **kwargs: as for ``transformers.Trainer``.

    Raises:
        ValueError: if ``adapter_format`` is unknown; from :meth:`train`, if a parameter
            outside adapter ``adapter`` requires grad, or if ``adapter_format="peft"`` cannot write
            its checkpoints (checked before the first step); when saving, as
            :func:`~lora_inject.save_adapter` raises (no adapter ``adapter`` in the model, or for
            peft's format a tensor it cannot express).

    Example::

        >>> li.inject(model, ["query", "value"], r=8)
        >>> trainer = AdapterTrainer(model=model, args=TrainingArguments("out", save_steps=100),
        ...                          train_dataset=data)
        >>> trainer.train()                                    # out/checkpoint-100/adapter.json, ...
        >>> trainer.train(resume_from_checkpoint=True)         # picks up where it stopped
        >>> li.load_adapter(base, "out/checkpoint-100")
    """

    def __init__(self, *args, adapter: str = "default", adapter_format: str = "lora_inject", **kwargs) -> None:
        if adapter_format not in ("lora_inject", "peft"):
            raise ValueError(f"AdapterTrainer(): `adapter_format` must be 'lora_inject' or 'peft', got "
                             f"{adapter_format!r}.")
        model = kwargs.get("model", args[0] if args else None)
        with _adapters_attached(model):
            super().__init__(*args, **kwargs)
        self.adapter, self.adapter_format = adapter, adapter_format

    def train(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not any(self.adapter in site.lora.adapters for site in loras(model)):
            raise ValueError(f"AdapterTrainer.train(): the model has no adapter {self.adapter!r} to train. Adapt it "
                             "with lora_inject.inject(), or pass `adapter=` with the name it has.")
        ours = {id(p) for p in lora_parameters(model, self.adapter)}
        loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
        if loose:
            raise ValueError(f"AdapterTrainer.train(): {len(loose)} parameters outside adapter {self.adapter!r} "
                             f"require grad ({loose[:3]}...), but a checkpoint holds the adapter alone, so "
                             "resuming would lose what they learnt. To train a module whole (a new task head), "
                             "make it part of the adapter: inject(..., modules_to_save=['classifier']), as peft's "
                             "modules_to_save; else call lora_inject.mark_only_lora_as_trainable(model) first, "
                             "or freeze them.")
        if self.adapter_format == "peft":  # a checkpoint peft's format cannot write: refused before any step
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    save_adapter(model, tmp, adapter=self.adapter, format="peft")
                except ValueError as e:
                    raise ValueError(f"AdapterTrainer.train(): the checkpoints of adapter {self.adapter!r} "
                                     f"cannot be written with adapter_format='peft': {e} Or pass "
                                     "adapter_format='lora_inject'.") from e
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # FSDP: Trainer would gather the whole model (FULL_STATE_DICT) or write nothing here
        # (SHARDED_STATE_DICT, whose model shards go with the optimizer's). Every rank gathers the
        # adapted modules' tensors, the main one writes the adapter, every rank frees them again.
        from torch.distributed.fsdp import FSDPModule

        shards = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in shards:
            m.unshard()
        try:
            self._save(output_dir)
        finally:
            for m in shards:
                m.reshard()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The optimizer, scheduler and RNG states as Trainer writes them, without its sharded copy
        # of the whole model (save_model has written the adapter).
        save_fsdp_model = transformers.trainer.save_fsdp_model
        transformers.trainer.save_fsdp_model = lambda *args, **kwargs: None
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            transformers.trainer.save_fsdp_model = save_fsdp_model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_adapter(model, output_dir, adapter=self.adapter, format=self.adapter_format)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_adapter(self.model if model is None else model, resume_from_checkpoint, adapter=self.adapter)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint, adapter=self.adapter)
