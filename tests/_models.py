"""The tiny Hugging Face models the tests build (random weights from small configs, nothing downloaded).

A plain module rather than fixtures: module-level parametrizations, hypothesis tests and the
forked ranks of ``_dist_worker.py`` build these too. Each builder has two shapes:

- ``head=False`` (the default): the bare model (``GPT2Model``, ``LlamaModel``, ``BertModel``),
  width 16, in eval mode; the adapter-file and adapter-arithmetic tests use it.
- ``head=True``: the model with its language-model head (``GPT2LMHeadModel``, ``LlamaForCausalLM``;
  ``BertModel`` with its pooler for bert), width 32, vocabulary :data:`LM_VOCAB`, without dropout
  and in training mode; the training, compile, half-precision and peft-comparison tests use it.

``seed`` (when given) calls ``torch.manual_seed`` just before the model is built; ``dtype`` (when
given) casts the floating tensors after; ``**config`` overrides entries of the config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

LM_VOCAB = 64


def _build(cls, config, *, eval: bool, seed: int | None, dtype: torch.dtype | None, **kwargs) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(config, **kwargs)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval() if eval else model


def gpt2(layers: int = 2, width: int | None = None, *, head: bool = False, seed: int | None = None,
         dtype: torch.dtype | None = None, **config) -> GPT2Model | GPT2LMHeadModel:
    """A tiny GPT-2: ``GPT2Model`` (vocabulary 50), or with ``head`` ``GPT2LMHeadModel`` without dropout."""
    if head:
        base = dict(n_embd=width or 32, n_layer=layers, n_head=2, vocab_size=LM_VOCAB, n_positions=32,
                    bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        base = dict(n_layer=layers, n_embd=width or 16, n_head=2, vocab_size=50, n_positions=32,
                    bos_token_id=0, eos_token_id=0)
    return _build(GPT2LMHeadModel if head else GPT2Model, GPT2Config(**{**base, **config}),
                  eval=not head, seed=seed, dtype=dtype)


def llama(layers: int = 2, width: int | None = None, *, head: bool = False, seed: int | None = None,
          dtype: torch.dtype | None = None, **config) -> LlamaModel | LlamaForCausalLM:
    """A tiny Llama: ``LlamaModel`` (2 heads, 1 KV head, vocabulary 40), or with ``head``
    ``LlamaForCausalLM`` (4 heads, 2 KV heads)."""
    if head:
        base = dict(hidden_size=width or 32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=LM_VOCAB, max_position_embeddings=32)
    else:
        base = dict(hidden_size=width or 16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=40, max_position_embeddings=32)
    return _build(LlamaForCausalLM if head else LlamaModel, LlamaConfig(**{**base, **config}),
                  eval=not head, seed=seed, dtype=dtype)


def bert(layers: int = 2, width: int | None = None, *, head: bool = False, seed: int | None = None,
         dtype: torch.dtype | None = None, **config) -> BertModel:
    """A tiny BERT: without its pooler (vocabulary 50), or with ``head`` with its pooler and without dropout."""
    if head:
        base = dict(hidden_size=width or 32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                    vocab_size=LM_VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    else:
        base = dict(hidden_size=width or 16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                    vocab_size=50, max_position_embeddings=32)
    kwargs = {} if head else dict(add_pooling_layer=False)
    return _build(BertModel, BertConfig(**{**base, **config}), eval=not head, seed=seed, dtype=dtype, **kwargs)


def bert_classifier(layers: int = 2) -> BertForSequenceClassification:
    """The tiny BERT sequence classifier the Trainer tests train (seed 0, two labels, no dropout)."""
    cfg = BertConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(BertForSequenceClassification, cfg, eval=False, seed=0, dtype=None)


def classification_data(n: int = 24) -> list[dict]:
    """``n`` rows of 8 token ids for :func:`bert_classifier`, labelled by their first id's parity."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    return [{"input_ids": i, "labels": int(i[0] % 2)} for i in ids]
