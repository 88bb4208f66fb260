"""Every kind of update (LoHa, LoKr, OFT, IA³, VeRA) under the rest of the stack: torch.compile,
autocast, torch.func (grad, vmap) and AdapterTrainer checkpoints. DDP and FSDP2 with a kind are in
tests/test_distributed.py.

The references are eager autograd (compile, torch.func), the plain layer with the weight merged by
hand from the kind's own math under the same autocast, and an uninterrupted run (resume).
"""

from __future__ import annotations

import copy
import os
import warnings

import _models
import pytest
import torch
from _helpers import randomize_kind
from _models import bert_classifier, classification_data
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import lora_inject as li
from lora_inject.kind import find_kind, merged

KINDS = {
    "loha": dict(r=2, alpha=4.0),
    "lokr": dict(r=2, alpha=4.0),
    "oft": dict(r=2, oft_block_size=0),
    "ia3": dict(feedforward=r"^2$"),
    "vera": dict(r=2),
}
KIND_NAMES = list(KINDS)


def mlp(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    li.inject(model, r"^(0|2)$", kind=kind, **KINDS[kind])
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)  # not the identity: every tensor gets a gradient
    return model


def trained(model: nn.Module) -> dict[str, Tensor]:
    """The kind's trained tensors by name."""
    ids = {id(p) for p in li.lora_parameters(model)}
    out = {n: p for n, p in model.named_parameters() if id(p) in ids}
    assert out  # every kind here trains something
    return out


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in trained(model).items()}


def plain_merged(model: nn.Sequential) -> nn.Sequential:
    """The plain MLP with each adapted weight (and IA³'s bias) merged by hand from the kind's math."""
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    found = dict(li.named_loras(model))
    with torch.no_grad():
        for i in (0, 2):
            lora = found[f"{i}.weight"]
            rec = lora.adapter("default")
            kind, view = find_kind(rec.kind), lora.view
            params = {k: v.detach() for k, v in lora.tensors("default").items()}
            layer = model[i].parametrizations
            W0 = layer.weight.original.detach()
            plain[i].weight.copy_(view.stored(merged(view.rows(W0), [(kind, params, rec.scaling, rec.options)], view)))
            b = layer.bias.original.detach() if "bias" in layer else model[i].bias.detach()
            if kind.apply_bias is not None:
                b = kind.apply_bias(b, params, view, rec.options)
            plain[i].bias.copy_(b)
    return plain


# -- torch.compile ------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_compile_matches_eager_and_does_not_recompile(kind, fresh_dynamo):
    x = torch.randn(3, 8)
    eager, model = mlp(kind), mlp(kind)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    want = eager(x)
    want.square().sum().backward()
    got = compiled(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads(model), grads(eager))
    for m in (eager, model):  # a training step in place: the compiled graph must read the new values
        torch.optim.SGD(li.lora_parameters(m), lr=0.1).step()
        m.zero_grad()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(x + 1)
        again.square().sum().backward()
    want = eager(x + 1)
    want.square().sum().backward()
    torch.testing.assert_close(again, want)
    torch.testing.assert_close(grads(model), grads(eager))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_compiled_model_follows_disabled(kind, fresh_dynamo):
    x = torch.randn(3, 8)
    model = mlp(kind)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        on = compiled(x)
        with li.disabled(model):
            off = compiled(x)
            torch.testing.assert_close(off, model(x))
        torch.testing.assert_close(compiled(x), on)
    assert not torch.allclose(on, off)  # the kind changed the output


# Where a kind has a factored form: LoHa's update has none, and OFT's rotation of a conv's
# (channel, kernel position) inputs none on a conv; both merge, compiled or not.
FACTORED = [(k, layer) for k in KIND_NAMES for layer in ("linear", "conv")
            if k != "loha" and (k, layer) != ("oft", "conv")]


