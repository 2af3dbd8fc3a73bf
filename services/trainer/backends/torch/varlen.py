"""SDPA per example for padding-free batches: attention that computes no cross-example scores.

A padding-free batch lays its examples end to end in one row, position_ids restarting at each
example. Flash attention's varlen kernel takes that as it is (sequence boundaries, no mask).
Plain SDPA does not: transformers gives it a block-diagonal mask over the whole row, so a row of
T tokens costs T^2 scores however short its examples are, most of them masked out. With
examples of a few hundred tokens, eight to a row, that is several times the attention a padded
batch computes, and on a CPU (no flash-attn there) it ate the saving in the linear layers.

`sdpa_varlen` is transformers' SDPA attention called once per example (the row split where
position_ids restart), each call causal without a mask: exactly the scores of the examples
themselves, sum(L_i^2) instead of T^2. It is registered with transformers' AttentionInterface,
under a name that has no mask function, so transformers builds no T x T mask for it either.
A batch it cannot split (several rows, a cache, a mask) goes to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "sdpa_varlen"


def sdpa_varlen(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                scaling: float | None = None, position_ids: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; query/key/value are (batch, heads, seq, dim)
    and the output (batch, seq, heads, dim)."""
    bounds = example_bounds(position_ids) if (
        query.shape[0] == 1 and attention_mask is None and position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]) else None
    if bounds is None or len(bounds) == 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # Keys and values repeated for grouped-query heads here, not by SDPA's enable_gqa: on a CPU
    # that flag sends SDPA to its slow math path, several times the cost of the flash kernel.
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    # One split per tensor, not a slice per example: the backward of a split is one cat, while
    # each slice's backward writes a zero tensor of the whole row (examples x row, most of a
    # step's time on a CPU).
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                       is_causal=True).transpose(1, 2)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                           value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=1), None


def example_bounds(position_ids: torch.Tensor) -> list[int]:
    """Where the examples of a one-row batch start, and the row's end: [0, s1, s2, ..., T].
    An example starts where the position does not follow the one before (as transformers'
    find_packed_sequence_indices reads a packed row)."""
    positions = position_ids.reshape(-1)
    starts = (torch.diff(positions) != 1).nonzero().reshape(-1) + 1
    return [0, *starts.tolist(), positions.numel()]


def register() -> str:
    """Make `NAME` an attn_implementation transformers accepts (idempotent); returns NAME."""
    AttentionInterface.register(NAME, sdpa_varlen)
    return NAME
