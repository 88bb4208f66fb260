"""DoRA benchmark: lora_inject's ``dora=True`` against peft's ``use_dora=True``, on bench.py's model.

Run: ``python benchmarks/bench_dora.py`` (``--quick`` for a smoke run, ``--device cuda`` on a GPU).
Same model, adapters (r=16, alpha=32 on q/k/v/o/gate/up/down) and method as ``bench.py``: a
training step with AdamW on one 512-token sequence, the contenders alternated and the median
reported; peak memory in a fresh subprocess per contender; unmerged eval forward (no_grad). Plain
LoRA from both libraries is measured alongside, for scale. Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench import ALPHA, REGEX, TARGETS, R, _rss, llama, make_step, sync, timed

import lora_inject as li


def c_lora_inject(base, dora=True):
    m = copy.deepcopy(base)
    li.inject(m, REGEX, r=R, alpha=ALPHA, dora=dora)
    li.mark_only_lora_as_trainable(m)
    return m


def c_peft(base, dora=True):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                          use_dora=dora))


CONTENDERS = {
    "lora_inject dora": c_lora_inject,
    "peft dora": c_peft,
    "lora_inject lora": lambda base: c_lora_inject(base, dora=False),
    "peft lora": lambda base: c_peft(base, dora=False),
}


def nonzero(model):
    """Give the adapters a non-zero update, as after some training."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)


def train_times(args):
    base = llama(*args.shape, device=args.device)
    ids = torch.randint(0, args.shape[4], (1, args.seq), device=args.device)
    steps = {}
    for name, make in CONTENDERS.items():
        model = make(base).train()
        nonzero(model)
        steps[name] = make_step(model, ids)
        steps[name]()  # warm-up: allocates the optimizer's state
    times = {n: [] for n in steps}
    for _ in range(args.reps):
        for n, step in steps.items():  # alternate the contenders
            times[n].append(timed(step, args.device))
    return {n: statistics.median(t) for n, t in times.items()}


def eval_times(args):
    base = llama(*args.shape, device=args.device).eval()
    ids = torch.randint(0, args.shape[4], (1, args.seq), device=args.device)
    models = {"base": base}
    for name in ("lora_inject dora", "peft dora"):
        models[name] = CONTENDERS[name](base).eval()
        nonzero(models[name])
    times = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)
        for _ in range(args.reps * 2):
            for n, m in models.items():
                times[n].append(timed(lambda m=m: m(input_ids=ids), args.device))
    return {n: statistics.median(t) for n, t in times.items()}


def peak_memory(args):
    out = {}
    for name in CONTENDERS:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        cmd = [sys.executable, __file__, "--_memory", name, "--device", args.device, "--seq", str(args.seq),
               "--threads", str(args.threads), "--shape", *map(str, args.shape)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _memory_child(args):
    torch.set_num_threads(args.threads)
    model = CONTENDERS[args._memory](llama(*args.shape, device=args.device)).train()
    nonzero(model)
    ids = torch.randint(0, args.shape[4], (1, args.seq), device=args.device)
    step = make_step(model, ids)
    step()
    gc.collect()
    if args.device == "cuda":
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set
        step()
        peak = _rss("VmHWM") - before
    print(json.dumps(peak / 2**20))


def table(res):
    rows = ["| figure | contender | median | ratio |", "|---|---|---|---|"]
    for fig, label, unit, ref in (("train", "training step", "ms", "peft dora"),
                                  ("memory", "training step peak memory", "MiB", "peft dora"),
                                  ("eval", "eval forward, unmerged", "ms", "base")):
        for n, v in res.get(fig, {}).items():
            value = f"{v * 1e3:.0f} ms" if unit == "ms" else f"{v:.0f} MiB"
            rows.append(f"| {label} | {n} | {value} | {v / res[fig][ref]:.3f}× {ref} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shape", type=int, nargs=5, default=[1024, 2816, 4, 16, 2000],
                   metavar=("HIDDEN", "INTER", "LAYERS", "HEADS", "VOCAB"))
    p.add_argument("--quick", action="store_true", help="a small model and few repetitions")
    p.add_argument("--json", default="benchmarks/results_dora.json")
    p.add_argument("--only", nargs="*", default=["train", "memory", "eval"])
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory:
        return _memory_child(args)
    if args.quick:
        args.shape, args.seq, args.reps = [256, 704, 2, 4, 500], 128, 3
    torch.set_num_threads(args.threads)
    res = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "torch": torch.__version__}
    for fig in args.only:
        t = time.perf_counter()
        res[fig] = {"train": train_times, "memory": peak_memory, "eval": eval_times}[fig](args)
        print(f"# {fig}: {json.dumps(res[fig])} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    print(table(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
