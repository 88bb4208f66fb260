"""torch.compile of injected models: no graph breaks, outputs equal eager's, training updates LoRA.

Training and the graph-break checks use the ``aot_eager`` backend (dynamo and AOTAutograd, where
a tensor subclass or a parametrization can break a graph or go stale); one test compiles with
the default backend (inductor). ``fullgraph=True`` makes any graph break an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import gpt2, llama
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from transformers.pytorch_utils import Conv1D

import lora_inject as li

pytestmark = [
    pytest.mark.slow,
    # dynamo probes `.grad` of non-leaf tensors while tracing and hides the warning that this
    # raises through warnings.showwarning, which an "error" filter bypasses.
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapted_gpt2() -> nn.Module:
    return li.inject(gpt2(head=True, seed=0), "c_attn|c_proj|c_fc", r=4, alpha=8)


def adapted_llama() -> nn.Module:
    return li.inject(llama(head=True, seed=0), r"(q|k|v|o|gate|up|down)_proj", r=4, alpha=8)


def originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".original")}


@pytest.mark.parametrize("build", [pytest.param(adapted_gpt2, id="gpt2"), pytest.param(adapted_llama, id="llama")])
def test_compiled_training_and_inference_match_eager(build):
    ids = torch.randint(0, 64, (2, 8))
    models = {"eager": build(), "compiled": build()}
    counter = CompileCounterWithBackend("aot_eager")
    forwards = {"eager": models["eager"], "compiled": torch.compile(models["compiled"], backend=counter,
                                                                  fullgraph=True)}
    w0 = originals(models["eager"])
    losses = {}
    for mode, model in models.items():
        li.mark_only_lora_as_trainable(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[mode] = []
        for _ in range(3):
            logits = forwards[mode](ids).logits  # the loss outside: transformers' own warns (a break)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[mode].append(loss.detach())
    assert counter.frame_count == 1  # one graph, kept across steps as the factors change
    torch.testing.assert_close(losses["compiled"], losses["eager"])
    trained = li.lora_state_dict(models["compiled"])
    torch.testing.assert_close(trained, li.lora_state_dict(models["eager"]))
    assert all(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k)  # B moved off zero
    for mode, model in models.items():
        assert all(torch.equal(v, w0[k]) for k, v in originals(model).items())

    with torch.no_grad():
        for model in models.values():
            model.eval()
        torch.testing.assert_close(forwards["compiled"](ids).logits, forwards["eager"](ids).logits)


def test_compiled_model_follows_adapter_switches():
    model = adapted_gpt2()
    li.inject(model, "c_attn", r=2, adapter="b")
    for p in li.lora_parameters(model):
        nn.init.normal_(p, std=0.1)
    model.eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 64, (2, 8))

    def check():
        expected = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=0, atol=0)
        return expected

    with torch.no_grad():
        both = check()
        with li.disabled(model):
            assert not torch.equal(check(), both)
        li.activate(model, "b")
        check()
        li.activate(model, ["default", "b"])
        torch.testing.assert_close(compiled(ids).logits, both, rtol=0, atol=0)
        for p in li.lora_parameters(model):
            p.mul_(2)
        assert not torch.equal(check(), both)
    assert counter.frame_count == 3  # one graph per set of active adapters, none for new values


LAYERS = [
    pytest.param(lambda: nn.Linear(8, 6), lambda: (torch.randn(3, 8),), id="Linear"),
    pytest.param(lambda: Conv1D(6, 8), lambda: (torch.randn(3, 8),), id="Conv1D"),
    pytest.param(lambda: nn.Embedding(10, 6), lambda: (torch.randint(0, 10, (3, 4)),), id="Embedding"),
    pytest.param(lambda: nn.EmbeddingBag(10, 6), lambda: (torch.randint(0, 10, (3, 4)),), id="EmbeddingBag"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3), lambda: (torch.randn(2, 3, 6, 6),), id="Conv2d"),
    pytest.param(lambda: nn.Conv2d(4, 4, 3, groups=2), lambda: (torch.randn(2, 4, 6, 6),), id="Conv2d-groups"),
    pytest.param(lambda: nn.ConvTranspose2d(3, 4, 3), lambda: (torch.randn(2, 3, 6, 6),), id="ConvTranspose2d"),
    pytest.param(lambda: nn.Bilinear(4, 5, 3), lambda: (torch.randn(2, 4), torch.randn(2, 5)), id="Bilinear"),
    pytest.param(lambda: nn.MultiheadAttention(8, 2, batch_first=True), lambda: (torch.randn(2, 3, 8),) * 3,
                 id="MultiheadAttention"),
]


@pytest.mark.parametrize("make, inputs", LAYERS)
def test_layer_forward_compiles_to_one_graph(make, inputs):
    layer, args = make(), inputs()
    li.inject(layer, "", r=2)
    for p in li.lora_parameters(layer):
        nn.init.normal_(p)
    explained = torch._dynamo.explain(layer)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    expected = first(layer(*args))
    torch.testing.assert_close(first(torch.compile(layer, backend="aot_eager", fullgraph=True)(*args)), expected)


def test_default_backend_inference_matches_eager():
    model = adapted_gpt2().eval()
    for p in li.lora_parameters(model):
        nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
        with li.disabled(model):
            assert not torch.allclose(model(ids).logits, expected)  # the adapters matter
        torch.testing.assert_close(torch.compile(model)(ids).logits, expected)
