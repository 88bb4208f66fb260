r"""Trainable tokens, as peft 0.21's ``trainable_token_indices``: chosen rows train in full.

The adapter holds ``trainable_tokens_delta``, one row per index in ``token_indices`` (the rows'
new values, not increments, as peft keeps them), filled from the weight's rows at injection; the
other rows stay ``W0``'s, frozen. In the stored layout, row ``i`` is token ``i`` both for an
``Embedding`` ``(vocab, dim)`` and for a ``Linear`` head ``(vocab, dim)``, so one adapter on a
tied embedding serves the lookup and the head alike::

    W' = W0 with W'[token_indices[k]] = trainable_tokens_delta[k]

peft's key below the module path: ``token_adapter.trainable_tokens_delta``. There is no rank and
no alpha. :func:`~lora_inject.inject`'s ``trainable_token_indices=`` puts this kind on the input
embeddings (or on the modules it names), beside the adapter's other tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._view import View
from ..kind import Kind, Option, integer, register_kind


def _indices(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) > 0 and all(integer(i) and i >= 0 for i in v)
            and len(set(v)) == len(v))


def create(view: View, r, alpha, options) -> dict[str, Tensor]:
    idx = options["token_indices"]
    if view.experts or len(view.shape) < 2:
        raise ValueError(f"inject(kind='tokens'): trainable tokens are rows of a 2-D weight (an Embedding, a "
                         f"Linear head), got a tensor of shape {view.shape}. Leave that module out.")
    if max(idx) >= view.shape[0]:
        raise ValueError(f"inject(kind='tokens'): `token_indices` holds {max(idx)}, but the weight has "
                         f"{view.shape[0]} rows (tokens). Pass indices below {view.shape[0]}.")
    return {"trainable_tokens_delta": torch.zeros(len(idx), *view.shape[1:])}  # filled from W's rows


def _index(options, device) -> Tensor:
    return torch.tensor(list(options["token_indices"]), dtype=torch.long, device=device)


def fill(params, W: Tensor, view: View, options) -> None:
    params["trainable_tokens_delta"].copy_(W[_index(options, W.device)])


def apply(W: Tensor, params, view: View, scaling: float, options) -> Tensor:
    stored = view.stored(W)  # (vocab, dim): the rows are tokens
    rows = params["trainable_tokens_delta"].to(stored.dtype)
    return view.rows(stored.index_copy(0, _index(options, stored.device), rows))


TOKENS = Kind(
    name="tokens",
    create=create,
    apply=apply,
    fill=fill,
    options=(Option("token_indices", (), _indices, "a non-empty list of distinct token ids (ints >= 0)"),),
    scaling=lambda r, alpha, options: 1.0,
    default_r=None,
    default_alpha=None,
    peft_key=lambda tensor_name: "token_adapter.trainable_tokens_delta",
)
register_kind("tokens", TOKENS)