def _built(limit: int):
    """An AOT backend that records each op of the forward and backward graphs that makes a new
    tensor (not a view) of ``limit`` elements or more."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            is_view = isinstance(node.target, torch._ops.OpOverload) and node.target.is_view
            if node.op == "call_function" and isinstance(val, Tensor) and val.numel() >= limit and not is_view:
                seen.append(str(node.target))
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=record, bw_compiler=record), seen


@pytest.mark.parametrize(("kind", "layer"), FACTORED)
def test_compiled_kinds_build_no_weight_sized_tensor(kind, layer, fresh_dynamo):
    # Compiled, each kind runs its factored form, as in eager mode: neither the forward nor the
    # backward graph makes the adapted weight, its gradient, or anything of their size, on a layer
    # with a bias (which IA3 scaling the output adapts too).
    torch.manual_seed(0)
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), torch.randn(3, 64)
    else:
        model, x = nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)), torch.randn(1, 16, 6, 6)
    options = {**KINDS[kind], "feedforward": r"^2$"} if kind == "ia3" else KINDS[kind]
    li.inject(model, r"^(0|2)$", kind=kind, **options)
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)
    eager = copy.deepcopy(model)
    backend, seen = _built(model[0].parametrizations.weight.original.numel())
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got = compiled(x)
    got.square().sum().backward()
    assert seen == []
    want = eager(x)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads(model), grads(eager))


def assert_draws_as_eager(model: nn.Module, x: Tensor) -> None:
    """``model`` compiled (graph breaks allowed) gives, from each of three seeds, the outputs and
    gradients of an eager copy: a training forward's random draws are the same."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for seed in range(3):
        torch.manual_seed(seed)
        want = eager(x)
        want.square().sum().backward()
        torch.manual_seed(seed)
        got = compiled(x)
        got.square().sum().backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grads(model), grads(eager))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_compiled_dropout_draws_as_eager(kind, fresh_dynamo):
    # LoHa's and LoKr's dropouts branch in Python on a random draw: the graph breaks there, and
    # the adapted weight must not cross from one graph into the next (it crashed the backend).
    # From the same seed, the compiled training forward draws what the eager one draws.
    model = mlp(kind)
    li.remove(model, merge=False)
    li.inject(model, r"^(0|2)$", kind=kind, r=2, alpha=4.0, rank_dropout=0.5, module_dropout=0.2)
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)
    assert_draws_as_eager(model, torch.randn(3, 8))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_user_kind_with_an_unmarked_dropout_merges(fresh_dynamo):
    # A kind whose dropout marks no option as its probability may draw on every training forward:
    # compiled, it merges as LoHa's and LoKr's do where theirs draw (it crashed the backend).
    import dataclasses

    from lora_inject import kind as kind_module

    lokr = find_kind("lokr")
    options = tuple(dataclasses.replace(o, dropout=False) for o in lokr.options)
    li.register_kind("lokr_unmarked", dataclasses.replace(lokr, name="lokr_unmarked", options=options))
    try:
        model = nn.Sequential(nn.Linear(8, 8))
        li.inject(model, "^0$", kind="lokr_unmarked", r=2, alpha=4.0, module_dropout=0.2)
        li.mark_only_lora_as_trainable(model)
        randomize_kind(model, "default", 1)
        assert_draws_as_eager(model, torch.randn(3, 8))
    finally:
        del kind_module._KINDS["lokr_unmarked"]


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_compiled_ia3_keeps_autocasts_dtype(layer, fresh_dynamo):
    # Compiled, IA3 scaling the output runs its form without the bias and adds the bias after it:
    # in the autocast dtype, as the eager forward and the merged op give it.
    torch.manual_seed(0)
    if layer == "linear":
        model, x = nn.Linear(8, 8), torch.randn(2, 8)
    else:
        model, x = nn.Conv2d(4, 4, 3), torch.randn(1, 4, 5, 5)
    li.inject(model, "", kind="ia3")
    randomize_kind(model, "default", 1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), compiled(x)
    assert want.dtype == got.dtype == torch.bfloat16
    # Eager scales the sum with the bias, compiled adds the scaled bias: within one bfloat16 step
    # at the output's scale.
    step = 2.0 ** -8
    torch.testing.assert_close(got, want, rtol=step, atol=step * float(want.detach().abs().max()))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("kind", ["lora", *KIND_NAMES])
def test_dynamic_batch_compiles_once(kind, layer, grad, fresh_dynamo):
    # With dynamic=True a new batch size recompiles nothing: no form chooses its path by the size
    # (LoRA's merged-or-factored choice and its fused kernel's threshold, LoKr's reshape or merge),
    # which would guard the graph on it. The last batch crosses those thresholds.
    torch.manual_seed(0)
    if layer == "linear":
        model, shape, sizes = nn.Sequential(nn.Linear(64, 64)), (64,), (5, 7, 40, 2000)
    else:
        # Small: torch's own conv guards its batch size at 16, on the plain layer too, and LoKr's
        # form runs it on a batch of n * c (here c = 2), so it meets that guard from n = 8.
        model, shape, sizes = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)), (4, 5, 5), (5, 7)
    options = dict(r=2, alpha=4.0) if kind == "lora" else KINDS[kind]
    li.inject(model, "^0$", kind=kind, **({k: v for k, v in options.items() if k != "feedforward"}))
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.set_grad_enabled(grad):
        compiled(torch.randn(3, *shape))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n in sizes:
                x = torch.randn(n, *shape)
                torch.testing.assert_close(compiled(x), model(x))


