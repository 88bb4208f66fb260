"""LoRA+'s parameter groups against peft's ``create_loraplus_optimizer`` on the same models.

peft makes an adapter with every trainable tensor random and saves it; we load it, so each of
our trainable tensors holds the values of its peft counterpart (reshaped where the layouts
differ), and that is how the groups are compared: by the values they hold.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import bert, gpt2, llama
from test_adapter_io import ConvNet
from torch import nn

import lora_inject as li

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

BERT_QV = ["query", "value"]
# id: (model, peft config, extra trainable names (a substring) in both models)
CASES = {
    "bert-qv": ("bert", peft.LoraConfig(r=2, target_modules=BERT_QV), None),
    "bert-embeddings-layernorm": ("bert", peft.LoraConfig(r=2, target_modules=["word_embeddings", "query"]),
                                  "LayerNorm"),
    "bert-dora-biases": ("bert", peft.LoraConfig(r=2, target_modules=BERT_QV, use_dora=True), "bias"),
    "gpt2-all": ("gpt2", peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True),
                 "ln_"),
    "llama-dora-norms": ("llama", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                  use_dora=True), "norm"),
    "convnet-dora": ("convnet", peft.LoraConfig(r=2, target_modules=["conv", "head"], use_dora=True), "bias"),
    "gpt2-vera": ("gpt2", peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                          save_projection=True), None),
}
BUILD = {"bert": bert, "gpt2": gpt2, "llama": llama, "convnet": ConvNet}


def both(case: str, tmp_path) -> tuple[nn.Module, nn.Module]:
    """(peft's model, ours) holding the same trainable tensors, with the same ones trainable."""
    name, config, extra = CASES[case]
    torch.manual_seed(0)
    base = BUILD[name]()
    with torch.no_grad():  # norms and biases too: every tensor's values are its own
        for p in base.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=0.3)
        theirs.save_pretrained(tmp_path)
    ours = li.mark_only_adapters_as_trainable(li.load_adapter(copy.deepcopy(base), tmp_path))
    for model in (theirs, ours):
        for n, p in model.named_parameters():
            if extra is not None and extra in n and "lora" not in n and "vera" not in n:
                p.requires_grad_(True)
    return theirs, ours


def by_value(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> list[int]:
    """For each of peft's tensors, the index of the one of ours that holds its values."""
    found = []
    for t in theirs:
        hits = [i for i, o in enumerate(ours) if o.numel() == t.numel()
                and torch.equal(o.detach().flatten().float(), t.detach().flatten().float())]
        assert len(hits) == 1, f"{tuple(t.shape)} matches {len(hits)} tensors of ours"
        found.append(hits[0])
    return found


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in CASES])
def test_groups_equal_peft_groups(case, tmp_path):
    theirs, ours = both(case, tmp_path)
    kw = dict(loraplus_weight_decay=0.05, loraplus_lr_embedding=3e-6)
    want = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0, **kw).param_groups
    got = li.loraplus_param_groups(ours, 1e-3, 8.0, **kw)
    trained = [p for p in ours.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in got) == len(trained) == sum(len(g["params"]) for g in want)
    index = {id(p): i for i, p in enumerate(trained)}
    assert [len(g["params"]) for g in got] == [len(g["params"]) for g in want]
    for g, w in zip(got, want, strict=True):
        assert (g["lr"], g["weight_decay"]) == (w["lr"], w["weight_decay"])
        assert sorted(by_value(w["params"], trained)) == sorted(index[id(p)] for p in g["params"])
    assert len(want[2]["params"]) > 0  # the case has tensors that LoRA+ speeds up


def test_groups_train_with_any_optimizer():
    model = li.mark_only_adapters_as_trainable(li.inject(gpt2(), "c_attn", r=2))
    groups = li.loraplus_param_groups(model, 1e-2, loraplus_lr_ratio=4.0)
    B = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in B} and groups[2]["lr"] == 4e-2
    with torch.no_grad():
        for p in B:
            p.normal_()
    before = [p.detach().clone() for g in groups for p in g["params"]]
    for opt in (torch.optim.SGD(groups), torch.optim.Adam(groups)):
        opt.zero_grad()
        model(torch.randint(1, 40, (2, 5))).last_hidden_state.square().mean().backward()
        opt.step()
    after = [p.detach() for g in groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("kind", ["loha", "lokr", "oft", "ia3"])
def test_kinds_without_a_b_factor_are_refused(kind):
    options = {"ia3": dict(feedforward=False), "oft": dict(oft_block_size=4, r=0)}.get(kind, {})
    model = li.mark_only_adapters_as_trainable(li.inject(llama(), ["q_proj"], kind=kind, **options))
    with pytest.raises(ValueError, match=rf"adapter 'default' is of kind '{kind}', in which no tensor is LoRA\+'s B"):
        li.loraplus_param_groups(model, 1e-3)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(lr=0.0), r"`lr` must be a finite real number, positive, got 0\.0", id="lr-zero"),
    pytest.param(dict(lr=1e-3, loraplus_lr_ratio=float("nan")), r"`loraplus_lr_ratio` must be a finite", id="nan"),
    pytest.param(dict(lr=1e-3, loraplus_weight_decay=-1.0), r"`loraplus_weight_decay` .* at least 0", id="decay"),
    pytest.param(dict(lr=True), r"`lr` must be a finite real number", id="bool"),
])
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        li.loraplus_param_groups(li.inject(nn.Linear(4, 4), "", r=2), **kwargs)


def test_a_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"`model` must be an nn\.Module, got list"):
        li.loraplus_param_groups([], 1e-3)
