"""Hugging Face models built from tiny configs (random weights, nothing downloaded)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from _models import LM_VOCAB, bert, gpt2, llama
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

import lora_inject as li

LAYERS = 2
VOCAB = LM_VOCAB


def names(prefix: str, layer_mods: list[str]) -> set[str]:
    return {f"{prefix}.{i}.{m}.weight" for i in range(LAYERS) for m in layer_mods}


# (build, our targets, peft's LoraConfig arguments for the same modules, the adapted tensors)
MODELS = [
    pytest.param(partial(gpt2, LAYERS, head=True), "attn.*",
                 dict(target_modules=r".*\.attn\.(c_attn|c_proj)", fan_in_fan_out=True),
                 names("transformer.h", ["attn.c_attn", "attn.c_proj"]), id="gpt2"),
    pytest.param(partial(bert, LAYERS, head=True), "query|value", dict(target_modules=["query", "value"]),
                 names("encoder.layer", ["attention.self.query", "attention.self.value"]), id="bert"),
    pytest.param(partial(llama, LAYERS, head=True), "q_proj|v_proj", dict(target_modules=["q_proj", "v_proj"]),
                 names("model.layers", ["self_attn.q_proj", "self_attn.v_proj"]), id="llama"),
]


def output(model, ids) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_gpt2_attn_adapts_c_attn_and_c_proj_of_every_block_and_nothing_else():
    model = gpt2(LAYERS, head=True)
    li.inject(model, "attn.*", r=4)
    assert {n for n, _ in li.named_loras(model)} == {
        f"transformer.h.{i}.attn.{m}.weight" for i in range(LAYERS) for m in ("c_attn", "c_proj")}
    for i in range(LAYERS):
        block = model.transformer.h[i]
        assert isinstance(block.attn.c_attn, Conv1D) and isinstance(block.attn.c_proj, Conv1D)
        assert type(block.mlp.c_proj) is Conv1D  # matched by name elsewhere, but not under "attn"
    lora = next(li.named_loras(model))[1]
    assert lora.lora_A["default"].shape == (4, 32) and lora.lora_B["default"].shape == (96, 4)  # c_attn


@pytest.mark.parametrize("build, targets, peft_kwargs, adapted", MODELS)
def test_outputs_unchanged_then_training_changes_them_and_keeps_w0(build, targets, peft_kwargs, adapted):
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = output(model, ids)
    li.inject(model, targets, r=4, alpha=8)
    assert {n for n, _ in li.named_loras(model)} == adapted
    with torch.no_grad():
        assert torch.equal(output(model, ids), before)  # float32, bit for bit

    li.mark_only_lora_as_trainable(model)
    model.train()
    opt = torch.optim.AdamW(li.lora_parameters(model), lr=1e-2)
    target = torch.randn_like(before)
    for _ in range(3):
        opt.zero_grad()
        loss = (output(model, ids) - target).pow(2).mean()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = output(model, ids)
    assert (after - before).abs().max() > 1e-3
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    for name, _ in li.named_loras(model):  # W0 did not move
        module_name, tensor = name.rsplit(".", 1)
        original = model.get_submodule(module_name).parametrizations[tensor].original
        assert torch.equal(original, base_state[name])

    li.remove(model, merge=False)
    state = model.state_dict()
    assert list(state) == list(base_state)
    assert all(torch.equal(state[k], v) for k, v in base_state.items())


@pytest.mark.parametrize("build, targets, peft_kwargs, adapted", MODELS)
def test_trainable_parameters_are_exactly_the_lora_ones_and_match_peft(build, targets, peft_kwargs, adapted):
    model = build()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, **peft_kwargs))
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    peft_adapted = {n.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
                    for n, _ in peft_model.named_parameters() if n.endswith(".base_layer.weight")}
    assert peft_adapted == {n.removesuffix(".weight") for n in adapted}  # the same modules, as peft sees them

    li.inject(model, targets, r=4, alpha=8)
    li.mark_only_lora_as_trainable(model)
    lora_ids = {id(p) for p in li.lora_parameters(model)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if id(p) in lora_ids}
    assert len(trainable) == 2 * len(adapted)
    assert sum(p.numel() for p in li.lora_parameters(model)) == peft_trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == peft_trainable


def test_targets_as_a_list_of_names_select_what_peft_target_modules_selects():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32, max_position_embeddings=16)
    names = ["q_proj", "v_proj", "mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    ours = li.inject(LlamaForCausalLM(config), names, r=2)
    theirs = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=names))
    prefix = "base_model.model."
    peft_adapted = {n.removeprefix(prefix) + ".weight" for n, m in theirs.named_modules() if hasattr(m, "lora_A")
                    and n.startswith(prefix)}
    assert {n for n, _ in li.named_loras(ours)} == peft_adapted and len(peft_adapted) == 2 * 3 + 1
    with pytest.raises(TypeError, match=r"`targets` as a list must hold module names"):
        li.inject(LlamaForCausalLM(config), ["q_proj", 3], r=2)


def test_save_pretrained_while_attached_keeps_every_base_key(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
    torch.manual_seed(0)
    base = BertModel(config)
    plain_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = li.inject(base, r"query|value", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    sd = model.state_dict()
    lora_keys = set(li.lora_state_dict(model))
    assert set(sd) - lora_keys == set(plain_sd)  # W0 under the names the model had
    assert all(torch.equal(sd[k], plain_sd[k]) for k in plain_sd)
    model.save_pretrained(tmp_path / "attached")
    reloaded, info = AutoModel.from_pretrained(tmp_path / "attached", output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and set(info["unexpected_keys"]) == lora_keys
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, plain_sd[k], rtol=0, atol=0, msg=k)
    fresh = li.inject(BertModel(config), r"query|value", r=2)
    fresh.load_state_dict(sd, strict=True)  # back into an adapted model, strictly
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(fresh.eval()(ids).last_hidden_state, model.eval()(ids).last_hidden_state)
    assert list(li.remove(fresh, merge=False).state_dict()) == list(plain_sd)
