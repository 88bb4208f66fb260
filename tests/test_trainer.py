"""AdapterTrainer: a real transformers.Trainer on CPU whose checkpoints hold the adapter, and a
resumed run that ends exactly where an uninterrupted one does."""

from __future__ import annotations

import copy
import os
import warnings

import peft
import pytest
import torch
from _models import bert_classifier as base_model
from _models import classification_data as data
from transformers import TrainingArguments

import lora_inject as li
from lora_inject.trainer import AdapterTrainer


def trainer(model, out, format="lora_inject", **kw) -> AdapterTrainer:
    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=6, save_steps=3,
                             learning_rate=5e-2, logging_steps=100, report_to=[], seed=3,
                             use_cpu=True, dataloader_num_workers=0, **kw)
    return AdapterTrainer(model=model, args=args, train_dataset=data(), adapter_format=format)


def adapted(base):
    torch.manual_seed(2)
    model = li.inject(copy.deepcopy(base), ["query", "value"], r=4, alpha=8)
    li.inject(model, "classifier", r=2)
    return li.mark_only_lora_as_trainable(model)


def factors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in li.lora_state_dict(model).items()}


def train(trainer_, **kw):
    with warnings.catch_warnings():  # transformers' notes on CPU and its own deprecations
        warnings.simplefilter("ignore")
        trainer_.train(**kw)


@pytest.mark.parametrize("format", ["lora_inject", "peft"])
def test_checkpoints_hold_the_adapter_and_resume_is_exact(format, tmp_path):
    base = base_model()
    whole = adapted(base)
    train(trainer(whole, tmp_path / "whole", format))
    ckpt = tmp_path / "whole" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    weights = "adapter.safetensors" if format == "lora_inject" else "adapter_model.safetensors"
    assert weights in files and not files & {"model.safetensors", "pytorch_model.bin"}
    assert os.path.getsize(ckpt / weights) < 20_000  # the adapter, not the model's 100+ KB

    # the checkpoint is the adapter after 3 steps: a fresh base loads it
    halfway = adapted(base)
    train(trainer(halfway, tmp_path / "half", format, ), )  # 6 steps again, to compare against step 3
    at3 = li.load_adapter(copy.deepcopy(base), tmp_path / "half" / "checkpoint-3")
    assert factors(at3).keys() == factors(whole).keys()

    # a run stopped at step 3 and resumed ends bit for bit where the uninterrupted run did
    resumed = adapted(base)
    with torch.no_grad():  # start from other values, so only the checkpoint can make them equal
        for p in li.lora_parameters(resumed):
            p.add_(1.0)
    train(trainer(resumed, tmp_path / "whole", format), resume_from_checkpoint=str(ckpt))
    want, got = factors(whole), factors(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(want[k], factors(at3)[k]) for k in want)  # steps 4-6 did train

    # the base weights were never written
    for name, p in base.state_dict().items():
        assert torch.equal(whole.state_dict()[name], p)
    if format == "peft":
        x = torch.randint(1, 50, (2, 8))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(ckpt)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(x).logits, at3.eval()(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format", ["lora_inject", "peft"])
def test_a_new_head_trains_whole_and_reloads_both_ways(format, tmp_path):
    """A classifier whose head is new (peft's modules_to_save): it trains, the checkpoint holds it,
    and both lora_inject and peft read it back to the trained model's outputs."""
    base = base_model()
    torch.manual_seed(2)
    model = li.inject(copy.deepcopy(base), ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    li.mark_only_lora_as_trainable(model)  # leaves the head's copy trainable: it is the adapter's
    train(trainer(model, tmp_path / "run", format))
    head = model.classifier.parametrizations.weight[0].full["default"]
    assert not torch.equal(head, base.classifier.weight)  # the head trained
    for name, p in base.state_dict().items():  # and W0 did not
        assert torch.equal(model.state_dict()[name], p)
    x = torch.randint(1, 50, (3, 8))
    want = model.eval()(x).logits.detach()
    ckpt = tmp_path / "run" / "checkpoint-6"
    ours = li.load_adapter(copy.deepcopy(base), ckpt).eval()
    assert torch.equal(ours(x).logits, want)
    if format == "peft":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(ckpt)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(x).logits, want, rtol=1e-5, atol=1e-5)


def test_save_model_writes_the_adapter(tmp_path):
    base = base_model()
    model = adapted(base)
    t = trainer(model, tmp_path / "run")
    train(t)
    t.save_model(str(tmp_path / "final"))
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "final")
    assert all(torch.equal(a, b) for a, b in zip(factors(model).values(), factors(back).values()))


def test_training_what_a_checkpoint_would_not_hold_is_refused(tmp_path):
    model = li.inject(base_model(), ["query", "value"], r=4)  # the rest stays trainable
    with pytest.raises(ValueError, match=r"parameters outside adapter 'default' require grad .*"
                                         r"modules_to_save=\['classifier'\].*mark_only_lora_as_trainable"):
        trainer(model, tmp_path).train()
    with pytest.raises(ValueError, match=r"no adapter 'default' to train"):
        trainer(base_model(), tmp_path).train()


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`adapter_format` must be 'lora_inject' or 'peft', got 'bin'"):
        trainer(adapted(base_model()), tmp_path, "bin")


def test_a_model_quantized_by_from_pretrained_trains(tmp_path):
    """transformers refuses a "purely quantized" model in Trainer unless adapters are attached."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                                                      bnb_4bit_compute_dtype=torch.float32))
    assert model.is_quantized and type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    li.mark_only_lora_as_trainable(li.inject(model, ["q_proj", "v_proj"], r=4, alpha=8))
    with torch.no_grad():
        for p in li.lora_parameters(model):  # B nonzero, so that A gets a gradient too
            p.normal_(0, 0.1)
    before = factors(model)
    ids = torch.randint(1, 50, (16, 8), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, save_steps=2,
                             learning_rate=5e-2, logging_steps=100, report_to=[], use_cpu=True,
                             dataloader_num_workers=0)
    t = AdapterTrainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids])
    assert not getattr(model, "_hf_peft_config_loaded", False)  # told for the check only
    train(t)
    after = factors(model)
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert not any(f.name.startswith(("model", "pytorch_model")) for f in ckpt.iterdir())
    saved = li.load_adapter(copy.deepcopy(model), ckpt)
    for k, v in li.lora_state_dict(saved).items():
        assert torch.equal(v, after[k])
