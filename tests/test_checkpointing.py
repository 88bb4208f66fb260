"""Gradient checkpointing through transformers (``gradient_checkpointing_enable``), in both
``use_reentrant`` modes, with dropout in the model and in the LoRA branch: the losses and the
gradients equal those of a run without checkpointing, bit for bit (checkpointing keeps the RNG
state, so the recomputed forward draws the same dropout masks).

With ``use_reentrant=True`` the checkpointed layers' inputs must require grad, or no gradient
reaches the adapters inside them; transformers 5 makes the input embeddings' output require grad
itself (``enable_input_require_grads``) for a model whose input is ``input_ids``, as peft asks its
users to do, and nothing more is needed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import LM_VOCAB, gpt2, llama

import lora_inject as li

MODELS = {
    "gpt2": (lambda: gpt2(head=True, seed=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
             ["c_attn", "c_fc", "c_proj"]),
    "llama": (lambda: llama(head=True, seed=0, attention_dropout=0.1), ["q_proj", "v_proj", "down_proj"]),
    "llama-embeddings": (lambda: llama(head=True, seed=0, attention_dropout=0.1), ["embed_tokens", "o_proj"]),
}


def adapted(name: str):
    build, targets = MODELS[name]
    model = li.mark_only_lora_as_trainable(li.inject(build(), targets, r=4, alpha=8, dropout=0.1))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.2)
    return model.train()


def steps(model, n: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The losses of ``n`` forward/backward passes from one seed, and the summed gradients."""
    torch.manual_seed(5)
    x = torch.randint(0, LM_VOCAB, (2, 12))
    losses = []
    for _ in range(n):
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
    return torch.stack(losses), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def checkpointed(model, use_reentrant: bool):
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_activation_checkpointing
    return model


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_gives_the_losses_and_gradients_of_a_plain_run(name, use_reentrant):
    losses, grads = steps(adapted(name))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # dropout at work, every factor learns
    again, grads_again = steps(checkpointed(adapted(name), use_reentrant))
    assert torch.equal(again, losses)
    assert grads_again.keys() == grads.keys()
    for k, g in grads.items():
        assert grads_again[k] is not None, f"{k} got no gradient under checkpointing"
        assert torch.equal(grads_again[k], g), k


def test_reentrant_checkpointing_needs_the_hook_transformers_sets():
    """What transformers' ``enable_input_require_grads`` is for: without it, under reentrant
    checkpointing no layer's output requires grad, and backward refuses (it does not fail silently)."""
    model = checkpointed(adapted("llama"), use_reentrant=True)
    model.disable_input_require_grads()
    with pytest.raises(RuntimeError, match="does not require grad"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True", UserWarning)
        steps(model, 1)


def test_dropout_draws_differ_from_step_to_step():
    """The runs compared above draw fresh dropout masks at each pass (the test is not vacuous)."""
    losses, _ = steps(adapted("llama"))
    model = adapted("llama").eval()
    assert losses[0] != losses[1]
    torch.manual_seed(5)
    x = torch.randint(0, LM_VOCAB, (2, 12))
    with torch.no_grad():  # without dropout: another loss
        assert model(input_ids=x, labels=x).loss != losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_adapter_trainer_with_gradient_checkpointing_trains_as_without(use_reentrant, tmp_path):
    from transformers import TrainingArguments

    from lora_inject.trainer import AdapterTrainer

    torch.manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, LM_VOCAB, (8, 12))]
    ends = []
    for checkpointing in (False, True):
        model = adapted("gpt2")
        args = TrainingArguments(str(tmp_path / str(checkpointing)), per_device_train_batch_size=4, max_steps=3,
                                 learning_rate=1e-2, report_to=[], seed=3, use_cpu=True, save_strategy="no",
                                 dataloader_num_workers=0, gradient_checkpointing=checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        with warnings.catch_warnings():  # transformers' notes on CPU and its own deprecations
            warnings.simplefilter("ignore")
            AdapterTrainer(model=model, args=args, train_dataset=data).train()
        assert model.is_activation_checkpointing == checkpointing
        ends.append(li.lora_state_dict(model))
    start = li.lora_state_dict(adapted("gpt2"))
    assert all(not torch.equal(ends[0][k], start[k]) for k in start if ".lora_A." in k)  # it trained
    for k, v in ends[0].items():
        assert torch.equal(ends[1][k], v), k
