"""Language-model heads: modules trained whole (peft's ``modules_to_save``), a tied embedding and
head adapted once, and trainable tokens (peft's ``trainable_token_indices``); each against the
plain model and against peft, both ways."""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from _models import bert_classifier, gpt2, llama
from torch import nn

import lora_inject as li
from lora_inject._tied import Tied

peft = pytest.importorskip("peft")


def jolt(model, adapter=None, scale=0.1):
    """Move every trainable adapter tensor off its init, so the update is not the identity."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in li.lora_parameters(model, adapter):
            p.add_(torch.randn_like(p) * scale)
    return model


def ids(vocab=64):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(3))


def quiet_peft(fn, *args, **kwargs):
    with warnings.catch_warnings():  # peft's and transformers' notes on tied embeddings and deprecations
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- modules_to_save ---------------------------------------------------------------------------------
def test_modules_to_save_train_whole_as_part_of_the_adapter_and_switch_with_it():
    base = bert_classifier().eval()
    x = ids(50)
    model = li.inject(copy.deepcopy(base), ["query", "value", "classifier"], r=2, modules_to_save=["classifier"])
    head = model.classifier
    assert {lora.adapter("default").kind for n, lora in li.named_loras(model) if n.startswith("classifier")} == {"full"}
    assert torch.equal(model(x).logits, base(x).logits)  # a copy of the head: unchanged at init
    li.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.parametrizations.weight.0.full.default", "classifier.parametrizations.bias.0.full.default"} \
        <= trainable
    assert all(".full." in n or ".lora_" in n for n in trainable)
    assert {k for k in li.lora_state_dict(model) if k.startswith("classifier.")} == {
        "classifier.parametrizations.weight.0.full.default", "classifier.parametrizations.bias.0.full.default"}
    assert {"classifier.weight", "classifier.bias"} <= set(model.state_dict())  # the base keys stay
    jolt(model)
    trained = model(x).logits.detach()
    assert not torch.allclose(trained, base(x).logits)
    with li.disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)
    li.activate(model, [])
    assert torch.equal(model(x).logits, base(x).logits)
    li.activate(model, "default")
    merged = li.remove(copy.deepcopy(model))
    torch.testing.assert_close(merged(x).logits, trained)
    w = head.parametrizations.weight.original
    li.remove(model, merge=False)
    assert model.classifier.weight is w and torch.equal(w, base.classifier.weight)
    assert type(model.classifier) is nn.Linear and torch.equal(model(x).logits, base(x).logits)


def test_modules_to_save_naming_nothing_is_refused_and_nothing_changes():
    model = bert_classifier()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`modules_to_save` names 'score', which ends no module's name"):
        li.inject(model, ["query"], r=2, modules_to_save=["score"])
    with pytest.raises(TypeError, match=r"`modules_to_save` must be a list of module names"):
        li.inject(model, ["query"], r=2, modules_to_save="classifier")
    assert_unchanged(model, before)


@pytest.mark.parametrize("fmt", ["lora_inject", "peft"])
def test_modules_to_save_are_saved_and_read_both_ways(fmt, tmp_path):
    base = bert_classifier().eval()
    x = ids(50)
    model = jolt(li.inject(copy.deepcopy(base), ["query"], r=2, modules_to_save=["classifier", "pooler"]))
    want = model(x).logits.detach()
    li.save_adapter(model, tmp_path, format=fmt)
    back = li.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(back(x).logits, want)
    assert li.named_loras(back) and {lora.adapter("default").kind for n, lora in li.named_loras(back)
                                     if n.startswith(("classifier", "bert.pooler"))} == {"full"}
    if fmt == "peft":
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]  # the modules holding them
        theirs = quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(x).logits, want, rtol=0, atol=1e-6)


def test_a_peft_seq_cls_head_loads_as_a_module_trained_whole(tmp_path):
    base = bert_classifier().eval()
    x = ids(50)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(x).logits, theirs.eval()(x).logits, rtol=0, atol=1e-6)
    lora = dict(li.named_loras(ours))["classifier.weight"]
    assert lora.adapter("default").kind == "full"
    with li.disabled(ours), theirs.disable_adapter():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-6)


# -- tied embeddings ---------------------------------------------------------------------------------
def test_a_tied_embedding_is_adapted_once_for_the_lookup_and_the_head():
    base = gpt2(head=True, seed=0).eval()
    x = ids()
    model = li.inject(copy.deepcopy(base), "wte|c_attn", r=4)
    W = model.transformer.wte.parametrizations.weight.original
    assert isinstance(model.lm_head.parametrizations.weight[0], Tied)
    assert model.lm_head.parametrizations.weight.original is W
    assert torch.equal(model(x).logits, base(x).logits)
    assert [n for n, _ in li.named_loras(model)].count("transformer.wte.weight") == 1
    assert "lm_head.weight" not in dict(li.named_loras(model))
    jolt(model)
    out = model(x).logits
    # the oracle: the plain model with the merged weights, tied as it was
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for name, lora in li.named_loras(model):
            plain.get_parameter(name).copy_(model.get_submodule(name.rpartition(".")[0]).weight)
    assert plain.lm_head.weight is plain.transformer.wte.weight
    torch.testing.assert_close(out, plain(x).logits, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # the head's use of the tensor reaches the factors too
    head_only = copy.deepcopy(model)
    for p in li.lora_parameters(head_only):
        p.grad = None
    head_only.lm_head(torch.randn(3, 32)).sum().backward()
    lora = head_only.transformer.wte.parametrizations.weight[0]
    assert lora.lora_B["default"].grad.abs().sum() > 0
    merged = li.remove(copy.deepcopy(model))
    assert merged.lm_head.weight is merged.transformer.wte.weight  # the tie holds
    assert type(merged.lm_head) is nn.Linear and not hasattr(merged.lm_head, "parametrizations")
    torch.testing.assert_close(merged(x).logits, out.detach(), rtol=1e-5, atol=1e-5)
    li.remove(model, merge=False)
    assert model.lm_head.weight is W and model.transformer.wte.weight is W and W.requires_grad
    assert torch.equal(model(x).logits, base(x).logits)
    assert list(model.state_dict()) == list(base.state_dict())


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


@pytest.mark.parametrize("targets, holder", [("head", "head"), ("emb|head", "emb"), ("emb", "emb")])
def test_a_tied_pair_takes_one_adapter_whichever_users_are_selected(targets, holder):
    model = Pair().double()
    x = torch.tensor([[1, 4, 9]])
    before = model(x).detach()
    li.inject(model, targets, r=2)
    assert [n for n, _ in li.named_loras(model)] == [f"{holder}.weight"]
    other = model.emb if holder == "head" else model.head
    assert isinstance(other.parametrizations.weight[0], Tied)
    li.inject(model, "emb", r=2, adapter="b")  # a second adapter at either user joins the same LoRA
    assert dict(li.named_loras(model))[f"{holder}.weight"].adapters == ["default", "b"]
    jolt(model)
    state = model.state_dict()
    assert {"emb.weight", "head.weight"} <= set(state)
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
    again = li.inject(li.inject(Pair().double(), targets, r=2), "emb", r=2, adapter="b")
    again.load_state_dict(state)  # strict: the same keys
    assert torch.equal(again(x), model(x))
    li.remove(model, merge=False)
    assert model.head.weight is model.emb.weight and torch.equal(model(x), before)


@pytest.mark.parametrize("fmt", ["lora_inject", "peft"])
def test_a_tied_gpt2_keeps_its_tie_through_save_and_load(fmt, tmp_path):
    base = gpt2(head=True, seed=0).eval()
    x = ids()
    model = jolt(li.inject(copy.deepcopy(base), "wte|c_attn", r=2))
    want = model(x).logits.detach()
    li.save_adapter(model, tmp_path, format=fmt)
    back = li.load_adapter(copy.deepcopy(base), tmp_path)
    assert isinstance(back.lm_head.parametrizations.weight[0], Tied)
    torch.testing.assert_close(back(x).logits, want, rtol=1e-6, atol=1e-6)
    if fmt == "peft":  # peft gets the head's LoRA, the embedding's transposed: the same outputs
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert "lm_head" in config["target_modules"] and not config["ensure_weight_tying"]
        theirs = quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(x).logits, want, rtol=1e-5, atol=1e-5)


def test_a_tied_llama_is_written_for_peft_with_ensure_weight_tying_and_read_back(tmp_path):
    base = llama(head=True, seed=0, tie_word_embeddings=True).eval()
    x = ids()
    model = jolt(li.inject(copy.deepcopy(base), "embed_tokens|q_proj", r=2))
    want = model(x).logits.detach()
    li.save_adapter(model, tmp_path / "ours", format="peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True
    theirs = quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x).logits, want, rtol=1e-5, atol=1e-5)
    # and peft's own file for a tied embedding
    made = quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True, init_lora_weights=False)).eval()
    quiet_peft(made.save_pretrained, tmp_path / "theirs")
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert isinstance(back.lm_head.parametrizations.weight[0], Tied)
    torch.testing.assert_close(back(x).logits, made(x).logits, rtol=1e-5, atol=1e-5)


def test_a_peft_adapter_on_one_user_of_a_tied_tensor_is_refused(tmp_path):
    """peft's LoRA on GPT-2's wte alone reaches the lookup and not the head that shares the tensor."""
    base = gpt2(head=True, seed=0).eval()
    made = quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["wte"], init_lora_weights=False))
    quiet_peft(made.save_pretrained, tmp_path)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"gives `transformer\.wte\.weight` and `lm_head` different values, but they "
                                         r"are one tied tensor.*tie_word_embeddings=False"):
        li.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


# -- trainable tokens --------------------------------------------------------------------------------
def test_trainable_tokens_train_their_rows_only_and_the_tied_head_reads_them():
    base = gpt2(head=True, seed=0)
    x = ids()
    model = li.inject(copy.deepcopy(base), "c_attn", r=2, trainable_token_indices=[1, 5, 7])
    li.mark_only_lora_as_trainable(model)
    assert torch.equal(model(x).logits, base(x).logits)
    W0 = base.transformer.wte.weight.detach()
    opt = torch.optim.SGD(li.lora_parameters(model), lr=1.0)
    model(x).logits.square().mean().backward()
    opt.step()
    W = model.transformer.wte.weight.detach()
    rows = torch.tensor([1, 5, 7])
    rest = torch.ones(64, dtype=torch.bool)
    rest[rows] = False
    assert torch.equal(W[rest], W0[rest]) and not torch.equal(W[rows], W0[rows])
    assert torch.equal(model.lm_head.weight, W)  # the tied head reads the same rows
    delta = model.transformer.wte.parametrizations.weight[0].trainable_tokens_delta["default"]
    assert torch.equal(W[rows], delta)


@pytest.mark.parametrize("fmt", ["lora_inject", "peft"])
def test_trainable_tokens_are_saved_and_read_both_ways(fmt, tmp_path):
    base = gpt2(head=True, seed=0).eval()
    x = ids()
    model = jolt(li.inject(copy.deepcopy(base), "c_attn", r=2, trainable_token_indices={"wte": [2, 3, 60]}))
    want = model(x).logits.detach()
    li.save_adapter(model, tmp_path, format=fmt)
    back = li.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(back(x).logits, want)
    if fmt == "peft":
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["trainable_token_indices"] == {"transformer.wte": [2, 3, 60]}
        theirs = quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(x).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_trainable_tokens_on_a_tied_llama_load(tmp_path):
    base = llama(head=True, seed=0, tie_word_embeddings=True).eval()
    x = ids()
    made = quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices=[3, 4], init_lora_weights=False)).eval()
    with torch.no_grad():
        made.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
    made.save_pretrained(tmp_path)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(x).logits, made(x).logits, rtol=1e-5, atol=1e-5)
    with li.disabled(ours), made.disable_adapter():
        torch.testing.assert_close(ours(x).logits, made(x).logits, rtol=1e-5, atol=1e-5)


def test_bad_token_indices_are_refused_and_nothing_changes():
    model = gpt2(head=True, seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`token_indices` holds 64, but the weight has 64 rows"):
        li.inject(model, "c_attn", r=2, trainable_token_indices=[1, 64])
    with pytest.raises(TypeError, match=r"`trainable_token_indices` must hold non-empty lists of distinct"):
        li.inject(model, "c_attn", r=2, trainable_token_indices=[1, 1])
    with pytest.raises(ValueError, match=r"`trainable_token_indices` names `transformer\.wte`, whose weight "
                                         r"carries adapter 'default' already"):
        li.inject(model, "c_attn|wte", r=2, trainable_token_indices=[1])
    assert_unchanged(model, before)
    seq = nn.Sequential(OrderedDict(emb=nn.Embedding(5, 2)))
    with pytest.raises(TypeError, match=r"has no get_input_embeddings\(\)"):
        li.inject(seq, "emb", r=1, trainable_token_indices=[1])


def test_peft_trainable_tokens_alone_load(tmp_path):
    """peft_type TRAINABLE_TOKENS: the tokens without a LoRA, saved at the embedding and its tied head."""
    base = llama(head=True, seed=0, tie_word_embeddings=True).eval()
    x = ids()
    made = quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=[1, 4, 9]))
    with torch.no_grad():
        made.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].add_(1.0)
    made.save_pretrained(tmp_path)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path)
    assert [n for n, _ in li.named_loras(ours)] == ["model.embed_tokens.weight"]
    torch.testing.assert_close(ours(x).logits, made.eval()(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["lora_inject", "peft"])
def test_a_head_and_tokens_load_in_place_into_the_same_parameters(fmt, tmp_path):
    """An adapter the model already carries (a resumed run) is swapped in place, tokens and head too."""
    base = bert_classifier().eval()
    x = ids(50)

    def adapted():
        return li.inject(copy.deepcopy(base), ["query"], r=2, modules_to_save=["classifier"],
                         trainable_token_indices={"word_embeddings": [3, 4]})

    model = jolt(adapted())
    li.save_adapter(model, tmp_path, format=fmt)
    other = adapted()
    before = [id(p) for p in li.lora_parameters(other)]
    li.load_adapter(other, tmp_path)
    assert [id(p) for p in li.lora_parameters(other)] == before
    assert torch.equal(other(x).logits, model(x).logits)
