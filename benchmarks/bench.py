"""Benchmarks: lora_inject against peft, loralib, a plain merged parametrization and the frozen floor.

Run: ``python benchmarks/bench.py`` (``--quick`` for a smoke run, ``--device cuda`` on a GPU,
``--dora`` to add DoRA from both libraries to the training and eval figures; ``--only qlora
qlora_memory`` for QLoRA on bitsandbytes NF4 against peft's and against our fp32 LoRA; ``--only
sdxl_load`` for loading a full-size SDXL LoRA file against diffusers' ``load_lora_weights``).
Every figure is measured in one run, alternating the contenders, and reported as medians. Peak
memory on CPU is measured in a fresh subprocess per contender, with glibc told to return every
large block at once, so that the peak resident set tracks live tensors; on CUDA it is
``torch.cuda.max_memory_allocated``. It prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

import lora_inject as li

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REGEX = r"(q|k|v|o|gate|up|down)_proj$"
R, ALPHA = 16, 32


def llama(hidden=1024, inter=2816, layers=4, heads=16, vocab=2000, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


# -- contenders: each returns (model, trainable parameters) ----------------------------------
def c_lora_inject(base, dora=False):
    m = copy.deepcopy(base)
    li.inject(m, REGEX, r=R, alpha=ALPHA, dora=dora)
    li.mark_only_lora_as_trainable(m)
    return m


def c_peft(base, dora=False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=dora)
    return get_peft_model(copy.deepcopy(base), config)


def c_loralib(base):
    import loralib

    m = copy.deepcopy(base)
    for name, mod in list(m.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            new = loralib.Linear(mod.in_features, mod.out_features, r=R, lora_alpha=ALPHA,
                                 bias=mod.bias is not None, merge_weights=False).to(mod.weight.device)
            new.weight = mod.weight
            parent = m.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], new)
    loralib.mark_only_lora_as_trainable(m)
    return m


class PlainLoRA(nn.Module):
    """The plain merged parametrization: ``W0 + s * B @ A`` rebuilt on every read."""

    def __init__(self, w):
        super().__init__()
        self.A = nn.Parameter(torch.empty(R, w.shape[1], device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(w.shape[0], R, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, w):
        return w + (ALPHA / R) * self.B @ self.A


def c_plain(base):
    m = copy.deepcopy(base)
    for name, mod in m.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            parametrize.register_parametrization(mod, "weight", PlainLoRA(mod.weight))
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith((".A", ".B")))
    return m


def c_floor(base):
    m = copy.deepcopy(base)
    for n, p in m.named_parameters():
        p.requires_grad_("embed_tokens" in n)
    return m


CONTENDERS = {"lora_inject": c_lora_inject, "peft": c_peft, "loralib": c_loralib,
              "plain merged": c_plain, "frozen floor": c_floor}
DORA = {"lora_inject dora": lambda base: c_lora_inject(base, dora=True),
        "peft dora": lambda base: c_peft(base, dora=True)}




def bnb4(base):
    """A copy of ``base`` with every decoder projection in bitsandbytes' NF4 ``Linear4bit``."""
    import bitsandbytes as bnb

    m = copy.deepcopy(base)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      quant_type="nf4", compute_dtype=torch.float32)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data)
                setattr(parent, name, q.to(child.weight.device))
    m.is_loaded_in_4bit = True  # as transformers' quantizer marks it: peft then uses its bnb layers
    return m


def c_qlora_ours(base):
    return c_lora_inject(bnb4(base))


def c_qlora_peft(base):
    return c_peft(bnb4(base))


QLORA = {"lora_inject qlora": c_qlora_ours, "peft qlora": c_qlora_peft, "lora_inject fp32": c_lora_inject}

# -- other kinds of update: each of ours against peft's same kind, same targets, rank and alpha --
# LoHa and LoKr: r=16, alpha=32, as our LoRA. OFT: peft's defaults for both (r=0 and
# oft_block_size=32, the Cayley-Neumann series of 5 terms). IA3: down_proj's input scaled, the
# others' output, as peft's defaults for Llama (feedforward_modules=["down_proj"]). VeRA: peft's
# default r=256 (one pair of shared projections), d_initial=0.1; "vera-r16" is VeRA at our LoRA's rank.
VERA_R = 256
KIND_OPTIONS = {"loha": dict(r=R, alpha=ALPHA), "lokr": dict(r=R, alpha=ALPHA), "oft": {},
                "ia3": dict(feedforward=r"down_proj$"), "vera": dict(r=VERA_R)}


