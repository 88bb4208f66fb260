"""Two-rank CPU training runs for tests/test_distributed.py: gloo on loopback, bounded in time.

:func:`launch` forks ``WORLD`` processes that join one process group through a TCP store the
parent hosts on 127.0.0.1 (a free port the OS picks), run one scenario, and write what they
return (or their traceback) to a directory. The parent joins each with a deadline and kills
any process that overruns it.

Every run trains the same tiny float64 GPT-2 (:func:`adapted`) on the same batches
(:func:`batches`): rank ``k`` takes rows ``k::WORLD`` of each batch, so that the average of the
ranks' gradients is the gradient on the whole batch, which :func:`train_single` uses.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import _models
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2LMHeadModel

import lora_inject as li

WORLD = 2
STEPS = 3
BATCH = 4  # rows per step, all ranks together
SEQ = 8
VOCAB = _models.LM_VOCAB
TARGETS = r"c_attn|c_proj|c_fc"
KINDS = {  # inject's arguments for each kind of update; every one fits GPT-2's 32 and 128 features
    "lora": dict(r=4, alpha=8),
    "loha": dict(r=4, alpha=8),
    "lokr": dict(r=4, alpha=8),
    "oft": dict(r=4, oft_block_size=0),
    "ia3": dict(feedforward=r"mlp\.c_proj"),
    "vera": dict(r=4),
    "oft-coft": dict(kind="oft", r=4, oft_block_size=0, coft=True),  # projects oft_R in place in forward
}


def adapted(adapters: tuple[str, ...] = ("default",), *, inject: bool = True, kind: str = "lora") -> GPT2LMHeadModel:
    """The base model (seed 0, float64, no dropout), with ``adapters`` injected; only the first is
    active, of kind ``kind`` (the others LoRA)."""
    model = _models.gpt2(head=True, seed=0, dtype=torch.float64)
    if inject:
        for i, name in enumerate(adapters):
            if i == 0:
                kw = dict(KINDS[kind])
                li.inject(model, TARGETS, kind=kw.pop("kind", kind), adapter=name, **kw)
            else:
                li.inject(model, "c_attn", r=4, alpha=8, adapter=name)
        li.activate(model, adapters[0])
    return model


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(model: torch.nn.Module, forward: Callable, rows: slice) -> None:
    """AdamW on the trainable parameters of ``model``, through ``forward`` (the model or its wrapper)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in batches():
        ids = ids[rows]
        forward(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def train_single(adapters: tuple[str, ...] = ("default",), kind: str = "lora") -> GPT2LMHeadModel:
    """The single-process run on the whole batches: what every distributed run must reproduce."""
    model = adapted(adapters, kind=kind)
    li.mark_only_lora_as_trainable(model)
    train(model, model, slice(None))
    return model


def plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with each value a plain tensor (raises if one is still a DTensor or another subclass)."""
    return {k: v.detach().clone() for k, v in sd.items() if type(v) is torch.Tensor or _refuse(k, v)}


def _refuse(key: str, value: object) -> bool:
    raise TypeError(f"{key} is a {type(value).__name__}, not a full plain tensor")


# -- scenarios: each runs on every rank and returns what the test checks ------------------------
def ddp(rank: int, out: str, adapters=("default",), freeze_inactive=False, kind="lora", **ddp_kwargs) -> dict:
    model = adapted(adapters, kind=kind)
    li.mark_only_lora_as_trainable(model)
    if freeze_inactive:
        for p in li.lora_parameters(model, adapter=list(adapters[1:])):
            p.requires_grad_(False)
    wrapped = DistributedDataParallel(model, **ddp_kwargs)
    train(model, wrapped, slice(rank, None, WORLD))
    return {"lora": plain(li.lora_state_dict(model))}


def ddp_all_adapters_trainable(rank: int, out: str) -> dict:
    """Plain DDP with an inactive adapter left trainable: what DDP says about it."""
    try:
        ddp(rank, out, adapters=("default", "other"))
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None}


def fsdp2(rank: int, out: str, kind: str = "lora") -> dict:
    model = adapted(kind=kind)
    li.mark_only_lora_as_trainable(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    train(model, model, slice(rank, None, WORLD))
    if kind == "lora":
        factor = model.transformer.h[0].attn.c_attn.parametrizations.weight[0].lora_A["default"]
        sharded = type(factor).__name__, tuple(factor.to_local().shape)
    else:  # the type of every trained tensor of the kind
        sharded = sorted({type(p).__name__ for p in li.lora_parameters(model)})
    sd = li.lora_state_dict(model)  # a collective: every rank calls it
    try:  # the shards themselves: refused
        li.save_adapter(model, os.path.join(out, f"refused{rank}"))
        refused = None
    except RuntimeError as e:
        refused = str(e)
    # save_adapter reads the factors themselves: unshard every FSDP module, save on rank 0, reshard.
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.unshard()
    if rank == 0:
        li.save_adapter(model, os.path.join(out, "adapter"))
    for m in fsdp_modules:
        m.reshard()
    return {"lora": plain(sd), "sharded": sharded, "refused": refused}


def fsdp1(rank: int, out: str) -> dict:
    result = {}
    model = adapted()
    li.mark_only_lora_as_trainable(model)
    try:
        FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    except ValueError as e:
        result["flat"] = str(e)
    # With use_orig_params=True it wraps and trains, but the factors it holds are flat shards.
    model = li.mark_only_lora_as_trainable(adapted())
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    train(wrapped, wrapped, slice(rank, None, WORLD))
    for where, m in (("wrapper", wrapped), ("inner", wrapped.module)):
        for fn, call in (("lora_state_dict", li.lora_state_dict),
                         ("save_adapter", lambda m: li.save_adapter(m, os.path.join(out, f"flat{rank}")))):
            try:
                call(m)
            except RuntimeError as e:
                result[f"{fn} {where}"] = str(e)
    return result


SCENARIOS: dict[str, Callable[..., dict]] = {
    "ddp": ddp,
    "ddp_inactive_frozen": lambda rank, out: ddp(rank, out, ("default", "other"), freeze_inactive=True),
    "ddp_find_unused": lambda rank, out: ddp(rank, out, ("default", "other"), find_unused_parameters=True),
    "ddp_all_adapters_trainable": ddp_all_adapters_trainable,
    "fsdp2": fsdp2,
    "fsdp1": fsdp1,
}


# -- processes ------------------------------------------------------------------------------------
def _main(rank: int, port: int, scenario: str, out: str) -> None:
    torch.set_num_threads(1)  # WORLD ranks on the machine's cores; also keeps OpenMP fork-safe
    try:
        store = dist.TCPStore("127.0.0.1", port, WORLD + 1, is_master=False, timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=30))
        name, _, kind = scenario.partition(":")  # "ddp:loha": the scenario with a kind of update
        result = SCENARIOS[name](rank, out, **({"kind": kind} if kind else {}))
        dist.barrier()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(scenario: str, out: str, *, timeout: float = 60.0) -> list[dict]:
    """Run ``scenario`` on ``WORLD`` forked ranks; return each rank's result.

    The ranks are forked from this process, so what it has imported (torch, FSDP, transformers)
    is not imported again in each rank.

    Raises:
        RuntimeError: with the ranks' tracebacks if one failed, or if one ran past ``timeout``
            seconds (it is killed).
    """
    store = dist.TCPStore("127.0.0.1", 0, WORLD + 1, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("fork")  # no re-import of torch and transformers per rank
    procs = [ctx.Process(target=_main, args=(rank, store.port, scenario, out), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    late = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    del store
    errors = [open(os.path.join(out, f"rank{r}.err")).read()
              for r in range(WORLD) if os.path.exists(os.path.join(out, f"rank{r}.err"))]
    if late or errors:
        raise RuntimeError(f"scenario {scenario!r}: ranks {late} ran past {timeout} s and were killed; "
                           f"tracebacks:\n" + "\n".join(errors))
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
