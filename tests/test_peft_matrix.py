"""peft's format both ways, over a matrix of peft configurations, with peft itself as the oracle.

For each configuration peft makes an adapter with every trainable tensor random (factors,
``modules_to_save`` copies, biases) and saves it; we load it and must give peft's outputs; we save
it back in peft's format, and peft must give the same outputs from that. The few configurations
that peft's format cannot express for us are refused, and the test names each.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from _helpers import assert_unchanged, snapshot
from _models import bert, gpt2, llama
from test_adapter_io import ConvNet
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import lora_inject as li


def bert_cls() -> nn.Module:
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def llama_cls() -> nn.Module:
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, max_position_embeddings=32, num_labels=2,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def moe() -> nn.Module:
    cfg = Qwen3MoeConfig(vocab_size=40, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                         num_experts_per_tok=2, head_dim=8, max_position_embeddings=32)
    return Qwen3MoeForCausalLM(cfg).eval()


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(self.mha(x, x, x, need_weights=False)[0])


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x):
        return self.conv(x)


BUILD = {"bert": bert, "bert_cls": bert_cls, "gpt2": gpt2, "llama": llama, "llama_cls": llama_cls,
         "convnet": ConvNet, "moe": moe, "mha": Attention,
         "grouped": Grouped}


def inputs(name: str, model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    if name == "convnet":
        return torch.randn(2, 3, 6, 7)
    if name == "grouped":
        return torch.randn(2, 4, 5, 5)
    if name == "mha":
        return torch.randn(5, 2, 16)
    return torch.randint(1, model.config.vocab_size, (2, 7))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


SEQ_CLS = peft.TaskType.SEQ_CLS
BERT_QV = ["query", "value"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# id: (model, LoraConfig kwargs)
CASES = {
    "bert-qv": ("bert", dict(r=4, lora_alpha=8, target_modules=BERT_QV)),
    "bert-qv-r1": ("bert", dict(r=1, lora_alpha=1, target_modules=BERT_QV)),
    "bert-all-dense": ("bert", dict(r=2, target_modules=["query", "key", "value", "dense"])),
    "bert-regex": ("bert", dict(r=2, target_modules=r".*\.attention\.self\.(query|value)")),
    "bert-rslora": ("bert", dict(r=4, lora_alpha=8, target_modules=BERT_QV, use_rslora=True)),
    "bert-rank-pattern": ("bert", dict(r=4, target_modules=BERT_QV, rank_pattern={"value": 2})),
    "bert-alpha-pattern": ("bert", dict(r=4, target_modules=BERT_QV, alpha_pattern={"query": 3})),
    "bert-exclude": ("bert", dict(r=2, target_modules=["dense"], exclude_modules=["output.dense"])),
    "bert-dropout": ("bert", dict(r=2, target_modules=BERT_QV, lora_dropout=0.1)),
    "bert-gaussian": ("bert", dict(r=2, target_modules=BERT_QV, init_lora_weights="gaussian")),
    "bert-embeddings": ("bert", dict(r=2, target_modules=["word_embeddings", "query"])),
    "bert-dora": ("bert", dict(r=2, target_modules=BERT_QV, use_dora=True)),
    "bert-dora-embeddings": ("bert", dict(r=2, target_modules=["word_embeddings"], use_dora=True)),
    "bert-bias-all": ("bert", dict(r=2, target_modules=BERT_QV, bias="all")),
    "bert-bias-lora-only": ("bert", dict(r=2, target_modules=BERT_QV, bias="lora_only")),
    "bert-layers": ("bert", dict(r=2, target_modules=BERT_QV, layers_to_transform=[1], layers_pattern="layer")),
    "bert-layer-int": ("bert", dict(r=2, target_modules=BERT_QV, layers_to_transform=0, layers_pattern="layer")),
    "bert-layers-default-pattern": ("bert", dict(r=2, target_modules=BERT_QV, layers_to_transform=[0])),
    "bert-modules-to-save": ("bert", dict(r=2, target_modules=["query"], modules_to_save=["LayerNorm"])),
    "bert-cls": ("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV)),
    "bert-cls-all": ("bert_cls", dict(task_type=SEQ_CLS, r=4, target_modules=["query", "key", "value", "dense"])),
    "bert-cls-rslora": ("bert_cls", dict(task_type=SEQ_CLS, r=4, target_modules=BERT_QV, use_rslora=True)),
    "bert-cls-bias": ("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV, bias="all")),
    "bert-cls-dora": ("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV, use_dora=True)),
    "bert-cls-pooler": ("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV,
                                         modules_to_save=["classifier", "pooler"])),
    "bert-cls-layers": ("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV, layers_to_transform=[1],
                                         layers_pattern="layer")),
    "gpt2-attn": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-all": ("gpt2", dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-regex": ("gpt2", dict(r=2, target_modules=r"h\.1\.(attn|mlp)\.c_proj", fan_in_fan_out=True)),
    "gpt2-embeddings": ("gpt2", dict(r=2, target_modules=["wte", "wpe"])),
    "gpt2-dora": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    "gpt2-bias-all": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
    "gpt2-bias-lora-only": ("gpt2", dict(r=2, target_modules=["c_fc"], fan_in_fan_out=True, bias="lora_only")),
    "gpt2-layers": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, layers_to_transform=[1],
                                 layers_pattern="h")),
    "gpt2-modules-to-save": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                          modules_to_save=["ln_f"])),
    "gpt2-rank-alpha": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                     rank_pattern={"c_fc": 2}, alpha_pattern={"h.0.attn.c_attn": 16})),
    "llama-qv": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "llama-all": ("llama", dict(r=2, lora_alpha=4, target_modules=LLAMA_ALL)),
    "llama-all-rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL, use_rslora=True)),
    "llama-embed": ("llama", dict(r=2, target_modules=["embed_tokens", "q_proj"])),
    "llama-dora": ("llama", dict(r=2, target_modules=LLAMA_ALL, use_dora=True)),
    "llama-layers": ("llama", dict(r=2, target_modules=LLAMA_ALL, layers_to_transform=[0], layers_pattern="layers")),
    "llama-layers-default": ("llama_cls", dict(task_type=SEQ_CLS, r=2, target_modules=["q_proj"],
                                               layers_to_transform=[1])),
    "llama-exclude-regex": ("llama", dict(r=2, target_modules=LLAMA_ALL, exclude_modules=r".*\.1\..*")),
    "llama-modules-to-save": ("llama", dict(r=2, target_modules=["q_proj"], modules_to_save=["norm"])),
    "llama-cls": ("llama_cls", dict(task_type=SEQ_CLS, r=2, target_modules=["q_proj", "v_proj"])),
    "llama-cls-all": ("llama_cls", dict(task_type=SEQ_CLS, r=2, target_modules=LLAMA_ALL, use_rslora=True)),
    "convnet-conv": ("convnet", dict(r=2, target_modules=["conv", "conv2"])),
    "convnet-all": ("convnet", dict(r=2, lora_alpha=3, target_modules=["conv", "conv2", "head"])),
    "convnet-dora": ("convnet", dict(r=2, target_modules=["conv", "head"], use_dora=True)),
    "convnet-bias": ("convnet", dict(r=2, target_modules=["conv"], bias="all")),
    "convnet-head-saved": ("convnet", dict(r=2, target_modules=["conv"], modules_to_save=["head"])),
    "moe-experts": ("moe", dict(r=2, target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                           "experts.down_proj"])),
    "moe-one-param": ("moe", dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"])),
    "moe-params-and-attn": ("moe", dict(r=2, target_modules=["q_proj", "v_proj"],
                                        target_parameters=["mlp.experts.gate_up_proj"])),
    "moe-rslora": ("moe", dict(r=4, target_modules=["o_proj"], target_parameters=["experts.down_proj"],
                               use_rslora=True)),
    "mha": ("mha", dict(r=2, target_modules=["mha"])),
    "mha-and-linear": ("mha", dict(r=4, lora_alpha=2, target_modules=["mha", "lin"])),
    # lora_bias: a bias on lora_B, which the output gains times the scaling
    "bert-lora-bias": ("bert", dict(r=2, target_modules=BERT_QV, lora_bias=True)),
    "bert-lora-bias-and-bias": ("bert", dict(r=2, target_modules=BERT_QV, lora_bias=True, bias="lora_only")),
    "gpt2-lora-bias": ("gpt2", dict(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True,
                                    rank_pattern={"c_fc": 4}, use_rslora=True)),
    "convnet-lora-bias": ("convnet", dict(r=2, lora_alpha=3, target_modules=["conv", "head"], lora_bias=True)),
    # adapter_model.bin (save_pretrained(safe_serialization=False)), read with weights_only=True
    "bert-qv-bin": ("bert", dict(r=4, lora_alpha=8, target_modules=BERT_QV)),
    "gpt2-lora-bias-bin": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)),
    "bert-cls-bin": ("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV, bias="all")),
    "trainable-tokens": ("bert", dict(r=2, target_modules=BERT_QV, trainable_token_indices=[1, 2])),
    "trainable-tokens-named": ("llama", dict(r=2, target_modules=["q_proj"],
                                             trainable_token_indices={"embed_tokens": [0, 3, 5]})),
}
# What peft's format cannot express for us: each is refused, with the model unchanged.
REFUSED = {
    "lora-bias-no-base-bias": ("llama", dict(r=2, target_modules=["q_proj"], lora_bias=True),
                               r"lora_B\.bias`, but `layers\.0\.self_attn\.q_proj` \(Linear\) has no bias"),
    "pissa": ("bert", dict(r=2, target_modules=BERT_QV, init_lora_weights="pissa"),
              r"init_lora_weights='pissa', which changes the base"),
    "grouped-conv": ("grouped", dict(r=2, target_modules=["conv"]), r"groups=2 \(peft's grouped LoRA"),
}


def peft_adapter(name: str, config: dict, path, safe: bool = True) -> tuple[nn.Module, nn.Module]:
    """(base, peft model) with every trainable tensor random, saved by peft to ``path``."""
    torch.manual_seed(0)
    base = BUILD[name]()
    with warnings.catch_warnings():  # peft's notes on embeddings, grouped conv and lora_bias
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
        with torch.no_grad():
            for _, p in theirs.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=0.3)
        theirs.eval().save_pretrained(path, safe_serialization=safe)
    return base, theirs


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in CASES])
def test_peft_configuration_both_ways(case, tmp_path):
    name, config = CASES[case]
    safe, lora_bias = not case.endswith("-bin"), bool(config.get("lora_bias"))
    base, theirs = peft_adapter(name, config, tmp_path / "peft", safe=safe)
    assert (tmp_path / "peft" / ("adapter_model.safetensors" if safe else "adapter_model.bin")).exists()
    x = inputs(name, base)
    want = run(theirs, x)
    assert (want - run(base, x)).abs().max() > 1e-3, "the adapter must change the outputs"
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run(ours, x), want, rtol=1e-5, atol=1e-5)
    li.save_adapter(ours, tmp_path / "back", format="peft", safe_serialization=safe, lora_bias=lora_bias)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors" if safe else "adapter_model.bin"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert again.peft_config["default"].lora_bias is lora_bias
    torch.testing.assert_close(run(again, x), want, rtol=1e-5, atol=1e-5)
    if lora_bias:  # peft's merge adds s * b to the bias, and so does ours
        theirs_merged = copy.deepcopy(theirs).merge_and_unload()
        ours_merged = li.remove(copy.deepcopy(ours), merge=True)
        for (n, a), (m, b) in zip(theirs_merged.named_parameters(), ours_merged.named_parameters(), strict=True):
            assert n == m
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    li.remove(ours, merge=False)
    torch.testing.assert_close(run(ours, x), run(base, x), rtol=0, atol=0)


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in REFUSED])
def test_what_peft_format_cannot_express_is_refused(case, tmp_path):
    name, config, match = REFUSED[case]
    base, _ = peft_adapter(name, config, tmp_path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        li.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_the_matrix_is_large_and_refuses_little():
    assert len(CASES) + len(REFUSED) >= 60 and len(REFUSED) <= 6


def test_a_saved_head_is_an_exact_update_both_ways_of_remove(tmp_path):
    """SEQ_CLS: peft saves the trained classifier whole; here it is W_saved - W0 on the base head."""
    from safetensors.torch import load_file

    base, _ = peft_adapter("bert_cls", dict(task_type=SEQ_CLS, r=2, target_modules=BERT_QV), tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    head = {k: saved[f"base_model.model.classifier.{k}"] for k in ("weight", "bias")}
    assert not torch.equal(head["weight"], base.classifier.weight)
    merged = li.remove(li.load_adapter(copy.deepcopy(base), tmp_path), merge=True)
    for k, t in head.items():
        torch.testing.assert_close(getattr(merged.classifier, k), t, rtol=0, atol=1e-6)
    restored = li.remove(li.load_adapter(copy.deepcopy(base), tmp_path), merge=False)
    for k in head:
        assert torch.equal(getattr(restored.classifier, k), getattr(base.classifier, k))