def peft_kind_config(kind, random=False, **options):
    """peft's config of ``kind`` matching KIND_OPTIONS, updated by ``options``; ``random``: non-identity init."""
    import peft

    if kind == "ia3":
        return peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"],
                              init_ia3_weights=not random)
    config = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "oft": peft.OFTConfig,
              "vera": peft.VeraConfig}[kind]
    return config(target_modules=TARGETS, init_weights=not random, **{**KIND_OPTIONS[kind], **options})


def c_kind_ours(base, kind, **options):
    m = copy.deepcopy(base)
    li.inject(m, REGEX, kind=kind, **{**KIND_OPTIONS[kind], **options})
    li.mark_only_lora_as_trainable(m)
    return m


def c_kind_peft(base, kind, random=False, **options):
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), peft_kind_config(kind, random, **options))


KIND_NAMES = ("loha", "lokr", "oft", "ia3", "vera")
KINDS = {"lora_inject lora": c_lora_inject}
for _k in KIND_NAMES:
    KINDS[f"lora_inject {_k}"] = lambda base, k=_k: c_kind_ours(base, k)
    KINDS[f"peft {_k}"] = lambda base, k=_k: c_kind_peft(base, k)
KINDS["lora_inject vera-r16"] = lambda base: c_kind_ours(base, "vera", r=R)
KINDS["peft vera-r16"] = lambda base: c_kind_peft(base, "vera", r=R)
KINDS["frozen floor"] = c_floor  # no adapter; the gradient still flows to the embedding
ALL = {**CONTENDERS, **DORA, **QLORA, **KINDS}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def copy_peft_tensors(ours, theirs, kind):
    """Copy peft's adapter tensors into ours, by name (the kinds use peft's tensor names)."""
    inner = theirs.base_model.model
    copied = 0
    with torch.no_grad():
        for qualname, lora in li.named_loras(ours):
            layer = inner.get_submodule(qualname.rsplit(".", 1)[0])
            for name, t in lora.tensors("default").items():
                if kind == "vera" and name in ("vera_A", "vera_B"):
                    src = getattr(theirs.base_model, name)["default"]
                    src = src[:t.shape[0], :t.shape[1]]
                else:
                    holder = getattr(layer, "oft_R" if kind == "oft" else name)["default"]
                    src = holder.weight if isinstance(holder, nn.Module) else holder
                t.copy_(src.reshape(t.shape))
                copied += 1
    return copied