# -- autocast -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_autocast_matches_the_merged_plain_layer(kind):
    x = torch.randn(3, 8)
    model = mlp(kind)
    plain = plain_merged(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        want = plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)  # bf16's own tolerance
    got.float().square().sum().backward()
    for name, g in grads(model).items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_float32_tensors_on_a_bf16_model_match_the_merged_plain_layer(kind):
    """The half-precision recipe: a bf16 model, the adapter's tensors in float32 (``dtype=``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    li.inject(model, r"^(0|2)$", kind=kind, dtype=torch.float32, **KINDS[kind])
    randomize_kind(model, "default", 1)
    assert {p.dtype for p in li.adapter_parameters(model)} == {torch.float32}
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    plain = li.remove(copy.deepcopy(model), merge=True)
    got, want = model(x), plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)  # bf16's own tolerance


@pytest.mark.parametrize("kind, kw", [*KINDS.items(), ("oft", dict(oft_block_size=2, rotate="out"))],
                         ids=[*KINDS, "oft-out"])
def test_autocast_embedding_keeps_the_tables_dtype(kind, kw):
    """An embedding is not autocast: the adapted one returns what the merged table returns."""
    torch.manual_seed(0)
    model = nn.Embedding(10, 8)
    li.inject(model, "", kind=kind, **{k: v for k, v in kw.items() if k != "feedforward"})
    randomize_kind(model, "default", 1)
    plain = li.remove(copy.deepcopy(model), merge=True)
    x = torch.randint(0, 10, (3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(x), plain(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)  # the update's products run in bf16, as peft's


def gpt2(kind: str) -> nn.Module:
    model = _models.gpt2(layers=1, width=16, head=True, seed=0, vocab_size=32, n_positions=16,
                         attn_implementation="eager")
    kw = dict(KINDS[kind], feedforward=r"mlp\.c_proj") if kind == "ia3" else KINDS[kind]
    li.inject(model, "c_attn|c_proj|c_fc", kind=kind, **kw)
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)
    return model


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_autocast_gpt2_matches_the_merged_model(kind):
    """GPT-2's Conv1D stores its weight transposed and runs ``addmm``."""
    ids = torch.randint(0, 32, (2, 6))
    model = gpt2(kind)
    plain = li.remove(copy.deepcopy(model), merge=True)
    assert not list(li.named_loras(plain))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(ids).logits, plain(ids).logits
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=2e-2)  # bf16's tolerance, on 32 logits
    got.float().square().mean().backward()
    assert all(g.abs().sum() > 0 for g in grads(model).values())


