"""AdapterTrainer on a distributed engine, one rank of it: run by tests/test_trainer_distributed.py as

    accelerate launch --config_file tests/accelerate/ddp.yaml tests/_trainer_worker.py OUT
    accelerate launch --config_file tests/accelerate/fsdp2.yaml tests/_trainer_worker.py OUT --fsdp-on-cpu

Each rank trains the tiny GPT-2 of tests/_models.py for :data:`STEPS` steps with a checkpoint every
:data:`EVERY` steps (``OUT/whole``), then a fresh model resumed from the first checkpoint
(``OUT/resumed``), and writes the adapter's tensors after each run, and the rank's view of the
engine, to ``OUT/rank<k>.pt``.

``--fsdp-on-cpu``: accelerate 1.15 turns the FSDP plugin on only for accelerator backends
(``AcceleratorState.__init__`` checks ``distributed_type in [MULTI_GPU, MULTI_NPU, ...]``); on the
CPU, with gloo, it silently trains with DDP instead. This lifts that one check: after
``AcceleratorState.__init__`` has run on ``MULTI_CPU`` with an FSDP plugin, it does what that
branch does on an accelerator (``distributed_type = FSDP``, ``fsdp_plugin = plugin``), so that
accelerate's own FSDP2 path (``fsdp2_prepare_model``: ``fully_shard`` per block and the root,
its DCP checkpoints of the optimizer) runs as on GPUs. On a GPU machine run it without the flag.

The rank ends with ``os._exit`` once its process group is destroyed: gloo can abort at interpreter
exit after FSDP2's collectives ("terminate called without an active exception", a torch issue),
which would turn a finished run into a crash. A failure still exits non-zero, with its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS, EVERY, BATCH = 4, 2, 2  # BATCH rows per rank and step


def lift_fsdp_backend_check() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def adapted():
    import _models
    import torch

    import lora_inject as li

    model = _models.gpt2(head=True, seed=0)
    li.inject(model, "c_attn|c_fc", r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in li.lora_parameters(model):  # B too, so that every factor trains from step 1
            p.normal_(0, 0.1)
    return li.mark_only_lora_as_trainable(model)


def data():
    import _models
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _models.LM_VOCAB, (STEPS * BATCH * 2, 8), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def train(model, out: str, resume: str | None = None):
    from transformers import TrainingArguments

    from lora_inject.trainer import AdapterTrainer

    args = TrainingArguments(out, per_device_train_batch_size=BATCH, max_steps=STEPS, save_steps=EVERY,
                             learning_rate=1e-2, logging_steps=100, report_to=[], seed=3,
                             dataloader_num_workers=0, use_cpu=True, ddp_find_unused_parameters=False)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data())
    with warnings.catch_warnings():  # transformers' notes on CPU and its own deprecations
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(out: str) -> None:
    import torch
    import torch.distributed as dist

    import lora_inject as li

    whole = train(adapted(), os.path.join(out, "whole"))
    engine = {"fsdp": whole.is_fsdp_enabled, "ddp": type(whole.model_wrapped).__name__,
              "world": dist.get_world_size(), "backend": dist.get_backend(),
              "factor": type(next(p for n, p in whole.model.named_parameters() if "lora_A" in n)).__name__}
    first = li.lora_state_dict(whole.model)  # under FSDP2 a collective: full tensors on every rank
    resumed = train(adapted(), os.path.join(out, "resumed"), resume=os.path.join(out, "whole", f"checkpoint-{EVERY}"))
    second = li.lora_state_dict(resumed.model)
    torch.save({"whole": first, "resumed": second, "engine": engine},
               os.path.join(out, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    out, flags = sys.argv[1], sys.argv[2:]
    code = 0
    try:
        if "--fsdp-on-cpu" in flags:
            lift_fsdp_backend_check()
        main(out)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