def check_kinds(args):
    """Before timing: on a tiny Llama, each kind of ours with peft's random adapter tensors copied in
    gives peft's logits, and on the benchmark's shape both train the same number of parameters."""
    out = {}
    tiny = llama(64, 192, 2, 4, 100)  # 192: a multiple of OFT's block size
    ids = torch.randint(0, 100, (2, 16))
    full = llama(*args.shape, device="meta")
    for kind in KIND_NAMES:
        theirs = c_kind_peft(tiny, kind, random=True).eval()
        ours = c_kind_ours(tiny, kind).eval()
        copied = copy_peft_tensors(ours, theirs, kind)
        with torch.no_grad():
            want, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
            plain = tiny(input_ids=ids).logits
        err = float((got - want).abs().max())
        moved = float((want - plain).abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        counts = (trainable(c_kind_ours(full, kind)), trainable(c_kind_peft(full, kind)))
        if counts[0] != counts[1]:
            raise RuntimeError(f"{kind}: lora_inject trains {counts[0]} parameters, peft {counts[1]}")
        out[kind] = {"trainable": counts[0], "tensors copied": copied, "max |ours - peft|": err,
                     "max |peft - base|": moved}
        print(f"# {kind}: {counts[0]} trainable parameters in both; tiny model, peft's tensors copied in "
              f"({copied}): max |ours - peft| = {err:.2e} (the update moves the logits by {moved:.2e})",
              file=sys.stderr)
    return out


def contenders(args):
    return {**CONTENDERS, **(DORA if args.dora else {})}


def nonzero(model):
    """Give the adapters a non-zero update, as after some training (DoRA's norms depend on it)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.01)
    return model


def make_step(model, ids, autocast=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = ids.device.type

    def step():
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


# -- figures ---------------------------------------------------------------------------------
AUTOCAST = ("lora_inject", "peft", "frozen floor")  # the contenders of the bf16 autocast step


def train_times(args, autocast=None, which=None):
    base = llama(*args.shape, device=args.device)
    ids = torch.randint(0, args.shape[4], (1, args.seq), device=args.device)
    steps = {}
    for name, make in (which or contenders(args)).items():
        if autocast is not None and name not in AUTOCAST:
            continue
        model = nonzero(make(base).train())
        steps[name] = make_step(model, ids, autocast)
        steps[name]()  # warm-up: allocates the optimizer's state
    times = {n: [] for n in steps}
    for _ in range(args.reps):
        for n, step in steps.items():  # alternate the contenders
            times[n].append(timed(step, args.device))
    return {n: statistics.median(t) for n, t in times.items()}


EVAL_TOKENS = (256, 32)


def eval_times(args):
    """Unmerged eval forwards at each of EVAL_TOKENS, in one process, the models alternating."""
    base = llama(*args.shape, device=args.device).eval()
    models = {"base": base}
    for name in ("lora_inject", "peft", *(DORA if args.dora else ())):
        models[name] = nonzero(contenders(args)[name](base).eval())
    models["lora_inject cached"] = copy.deepcopy(models["lora_inject"])  # run inside li.cached()
    out = {}
    for tokens in EVAL_TOKENS:
        ids = torch.randint(0, args.shape[4], (1, tokens), device=args.device)
        times = {n: [] for n in models}
        reps = args.reps * 2 * max(1, 256 // tokens // 2)  # short forwards: more of them
        with torch.no_grad(), li.cached(models["lora_inject cached"]):
            for m in models.values():
                m(input_ids=ids)  # warm-up; fills the cache
            for _ in range(reps):
                for n, m in models.items():
                    times[n].append(timed(lambda m=m: m(input_ids=ids), args.device))
        out[f"T={tokens}"] = {n: statistics.median(t) for n, t in times.items()}
    return out


def peak_memory(args, which=None):
    out = {}
    for name in which or contenders(args):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        cmd = [sys.executable, __file__, "--_memory", name, "--device", args.device, "--seq", str(args.seq),
               "--threads", str(args.threads), "--shape", *map(str, args.shape), *(["--dora"] if args.dora else [])]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _memory_child(args):
    torch.set_num_threads(args.threads)
    model = nonzero(ALL[args._memory](llama(*args.shape, device=args.device)).train())
    ids = torch.randint(0, args.shape[4], (1, args.seq), device=args.device)
    step = make_step(model, ids)
    step()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
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


# -- loading a full-size SDXL LoRA file -------------------------------------------------------------
SDXL_UNET = dict(  # SDXL base 1.0's UNet, as its config.json has it
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_TARGETS = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$|ff\.net\.(0\.proj|2)$"  # every attention and FF projection


def sdxl_unet(dtype=torch.float16):
    """SDXL's UNet at full size, built on meta and given uninitialised storage in ``dtype`` (a load
    only writes the adapters; the base values do not matter to it)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    return unet.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)


def sdxl_file(path, r=32):
    """A kohya-ss SDXL LoRA (original block names, as kohya-ss writes SDXL), rank ``r`` on every
    attention and feed-forward projection, synthetic float16 weights; returns its module count."""
    import re

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from lora_inject.io._aliases import _unet_blocks

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    original = {p: n for n, p in _unet_blocks(unet).items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Linear) and re.search(SDXL_TARGETS, name):
            k = "lora_unet_" + original[name].replace(".", "_")
            sd[f"{k}.lora_down.weight"] = (torch.randn(r, m.in_features, generator=g) * 0.01).half()
            sd[f"{k}.lora_up.weight"] = (torch.randn(m.out_features, r, generator=g) * 0.01).half()
            sd[f"{k}.alpha"] = torch.tensor(float(r)).half()
    save_file(sd, path)
    return len(sd) // 3


