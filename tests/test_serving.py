"""Serving: adapters hot-swapped into a compiled model with no recompile, and mixed-adapter batches
where each adapter's branch runs on its own samples only."""

from __future__ import annotations

import asyncio
import copy
import random
import sys
import threading
from unittest import mock

import pytest
import torch
from _helpers import randomize
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lora_inject as li
from lora_inject import _rows

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
TARGETS = r"(q|v|down)_proj"


def base() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)).eval()


def saved(tmp_path, model_base, name, fmt="lora_inject", seed=1, **kw) -> str:
    """An adapter of ``kw`` with random factors, saved under ``tmp_path/name``."""
    torch.manual_seed(seed)
    model = li.inject(copy.deepcopy(model_base), TARGETS, **kw)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.2)
    path = tmp_path / name
    li.save_adapter(model, path, format=fmt)
    return str(path)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- hot-swap --------------------------------------------------------------------------------
ADAPTERS = [  # (name, format, inject kwargs): other ranks, alphas, rsLoRA and plain, both formats
    ("a", "lora_inject", dict(r=2, alpha=4)),
    ("b", "peft", dict(r=8, alpha=3, rslora=True)),
    ("c", "lora_inject", dict(r=4, alpha=16)),
    ("d", "peft", dict(r=1, alpha=1)),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_hot_swap_into_a_compiled_model_does_not_recompile(backend, tmp_path, fresh_dynamo, monkeypatch):
    b = base()
    paths = {n: saved(tmp_path, b, n, fmt, seed=i + 1, **kw) for i, (n, fmt, kw) in enumerate(ADAPTERS)}
    served = li.inject(copy.deepcopy(b), TARGETS, r=8, alpha=8)  # the slot: r at least each adapter's
    compiled = torch.compile(served, backend=backend, fullgraph=True)
    ids = torch.randint(0, 64, (2, 8))
    li.load_adapter(served, paths["a"])
    logits(compiled, ids)  # compiles once
    params = [id(p) for p in li.lora_parameters(served)]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for name, _, _ in ADAPTERS:
        li.load_adapter(served, paths[name])  # into the slot, in place
        assert [id(p) for p in li.lora_parameters(served)] == params
        want = logits(li.load_adapter(copy.deepcopy(b), paths[name]), ids)  # eager, at its own rank
        torch.testing.assert_close(logits(compiled, ids), want, rtol=1e-5, atol=1e-5)


def test_swap_pads_to_the_slot_and_keeps_the_adapters_scaling(tmp_path):
    b = base()
    path = saved(tmp_path, b, "small", r=2, alpha=4, rslora=True)
    served = li.inject(copy.deepcopy(b), TARGETS, r=8, alpha=8)
    li.load_adapter(served, path)
    lora = served.model.layers[0].self_attn.q_proj.parametrizations.weight[0]
    A, B = lora.lora_A["default"], lora.lora_B["default"]
    assert A.shape == (8, 32) and B.shape == (32, 8)
    assert torch.count_nonzero(A[2:]) == 0 and torch.count_nonzero(B[:, 2:]) == 0
    assert lora.scaling["default"] == pytest.approx(4 / 2 ** 0.5)
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(logits(served, ids), logits(li.load_adapter(copy.deepcopy(b), path), ids))
    # saved again, it is the padded adapter at the slot's rank, with the same outputs
    li.save_adapter(served, tmp_path / "again")
    torch.testing.assert_close(logits(li.load_adapter(copy.deepcopy(b), tmp_path / "again"), ids),
                               logits(served, ids))


def test_an_adapter_larger_than_the_slot_is_refused_with_the_model_unchanged(tmp_path):
    b = base()
    path = saved(tmp_path, b, "big", r=16, alpha=16)
    served = li.inject(copy.deepcopy(b), TARGETS, r=8, alpha=8)
    before = {k: v.clone() for k, v in li.lora_state_dict(served).items()}
    with pytest.raises(ValueError, match=r"has r=16 in the saved adapter, more than the slot's r=8\. "
                                         r"Nothing was loaded\. Inject the slot with r at least"):
        li.load_adapter(served, path)
    after = li.lora_state_dict(served)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- mixed batches ------------------------------------------------------------------------------
def served_with_adapters(tmp_path, b):
    model = copy.deepcopy(b)
    for i, (name, _, kw) in enumerate(ADAPTERS):
        li.load_adapter(model, saved(tmp_path, b, name, seed=i + 1, **kw), adapter=name)
    return model


@pytest.mark.slow
def test_a_mixed_batch_under_compile_equals_one_forward_per_sample(tmp_path, fresh_dynamo):
    b = base()
    model = served_with_adapters(tmp_path, b)
    ids = torch.randint(0, 64, (6, 8))
    choice = ["c", None, "a", "b", "a", "d"]
    want = []
    for i, name in enumerate(choice):
        li.activate(model, [] if name is None else name)
        want.append(logits(model, ids[i:i + 1]))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with li.per_sample(model, choice):
        torch.testing.assert_close(logits(compiled, ids), torch.cat(want), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(model, ids), torch.cat(want), rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_gathers_each_samples_factors_from_one_stack_kept_until_an_adapter_changes(tmp_path):
    """Each adapted tensor stacks its adapters once (padded to the largest rank) and each sample
    gathers its own by index: a new assignment stacks nothing, a hot swap stacks again."""
    b = base()
    model = served_with_adapters(tmp_path, b)
    ids = torch.randint(0, 64, (4, 8))
    tensors = len(list(li.named_loras(model)))

    def one_by_one(choice):
        want = []
        for i, name in enumerate(choice):
            li.activate(model, [] if name is None else name)
            want.append(logits(model, ids[i:i + 1]))
        return torch.cat(want)

    with mock.patch.object(_rows, "stack", side_effect=_rows.stack) as stacks:
        for choice in (["a", "b", "a", None], ["d", "c", "b", "a"], [None, "c", "c", "d"]):
            with torch.no_grad(), li.per_sample(model, choice):
                got = logits(model, ids)
            torch.testing.assert_close(got, one_by_one(choice), rtol=1e-5, atol=1e-5)
        assert stacks.call_count == tensors  # once each, for every assignment
        li.load_adapter(model, saved(tmp_path, b, "a2", seed=9, r=2, alpha=4), adapter="a")  # a hot swap
        with torch.no_grad(), li.per_sample(model, ["a", "b", "a", None]):
            got = logits(model, ids)
        torch.testing.assert_close(got, one_by_one(["a", "b", "a", None]), rtol=1e-5, atol=1e-5)
        assert stacks.call_count == 2 * tensors


@pytest.mark.slow
def test_a_copy_of_a_served_model_swaps_on_its_own(tmp_path, fresh_dynamo):
    """deepcopy gives each copy its own scaling tensors, kept in step by its own records."""
    b = base()
    first = li.inject(copy.deepcopy(b), TARGETS, r=8, alpha=8)
    second = copy.deepcopy(first)
    path = saved(tmp_path, b, "other", r=2, alpha=16)
    compiled = torch.compile(second, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 8))
    logits(compiled, ids)
    li.load_adapter(second, path)  # into the copy only
    torch.testing.assert_close(logits(compiled, ids), logits(second, ids), rtol=1e-5, atol=1e-5)
    lora = first.model.layers[0].self_attn.q_proj.parametrizations.weight[0]
    assert float(lora.scale_default) == lora.scaling["default"] == 1.0


# -- concurrent requests: the assignment belongs to the call ------------------------------------------
def mlp_with_adapters(names=("a", "b", "c")):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    for name in names:
        li.inject(model, r"0|2|4", r=4, adapter=name)
    randomize(model)
    li.activate(model, list(names))  # all on: a request that leaked out of its block sees the sum
    return model


def oracle(model, x, names):
    """Each sample's output with its own adapter (None: the base model, also `disabled`), one
    forward per adapter with the model alone."""
    out = {}
    with torch.no_grad():
        for name in (*names, None):
            li.activate(model, [] if name is None else name)
            out[name] = model(x)
    li.activate(model, list(names))
    return out


def expected(want, choice):
    return torch.stack([want[name][i] for i, name in enumerate(choice)])


def test_concurrent_threads_each_get_their_own_assignment():
    """Threads serve requests on one model, each in its own per_sample() or disabled() block:
    every output is the single-threaded one. Threads switch often (a 10 µs switch interval)."""
    names = ("a", "b", "c")
    model, x = mlp_with_adapters(names), torch.randn(4, 16)
    want = oracle(model, x, names)
    wrong, errors = [], []

    def serve(seed):
        rng = random.Random(seed)
        try:
            with torch.no_grad():  # grad mode is per thread too
                for _ in range(150):
                    if rng.random() < 0.2:
                        with li.disabled(model):
                            got, choice = model(x), [None] * 4
                    else:
                        choice = [rng.choice([*names, None]) for _ in range(4)]
                        with li.per_sample(model, choice):
                            got = model(x)
                    if not torch.allclose(got, expected(want, choice), rtol=1e-5, atol=1e-6):
                        wrong.append(choice)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not wrong, (errors, wrong[:3], len(wrong))
    torch.testing.assert_close(model(x), want_all(model, x))  # the model's own setting is untouched


def want_all(model, x):
    with torch.no_grad():
        return model(x)


def test_asyncio_tasks_interleaved_inside_their_blocks_stay_isolated():
    """Tasks switch at each await while their blocks are open: each forward still runs its own."""
    names = ("a", "b", "c")
    model, x = mlp_with_adapters(names), torch.randn(4, 16)
    want = oracle(model, x, names)
    choices = [["a", "b", "c", None], ["c", "c", None, "a"], None, ["b", None, "a", "a"]]  # None: disabled

    async def request(choice):
        with li.per_sample(model, choice) if choice else li.disabled(model):
            await asyncio.sleep(0)  # every other task enters its block here
            with torch.no_grad():
                return model(x)

    async def serve():
        return await asyncio.gather(*(request(c) for c in choices))

    for got, choice in zip(asyncio.run(serve()), choices):
        torch.testing.assert_close(got, expected(want, choice or [None] * 4), rtol=1e-5, atol=1e-6)


# -- the assignment is data: one compiled graph for every mix --------------------------------------
ASSIGNMENTS = [["c", None, "a", "b", "a", "d"], ["a"] * 6, [None] * 6, ["d", "d", "c", "c", "b", "b"],
               ["b", "a", None, "d", "c", None]]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_a_new_assignment_under_compile_recompiles_nothing(backend, tmp_path, fresh_dynamo, monkeypatch):
    b = base()
    model = served_with_adapters(tmp_path, b)
    ids = torch.randint(0, 64, (6, 8))
    want = {}
    for name in ("a", "b", "c", "d", None):
        li.activate(model, [] if name is None else name)
        want[name] = logits(model, ids)
    li.activate(model, ["a", "b", "c", "d"])
    everything = logits(model, ids)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(logits(compiled, ids), everything, rtol=1e-5, atol=1e-5)  # one graph
    with li.per_sample(model, ASSIGNMENTS[0]):
        logits(compiled, ids)  # and one for the calls that may set rows
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for choice in ASSIGNMENTS:
        with li.per_sample(model, choice):
            got = logits(compiled, ids)
            torch.testing.assert_close(got, logits(model, ids), rtol=1e-5, atol=1e-5)  # eager, the same
        torch.testing.assert_close(got, torch.stack([want[n][i] for i, n in enumerate(choice)]),
                                   rtol=1e-5, atol=1e-5)
    with li.disabled(model):
        torch.testing.assert_close(logits(compiled, ids), want[None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(compiled, ids), everything, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_model_serves_concurrent_threads_from_their_own_contexts(fresh_dynamo):
    """The compiled graph reads each calling thread's assignment at run time."""
    names = ("a", "b", "c")
    model, x = mlp_with_adapters(names), torch.randn(4, 16)
    want = oracle(model, x, names)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), li.per_sample(model, ["a", "b", "c", None]):
        compiled(x)
    wrong = []

    def serve(seed):
        rng = random.Random(seed)
        with torch.no_grad():
            for _ in range(40):
                choice = [rng.choice([*names, None]) for _ in range(4)]
                with li.per_sample(model, choice):
                    if not torch.allclose(compiled(x), expected(want, choice), rtol=1e-5, atol=1e-6):
                        wrong.append(choice)

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:3]


def test_per_sample_gradients_reach_each_samples_own_adapter():
    """With a gradient wanted (an eval-mode model outside no_grad, as per-sample gradient analysis
    runs it), each adapter's factors get the gradient of its own samples' loss, as one forward per
    sample with that adapter alone gives it."""
    model = li.inject(base(), TARGETS, r=2, alpha=4, adapter="a")
    li.inject(model, TARGETS, r=4, alpha=4, adapter="b")
    randomize(model)
    ids = torch.randint(0, 64, (3, 8))
    choice = ["a", "b", "a"]
    with li.per_sample(model, choice):
        model(input_ids=ids).logits.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    for i, name in enumerate(choice):
        li.activate(model, name)
        model(input_ids=ids[i:i + 1]).logits.square().sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys() and len(got) == 4 * len(list(li.named_loras(model)))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


# -- a compiled graph beside what it cannot stack per sample ----------------------------------
def mlp_beside(other: str) -> nn.Module:
    """Two plain LoRA adapters, a and b, and a third, h, that a compiled graph cannot give a
    sample of its own: a LoHa, a DoRA, or a plain LoRA on a torchao int8 base; all active."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    if other == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        quantize_(model, Int8WeightOnlyConfig())
    for name in ("a", "b"):
        li.inject(model, "0|2", r=2, adapter=name)
    li.inject(model, "0|2", r=2, adapter="h", **{"loha": dict(kind="loha"), "dora": dict(dora=True)}.get(other, {}))
    with torch.no_grad():
        for p in li.adapter_parameters(model):
            p.add_(torch.randn_like(p), alpha=0.3)
    li.activate(model, ["a", "b", "h"])
    return model


@pytest.mark.parametrize("other", ["loha", "dora", "int8"])
def test_a_compiled_mixed_batch_beside_an_adapter_it_cannot_stack(other, fresh_dynamo):
    """Each sample gets its own adapter, the active ones apply outside the blocks and none
    inside disabled(), as eagerly; a row choosing a DoRA adapter is refused at run time."""
    model, x = mlp_beside(other), torch.randn(4, 16)
    want = oracle(model, x, ("a", "b", "h"))
    with torch.no_grad():
        everything = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    choices = [["a", None, "b", "a"], [None] * 4, ["b", "h" if other == "int8" else "a", "a", None]]
    with torch.no_grad():
        for choice in choices:
            with li.per_sample(model, choice):
                torch.testing.assert_close(compiled(x), expected(want, choice), rtol=1e-5, atol=1e-5)
        with li.disabled(model):
            torch.testing.assert_close(compiled(x), want[None], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), everything, rtol=1e-5, atol=1e-5)
        if other == "dora":
            with li.per_sample(model, ["a", "h", None, "b"]), pytest.raises(RuntimeError, match="'h' is DoRA"):
                compiled(x)


def test_a_compiled_call_outside_a_block_ignores_another_threads_block(fresh_dynamo):
    """One thread's open disabled() block makes every compiled call read the call's state as
    data: a call with no block of its own, on a DoRA adapter, still gets the adapted output."""
    model, x = mlp_beside("dora"), torch.randn(4, 16)
    with torch.no_grad():
        everything = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opened, done = threading.Event(), threading.Event()

    def hold():
        with li.disabled(model):
            opened.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert opened.wait(60)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), everything, rtol=1e-5, atol=1e-5)
    finally:
        done.set()
        holder.join()


class SeqFirst(nn.Module):
    """Flattens (batch, seq, features) sequence-first before its Linear: rows no longer by sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x.transpose(0, 1).reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("compiled", [False, True])
def test_a_linear_input_flattened_across_samples_is_refused(compiled, fresh_dynamo):
    model = SeqFirst().eval()
    for name in ("a", "b"):
        li.inject(model, "fc", r=2, adapter=name)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    with torch.no_grad(), li.per_sample(model, ["a", "b"]), pytest.raises(ValueError, match="one per sample"):
        run(torch.randn(2, 3, 8))


class Whole(nn.Module):
    """Reads adapted weights with ops that have no factored form: MultiheadAttention's own
    attention forward (its ``out_proj`` weight) and an einsum on a Linear's weight."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.attn(x, x, x, need_weights=False)[0]
        return torch.einsum("bti,oi->bto", y, self.fc.weight)


@pytest.mark.parametrize("compiled", [False, True])
def test_an_op_that_takes_the_weight_whole_serves_blocks_as_eagerly(compiled, fresh_dynamo):
    """disabled() and a per_sample() row that chooses no adapter give the base model there, and
    a row that chooses one is refused, eagerly and compiled alike (compiled, at run time)."""
    torch.manual_seed(0)
    model = Whole().eval()
    plain = copy.deepcopy(model)
    li.inject(model, r"attn\.out_proj|fc", r=2)
    randomize(model)
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        adapted, base = model(x), plain(x)
        assert not torch.allclose(adapted, base, atol=1e-3)
        with li.disabled(model):
            torch.testing.assert_close(run(x), base, rtol=1e-5, atol=1e-5)
        with li.per_sample(model, [None] * 3):
            torch.testing.assert_close(run(x), base, rtol=1e-5, atol=1e-5)
        with li.per_sample(model, ["default", None, None]), pytest.raises(RuntimeError, match="no factored form"):
            run(x)
        torch.testing.assert_close(run(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_frozen_inductor_graph_reads_the_calling_context_at_run_time(fresh_dynamo, monkeypatch):
    """Inductor's freezing makes W0 a constant of the graph: the check of the calling context,
    whose one tensor input it is, must still run per call, not once when compiling."""
    monkeypatch.setattr(torch._inductor.config, "freezing", True)
    torch.manual_seed(0)
    model = Whole().eval()
    li.inject(model, r"attn\.out_proj|fc", r=2)
    randomize(model)
    run = torch.compile(model, backend="inductor", fullgraph=True)
    x = torch.randn(3, 5, 8)
    opened, done = threading.Event(), threading.Event()

    def hold():
        with li.per_sample(model, [None] * 3):
            opened.set()
            done.wait(120)

    with torch.no_grad():
        adapted = model(x)
        with li.per_sample(model, [None] * 3):
            run(x)  # compiled inside the block: the context then chose no adapter
        with li.per_sample(model, ["default", None, None]), pytest.raises(RuntimeError, match="no factored form"):
            run(x)
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert opened.wait(60)
            torch.testing.assert_close(run(x), adapted, rtol=1e-5, atol=1e-5)  # no block in this thread
        finally:
            done.set()
            holder.join()