# -- torch.func ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_func_grad_matches_autograd(kind):
    x = torch.randn(3, 8)
    model = mlp(kind)
    model(x).square().sum().backward()
    want = grads(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
    assert want.keys() <= got.keys()
    torch.testing.assert_close({n: got[n] for n in want}, want)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_func_jvp_matches_grad(kind):
    """Forward-mode AD through the kind's update: the directional derivative is grad · tangent."""
    x = torch.randn(3, 8)
    model = mlp(kind)
    names = list(trained(model))
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    tangents = {n: torch.randn(p.shape, generator=gen) if n in names else torch.zeros_like(p)
                for n, p in params.items()}

    def loss(p):
        return functional_call(model, p, (x,)).square().sum()

    _, got = torch.func.jvp(loss, (params,), (tangents,))
    g = grad(loss)(params)
    torch.testing.assert_close(got, sum((g[n] * tangents[n]).sum() for n in names))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_vmap_matches_the_loop(kind):
    xs = torch.randn(4, 3, 8)
    model = mlp(kind)
    params = dict(model.named_parameters())
    with torch.no_grad():
        got = vmap(lambda x: functional_call(model, params, (x,)))(xs)
        want = torch.stack([model(x) for x in xs])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_vmap_over_an_ensemble_of_adapters_matches_the_loop(kind, grad):
    """Ensembling: each member's own adapter tensors, stacked, on one shared base."""
    x = torch.randn(3, 8)
    model = mlp(kind)
    ensemble = {k: v + 0.1 * torch.randn(4, *v.shape) for k, v in trained(model).items()}
    with torch.set_grad_enabled(grad):
        got = vmap(lambda p: functional_call(model, p, (x,)))(ensemble)
        want = torch.stack([functional_call(model, {k: v[i] for k, v in ensemble.items()}, (x,)) for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # batched kernels: other last bits


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_vmap_of_grad_per_sample_matches_the_loop(kind):
    xs = torch.randn(4, 8)
    model = mlp(kind)
    names = list(trained(model))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x):
        return functional_call(model, p, (x[None],)).square().sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        model.zero_grad()
        model(x[None]).square().sum().backward()
        torch.testing.assert_close({n: got[n][i] for n in names}, grads(model))


# -- a tiny transformers model ------------------------------------------------------------------
def llama(kind: str) -> nn.Module:
    model = _models.llama(layers=1, width=16, head=True, seed=0, intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    kw = dict(KINDS[kind], feedforward="down_proj") if kind == "ia3" else KINDS[kind]
    li.inject(model, r"(q|v|down)_proj", kind=kind, **kw)
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)
    return model


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_llama_func_grad_matches_autograd(kind):
    ids = torch.randint(0, 32, (2, 6))
    model = llama(kind)
    model(ids).logits.square().mean().backward()
    want = grads(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = grad(lambda p: functional_call(model, p, (ids,)).logits.square().mean())(params)
    torch.testing.assert_close({n: got[n] for n in want}, want)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("kind", ["oft", "vera"])  # a multiplicative kind and shared projections
def test_llama_compile_matches_eager(kind, fresh_dynamo):
    ids = torch.randint(0, 32, (2, 6))
    eager, model = llama(kind), llama(kind)
    want = eager(ids).logits
    want.square().mean().backward()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(ids).logits
    got.square().mean().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads(model), grads(eager))


# -- AdapterTrainer -----------------------------------------------------------------------------
def make_trainer(model, out):
    from transformers import TrainingArguments

    from lora_inject.trainer import AdapterTrainer

    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                             learning_rate=5e-2, logging_steps=100, report_to=[], seed=3,
                             use_cpu=True, dataloader_num_workers=0)
    return AdapterTrainer(model=model, args=args, train_dataset=classification_data())


def adapted_bert(base, kind):
    model = copy.deepcopy(base)
    kw = dict(KINDS[kind], feedforward="output.dense") if kind == "ia3" else KINDS[kind]
    li.inject(model, r"query|value|output\.dense", kind=kind, **kw)
    li.mark_only_lora_as_trainable(model)
    randomize_kind(model, "default", 1)
    return model


def run(t, **kw):
    with warnings.catch_warnings():  # transformers' notes on CPU and its own deprecations
        warnings.simplefilter("ignore")
        t.train(**kw)


def adapter(model) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in li.lora_state_dict(model).items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lokr", "vera"])
def test_trainer_checkpoints_hold_the_kind_and_resume_is_exact(kind, tmp_path):
    base = bert_classifier(layers=1)
    whole = adapted_bert(base, kind)
    start = adapter(whole)
    run(make_trainer(whole, tmp_path / "whole"))
    end = adapter(whole)
    ckpt = tmp_path / "whole" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert "adapter.safetensors" in files and not files & {"model.safetensors", "pytorch_model.bin"}
    assert os.path.getsize(ckpt / "adapter.safetensors") < 20_000  # the adapter, not the model
    at2 = li.load_adapter(copy.deepcopy(base), ckpt)
    assert adapter(at2).keys() == end.keys()
    assert all(not torch.equal(start[k], end[k]) for k in trained(whole))  # every tensor trained

    resumed = adapted_bert(base, kind)
    with torch.no_grad():  # other values, so that only the checkpoint can make them equal
        for p in li.lora_parameters(resumed):
            p.add_(1.0)
    run(make_trainer(resumed, tmp_path / "whole"), resume_from_checkpoint=str(ckpt))
    got = adapter(resumed)
    assert all(torch.equal(got[k], end[k]) for k in end)
    assert not all(torch.equal(end[k], adapter(at2)[k]) for k in end)  # steps 3-4 trained
    for name, p in base.state_dict().items():  # the base weights were never written
        assert torch.equal(whole.state_dict()[name], p)


class Tagger(nn.Module):
    """A model that ``Trainer`` trains (it returns its loss) with an LSTM, which peft's format
    cannot express."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.lstm, self.head = nn.Embedding(50, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.lstm(self.embed(input_ids))[0][:, -1])
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_trainer_refuses_before_training_what_peft_format_cannot_checkpoint(kind, tmp_path):
    from transformers import TrainingArguments

    from lora_inject.trainer import AdapterTrainer

    model = li.mark_only_lora_as_trainable(li.inject(Tagger(), "lstm", kind=kind, r=2))
    before = adapter(model)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_steps=1,
                             report_to=[], use_cpu=True, dataloader_num_workers=0)
    t = AdapterTrainer(model=model, args=args, train_dataset=classification_data(8), adapter_format="peft")
    with pytest.raises(ValueError, match=r"AdapterTrainer.train\(\): the checkpoints of adapter 'default' "
                                         r"cannot be written with adapter_format='peft': save_adapter\(\)"):
        run(t)
    assert not any(tmp_path.iterdir())  # no step ran, no checkpoint was begun
    assert all(torch.equal(v, before[k]) for k, v in adapter(model).items())