def _sdxl_load_child(args):
    """One load in this fresh process: ``(seconds, peak resident bytes it added)``."""
    import warnings

    torch.set_num_threads(args.threads)
    unet = sdxl_unet()
    if args._sdxl == "diffusers":
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=DDIMScheduler())
        load = lambda: pipe.load_lora_weights(args._file)  # noqa: E731
    else:
        load = lambda: li.load_adapter(unet, args._file)  # noqa: E731
    gc.collect()
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        load()
        seconds = time.perf_counter() - t
    peak = _rss("VmHWM") - before
    adapted = sum(1 for _ in li.named_loras(unet)) if args._sdxl != "diffusers" else sum(
        1 for m in unet.modules() if hasattr(m, "lora_A"))
    print(json.dumps({"seconds": seconds, "peak": peak / 2**20, "modules": adapted}))


def sdxl_load(args):
    """Loading a full-size SDXL LoRA file (rank 32 on every attention and feed-forward projection of
    its UNet, 700 modules, kohya-ss layout) into SDXL's float16 UNet: ours against diffusers'
    ``load_lora_weights``, each run in a fresh process (alternating), medians of the time and of
    the peak resident memory the load adds."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        file = os.path.join(d, "sdxl_lora.safetensors")
        modules = sdxl_file(file)
        runs = {"lora_inject": [], "diffusers": []}
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        for _ in range(max(1, args.inject_reps)):
            for name in runs:
                cmd = [sys.executable, __file__, "--_sdxl", name, "--_file", file, "--threads", str(args.threads)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
        for name, rs in runs.items():
            if any(r["modules"] != modules for r in rs):
                raise RuntimeError(f"sdxl_load: {name} adapted {rs[0]['modules']} modules, not the file's {modules}")
    return {name: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "peak MiB": statistics.median(r["peak"] for r in rs)} for name, rs in runs.items()}


MIXED = 4  # adapters in the mixed batch, two samples each


def mixed_times(args):
    """A no-grad forward of 8 sequences of 64 tokens: one adapter for the whole batch, against four
    adapters of two samples each, ours (per_sample) and peft's (adapter_names=)."""
    from peft import LoraConfig, get_peft_model

    base = llama(*args.shape, device=args.device).eval()
    names = [f"task{i}" for i in range(MIXED)]
    ours = copy.deepcopy(base)
    theirs = None
    for i, name in enumerate(names):
        li.inject(ours, REGEX, r=R, alpha=ALPHA, adapter=name)
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
        if theirs is None:
            theirs = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    nonzero(ours), nonzero(theirs.eval())
    one = copy.deepcopy(ours)
    li.activate(one, names[0])
    ids = torch.randint(0, args.shape[4], (2 * MIXED, 64), device=args.device)
    choice = [n for n in names for _ in range(2)]

    def run_ours():
        with li.per_sample(ours, choice):
            ours(input_ids=ids)

    runs = {"one adapter, whole batch": lambda: one(input_ids=ids), "lora_inject per_sample": run_ours,
            "peft adapter_names": lambda: theirs(input_ids=ids, adapter_names=choice)}
    times = {n: [] for n in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.reps * 2):
            for n, fn in runs.items():
                times[n].append(timed(fn, args.device))
    return {n: statistics.median(t) for n, t in times.items()}


MANY = 32  # adapters in the mixed batch, one sample each
MANY_RESIDENT = 128  # adapters on the model, of ranks MANY_RANKS in turn
MANY_RANKS = (4, 8, 16)


