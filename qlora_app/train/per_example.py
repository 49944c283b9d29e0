"""Per-example attention for packed rows without flex or flash: torch's sdpa called once per example.

A padding-free row holds several examples told apart by `cu_seq_lens_q` (trl's collator) or by `position_ids`
restarting. transformers' sdpa turns that into one dense (rows x rows) block-diagonal mask and computes every
pair; this function cuts the row at the example boundaries and runs causal sdpa on each piece, so the work is
the sum of the examples' squares instead of the row's. Registered with transformers' AttentionInterface (and an
AttentionMaskInterface entry that skips the dense mask) under NAME.

Exact for every family whose attention is causal self-attention: a layer's `sliding_window` keeps its window
inside each example (keys within the last `sliding_window` positions, transformers' sliding_window_overlay),
`softcap` (Gemma 2) is applied to the scores, GQA uses sdpa's enable_gqa. Anything else (a padding mask, a KV
cache offset, bidirectional layers) gets transformers' own sdpa with its mask, as with attn_implementation="sdpa".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_per_example"


def register() -> str:
    """Make NAME a valid attn_implementation; idempotent. Returns NAME."""
    AttentionInterface.register(NAME, per_example_attention)
    AttentionMaskInterface.register(NAME, per_example_mask)
    return NAME


def per_example_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask for a training forward (no cache, no padding): the attention function cuts rows per example.
    Otherwise the mask sdpa would get."""
    plain = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if plain and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def per_example_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, sliding_window: int | None = None,
                          softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (batch, heads, length, dim), key/value (batch, kv_heads, length, dim) -> (batch, length, heads, dim)."""
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if attention_mask is not None or query.shape[2] != key.shape[2] or not causal:
        return _whole_rows(module, query, key, value, attention_mask, dropout, scaling, softcap, causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    rows = []
    for b, bounds in enumerate(example_bounds(query.shape[0], query.shape[2], kwargs)):
        pieces = [_causal(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], groups,
                          dropout, scaling, sliding_window, softcap) for s, e in bounds]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def example_bounds(batch: int, length: int, kwargs: dict) -> list[list[tuple[int, int]]]:
    """Each row's examples as (start, end): from trl's cu_seq_lens for a single packed row, else where
    position_ids do not step by one (transformers' find_packed_sequence_indices), else the whole row."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and batch == 1 and int(cu[-1]) == length:
        edges = cu.tolist()
        return [list(zip(edges[:-1], edges[1:]))]
    positions = kwargs.get("position_ids")
    if positions is None:
        return [[(0, length)]] * batch
    positions = positions.expand(batch, -1) if positions.shape[0] != batch else positions
    restarts = (positions[:, 1:] - positions[:, :-1] != 1).cpu()
    bounds = []
    for row in restarts:
        edges = [0, *(row.nonzero().flatten() + 1).tolist(), length]
        bounds.append(list(zip(edges[:-1], edges[1:])))
    return bounds


def _causal(q, k, v, groups, dropout, scaling, window, softcap) -> torch.Tensor:
    """One example: causal attention, within `window` keys when the layer slides."""
    n = q.shape[2]
    mask = None
    if window is not None and n > window:
        i = torch.arange(n, device=q.device)
        distance = i[:, None] - i[None, :]
        mask = (distance >= 0) & (distance < window)  # sliding_window_overlay and causal
    if softcap is not None:
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return _eager(q, k, v, mask, groups, dropout, scaling, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=mask is None, enable_gqa=groups > 1)


def _eager(q, k, v, mask, groups, dropout, scaling, softcap) -> torch.Tensor:
    """Attention with soft-capped scores (sdpa cannot cap): softcap * tanh(scores / softcap) before the mask,
    softmax in fp32 as transformers' eager does. mask: bool (True attends) or additive float."""
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        low = torch.finfo(scores.dtype).min  # not -inf: a row with nothing to attend (padding) stays finite
        scores = scores.masked_fill(~mask, low) if mask.dtype == torch.bool else scores + mask
    weights = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


def _whole_rows(module, query, key, value, attention_mask, dropout, scaling, softcap, causal, **kwargs):
    """What attn_implementation="sdpa" does, soft-capping included (transformers' sdpa drops softcap)."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    if attention_mask is None and causal:  # causal, aligned to the last key (a cache before the queries)
        q_len, kv_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    out = _eager(query, key, value, attention_mask, groups, dropout, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None