def many_times(args):
    """A no-grad forward of 32 sequences of 16 tokens, each sample with its own adapter, on a model
    with 128 resident adapters of ranks 4, 8 and 16 (per_sample: every adapter of a layer stacked,
    padded to rank 16, gathered per sample, two bmm), against the same batch on one adapter of rank
    16 and on the base model; and peft's adapter_names over the same 32 adapters (only those
    resident: it loops over them)."""
    from peft import LoraConfig, get_peft_model

    base = llama(*args.shape, device=args.device).eval()
    names = [f"task{i}" for i in range(MANY_RESIDENT)]
    ranks = {n: MANY_RANKS[i % len(MANY_RANKS)] for i, n in enumerate(names)}
    ours = copy.deepcopy(base)
    for name in names:
        li.inject(ours, REGEX, r=ranks[name], alpha=2 * ranks[name], adapter=name)
    used = names[::MANY_RESIDENT // MANY][:MANY]  # every 4th: all three ranks
    theirs = None
    for name in used:
        config = LoraConfig(r=ranks[name], lora_alpha=2 * ranks[name], target_modules=TARGETS)
        if theirs is None:
            theirs = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    nonzero(ours), nonzero(theirs.eval())
    one = li.inject(copy.deepcopy(base), REGEX, r=max(MANY_RANKS), alpha=2 * max(MANY_RANKS))
    nonzero(one)
    ids = torch.randint(0, args.shape[4], (MANY, 16), device=args.device)

    def run_ours():
        with li.per_sample(ours, used):
            ours(input_ids=ids)

    runs = {"base model": lambda: base(input_ids=ids), "one adapter, whole batch": lambda: one(input_ids=ids),
            "lora_inject per_sample": run_ours, "peft adapter_names": lambda: theirs(input_ids=ids, adapter_names=used)}
    return alternate(runs, args.reps * 2, args.device)


STORE_ADAPTERS, STORE_SLOTS, STORE_BATCH, STORE_BATCHES, STORE_ROUNDS = 1000, 16, 8, 300, 3


def store_times(args):
    """A stream of requests over 1,000 small adapters (ranks 4 and 8 on q and v of a small
    Llama-shaped model) saved on disk, served by an AdapterStore with 16 slots: batches of 8
    requests of 32 tokens, each naming an adapter drawn from a Zipf law (s = 1.1), the next batch
    prefetched while the current one runs. Reports requests per second (the median of three whole
    passes, the modes in turn) and the slot hit rate, against the same stream with no prefetch,
    and the same batches on one resident adapter."""
    import random
    import tempfile

    hidden = 256 if args.quick else 512
    base = llama(hidden, 2 * hidden, 2, 4, 1000, device=args.device).eval()
    targets = ["q_proj", "v_proj"]
    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.1 for k in range(STORE_ADAPTERS)]
    batches = [rng.choices(range(STORE_ADAPTERS), weights, k=STORE_BATCH)
               for _ in range(STORE_BATCHES // 3 if args.quick else STORE_BATCHES)]
    ids = torch.randint(0, 1000, (STORE_BATCH, 32), device=args.device)
    out = {}
    with tempfile.TemporaryDirectory() as root:
        made = {r: li.inject(copy.deepcopy(base), targets, r=r, alpha=16) for r in (8, 4)}
        gen = torch.Generator().manual_seed(0)
        for k in range(STORE_ADAPTERS):
            model = made[8 if k % 2 else 4]
            with torch.no_grad():
                for p in li.lora_parameters(model):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            li.save_adapter(model, os.path.join(root, f"a{k}"))
        one = made[8]
        names = [[f"a{k}" for k in b] for b in batches]
        rates = {"prefetch": [], "no prefetch": []}
        for _ in range(STORE_ROUNDS):  # whole passes, the two modes in turn, each with a fresh store
            for mode in rates:
                store = li.AdapterStore(copy.deepcopy(base), root, slots=STORE_SLOTS, targets=targets, r=8)
                t = time.perf_counter()
                with torch.no_grad():
                    for i, batch in enumerate(names):
                        if mode == "prefetch" and i + 1 < len(names):
                            store.prefetch(names[i + 1])
                        with store.serve(batch) as model:
                            model(input_ids=ids)
                sync(args.device)
                rates[mode].append(STORE_BATCH * len(batches) / (time.perf_counter() - t))
                store.close()
                out[f"store, {mode}"] = {"requests/s": statistics.median(rates[mode]), "hit rate": store.hit_rate}
        t = time.perf_counter()
        with torch.no_grad():
            for _ in batches:
                one(input_ids=ids)
        sync(args.device)
        out["one resident adapter"] = {"requests/s": STORE_BATCH * len(batches) / (time.perf_counter() - t),
                                       "hit rate": 1.0}
    return out


def alternate(runs, reps, device):
    """Each of ``runs`` once to warm up, then ``reps`` rounds of all of them in turn: their median times."""
    times = {n: [] for n in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(reps):
            for n, fn in runs.items():
                times[n].append(timed(fn, device))
    return {n: statistics.median(t) for n, t in times.items()}


def weight_bytes(args):
    """The MiB each QLoRA contender's model holds in weights: every parameter and buffer once, a
    4-bit weight with its quantization state."""
    base = llama(*args.shape, device=args.device)
    out = {}
    for name, make in QLORA.items():
        model, seen, total = make(base), set(), 0
        for t in [*model.parameters(), *model.buffers()]:
            qs = getattr(t, "quant_state", None)
            parts = [t] + ([qs.absmax, getattr(qs, "code", None)] if qs is not None else [])
            for p in parts:
                if p is not None and p.untyped_storage().data_ptr() not in seen:
                    seen.add(p.untyped_storage().data_ptr())
                    total += p.untyped_storage().nbytes()
        out[name] = total / 2**20
        del model
    return out


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def inject_times(args):
    from peft import LoraConfig, get_peft_model

    cfg = dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000, device="meta")
    times = {"lora_inject": [], "peft": []}
    for _ in range(args.inject_reps):
        m = llama(**cfg)
        times["lora_inject"].append(timed(lambda: li.inject(m, REGEX, r=R, alpha=ALPHA), "cpu"))
        m = llama(**cfg)
        conf = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
        times["peft"].append(timed(lambda: get_peft_model(m, conf), "cpu"))
    return {n: statistics.median(t) for n, t in times.items()}


class Small(nn.Module):
    """A Linear(64, 64) and a Conv2d(8, 8, 3): layers small enough that the fixed cost shows."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, y):
        return self.fc(x), self.conv(y)


def small_times(args):
    """The fixed cost per adapted layer: no-grad forwards of each layer, and a training step
    (forward and backward) of both, for the plain layers, lora_inject and peft, alternating."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Small()
    ours = li.mark_only_lora_as_trainable(li.inject(copy.deepcopy(base), "fc|conv", r=4))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["fc", "conv"])).base_model.model
    x, y = torch.randn(4, 64), torch.randn(1, 8, 8, 8)
    models = {"plain": base, "lora_inject": ours, "peft": theirs}

    def step(m):
        a, b = m(x, y)
        (a.sum() + b.sum()).backward()

    figures = {"Linear(64, 64) no-grad forward": lambda m: m.fc(x),
               "Conv2d(8, 8, 3) no-grad forward": lambda m: m.conv(y),
               "training step of both": step}
    out = {}
    for label, fn in figures.items():
        times = {n: [] for n in models}
        with torch.set_grad_enabled(label.startswith("training")):
            for _ in range(args.reps * 20):
                for n, m in models.items():
                    t = time.perf_counter()
                    for _ in range(20):
                        fn(m)
                    times[n].append((time.perf_counter() - t) / 20)
        out[label] = {n: statistics.median(t) for n, t in times.items()}
    return out


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convs with batch norm, and a 1x1 conv on the skip where the
    shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


def resnet(widths=(32, 64, 128, 256), classes=10):
    """A ResNet-18-shaped conv net (two basic blocks per stage) for 32x32 images."""
    layers, cin = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
    for i, w in enumerate(widths):
        layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
        cin = w
    torch.manual_seed(0)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def conv_times(args):
    """A training step of a ResNet-shaped conv net with LoRA (r=8) on every conv, against peft's, and
    the net with no adapter, training only its stem's norm (the floor: the gradient still flows
    through every layer), alternating."""
    from peft import LoraConfig, get_peft_model

    base = resnet()
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    ours = li.mark_only_lora_as_trainable(li.inject(copy.deepcopy(base), convs, r=8, alpha=16))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=convs))
    floor = copy.deepcopy(base)
    for n, p in floor.named_parameters():  # only the stem's norm: the gradient flows through every conv
        p.requires_grad_(n.startswith("1."))
    batch = 4 if args.quick else 16
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    steps = {}
    for name, m in {"lora_inject": nonzero(ours), "peft": nonzero(theirs), "frozen floor": floor}.items():
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        steps[name] = step
    times = {n: [] for n in steps}
    for _ in range(args.reps * 3):
        for n, step in steps.items():
            times[n].append(timed(step, "cpu"))
    return {n: statistics.median(t) for n, t in times.items()}


def merge_times(args):

    base = llama(hidden=4096, inter=11008, layers=1, heads=32, vocab=256, device=args.device)
    times = {"lora_inject": [], "peft": []}
    for _ in range(args.inject_reps):
        ours = nonzero(c_lora_inject(base))
        times["lora_inject"].append(timed(lambda m=ours: li.remove(m, merge=True), args.device))
        theirs = nonzero(c_peft(base))
        times["peft"].append(timed(lambda m=theirs: m.merge_and_unload(), args.device))
        del ours, theirs
        gc.collect()
    return {n: statistics.median(t) for n, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--inject-reps", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=5, default=[1024, 2816, 4, 16, 2000],
                   metavar=("HIDDEN", "INTER", "LAYERS", "HEADS", "VOCAB"))
    p.add_argument("--quick", action="store_true", help="a small model and few repetitions")
    p.add_argument("--dora", action="store_true", help="add DoRA (lora_inject and peft) to train, memory, eval")
    p.add_argument("--json", default="benchmarks/results.json")
    p.add_argument("--only", nargs="*", default=["train", "train_bf16", "memory", "eval", "inject", "merge", "small"])
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    p.add_argument("--_sdxl", help=argparse.SUPPRESS)
    p.add_argument("--_file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory:
        return _memory_child(args)
    if args._sdxl:
        return _sdxl_load_child(args)
    if args.quick:
        args.shape, args.seq, args.reps, args.inject_reps = [256, 704, 2, 4, 500], 128, 3, 1
    torch.set_num_threads(args.threads)
    res = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
           "torch": torch.__version__}
    if "kinds" in args.only and "kinds_check" not in args.only:  # the same math, checked before timing
        args.only.insert(args.only.index("kinds"), "kinds_check")
    for fig in args.only:
        t = time.perf_counter()
        res[fig] = {"train": train_times, "train_bf16": lambda a: train_times(a, torch.bfloat16),
                    "memory": peak_memory, "eval": eval_times, "inject": inject_times,
                    "merge": merge_times, "small": small_times, "conv": conv_times,
                    "qlora": lambda a: train_times(a, which=QLORA),
                    "qlora_memory": lambda a: peak_memory(a, which=QLORA),
                    "qlora_weights": weight_bytes, "mixed": mixed_times, "many": many_times, "store": store_times,
                    "kinds_check": check_kinds,
                    "kinds": lambda a: train_times(a, which=KINDS),
                    "kinds_memory": lambda a: peak_memory(a, which=KINDS), "sdxl_load": sdxl_load}[fig](args)
        print(f"# {fig}: {json.dumps(res[fig])} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    print(table(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)


def table(res):
    rows = ["| figure | contender | median | ratio | goal |", "|---|---|---|---|---|"]
    if "train" in res:
        t = res["train"]
        for n, v in t.items():
            if n.endswith("dora"):
                ratio, goal = f"{v / t['peft dora']:.3f}× peft dora", ""
            else:
                ratio = f"{v / t['peft']:.3f}× peft, {v / t['frozen floor']:.3f}× floor"
                goal = "≤ 0.95× peft, ≤ 1.02× floor" if n == "lora_inject" else ""
            rows.append(f"| training step | {n} | {v * 1e3:.0f} ms | {ratio} | {goal} |")
    if "train_bf16" in res:
        t = res["train_bf16"]
        for n, v in t.items():
            ratio = f"{v / t['peft']:.3f}× peft, {v / t['frozen floor']:.3f}× floor"
            goal = "≤ 0.97× peft" if n == "lora_inject" else ""
            rows.append(f"| training step, bf16 autocast | {n} | {v * 1e3:.0f} ms | {ratio} | {goal} |")
    if "memory" in res:
        m = res["memory"]
        for n, v in m.items():
            ref = "peft dora" if n.endswith("dora") else "peft"
            goal = "≤ 1.0× peft" if n == "lora_inject" else ""
            rows.append(f"| training step peak memory | {n} | {v:.0f} MiB | {v / m[ref]:.3f}× {ref} | {goal} |")
    for tokens, e in res.get("eval", {}).items():
        for n, v in e.items():
            goal = "≤ 1.03× base" if n == "lora_inject" else ""
            rows.append(f"| eval forward, unmerged, {tokens} | {n} | {v * 1e3:.1f} ms | {v / e['base']:.3f}× base "
                        f"| {goal} |")
    for fig, label, goal in (("inject", "inject, Llama-2-7B on meta", "≤ 0.1× peft"),
                             ("merge", "remove(merge=True), 7B-wide layer", "")):
        if fig in res:
            d = res[fig]
            for n, v in d.items():
                g = goal if n == "lora_inject" else ""
                rows.append(f"| {label} | {n} | {v * 1e3:.1f} ms | {v / d['peft']:.3f}× peft | {g} |")
    for fig, label, unit in (("qlora", "QLoRA training step (NF4)", "ms"),
                             ("qlora_memory", "QLoRA training step peak memory", "MiB"),
                             ("qlora_weights", "QLoRA model weights", "MiB")):
        d = res.get(fig)
        if d:
            for n, v in d.items():
                shown = f"{v * 1e3:.0f} ms" if unit == "ms" else f"{v:.0f} MiB"
                ratio = f"{v / d['peft qlora']:.3f}× peft qlora, {v / d['lora_inject fp32']:.3f}× our fp32 LoRA"
                goal = {"qlora": "≤ 0.97× peft", "qlora_memory": "≤ 1.0× peft"}.get(fig, "") \
                    if n == "lora_inject qlora" else ""
                rows.append(f"| {label} | {n} | {shown} | {ratio} | {goal} |")
    for fig, label, target in (("mixed", "8×64 tokens, 4 adapters", "≤ 1.05× one adapter, ≤ 0.8× peft"),
                               ("many", "32×16 tokens, 32 of 128 adapters", "≤ 1.1× one adapter")):
        d = res.get(fig, {})
        for n, v in d.items():
            goal = target if n == "lora_inject per_sample" else ""
            rows.append(f"| mixed batch, {label} | {n} | {v * 1e3:.0f} ms | "
                        f"{v / d['one adapter, whole batch']:.3f}× one adapter, {v / d['peft adapter_names']:.3f}× "
                        f"peft | {goal} |")
    for n, v in res.get("store", {}).items():
        rows.append(f"| adapter store, 1,000 adapters, 16 slots, batches of 8 | {n} | {v['requests/s']:.0f} "
                    f"requests/s | hit rate {v['hit rate']:.3f} |  |")
    for fig, label in (("kinds", "training step, kinds"), ("kinds_memory", "training step peak memory, kinds")):
        d = res.get(fig)
        if d:
            for n, v in d.items():
                shown = f"{v * 1e3:.0f} ms" if fig == "kinds" else f"{v:.0f} MiB"
                kind = n.split()[-1]
                ours = n.startswith("lora_inject")
                ratio = "" if kind in ("lora", "floor") else f"{v / d[f'peft {kind}']:.3f}× peft {kind}, "
                ratio += f"{v / d['lora_inject lora']:.3f}× our LoRA"
                if "frozen floor" in d:
                    ratio += f", {v / d['frozen floor']:.3f}× floor"
                goal = ""
                if ours and kind != "lora":
                    goal = "≤ 0.9× peft" if fig == "kinds" else "≤ 1.0× peft"
                    if fig == "kinds" and kind.startswith(("ia3", "vera")):
                        goal += ", ≤ 1.05× our LoRA"
                rows.append(f"| {label} | {n} | {shown} | {ratio} | {goal} |")
    if "sdxl_load" in res:
        d = res["sdxl_load"]
        for n, v in d.items():
            t, m = v["seconds"] / d["diffusers"]["seconds"], v["peak MiB"] / d["diffusers"]["peak MiB"]
            goal = "≤ 0.5× diffusers, memory ≤ 1.0×" if n == "lora_inject" else ""
            rows.append(f"| SDXL LoRA load (r=32, 700 modules), float16 UNet | {n} | {v['seconds'] * 1e3:.0f} ms, "
                        f"{v['peak MiB']:.0f} MiB | {t:.3f}× diffusers, memory {m:.3f}× | {goal} |")
    for label, d in res.get("small", {}).items():
        for n, v in d.items():
            goal = ("≤ 0.9× peft" if label.startswith("training") else "≤ 0.8× peft") if n == "lora_inject" else ""
            rows.append(f"| {label} | {n} | {v * 1e6:.1f} µs | {v / d['peft']:.3f}× peft | {goal} |")
    d = res.get("conv")
    if d:
        for n, v in d.items():
            goal = "≤ 0.95× peft" if n == "lora_inject" else ""
            rows.append(f"| training step, ResNet-shaped conv net, LoRA on every conv | {n} | {v * 1e3:.1f} ms | "
                        f"{v / d['peft']:.3f}× peft, {v / d['frozen floor']:.3f}× floor | {goal} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
