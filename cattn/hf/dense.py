"""cattn's attention function for transformers' attention interface: the stock modules of a patched
model call it when the cache is not a `PagedCache` (no cache, ``use_cache=False``, a ``DynamicCache``).

The stock module has already applied RoPE and appended to its cache, so this sees dense post-RoPE
``key``/``value`` of every cached column and the 2D padding mask (cattn's mask function passes it
through). Each column becomes a page of one token, and each row's block table lists its non-padding
columns in order, so `cattn.paged_attention` (with ``rope=None``) attends exactly where the stock
model does, with positions counted over real tokens as generation counts them.
"""
from __future__ import annotations

import torch

from cattn.ops import paged_attention

BACKEND_ATTR = "_cattn_backend"   # set on each stock module by apply_cattn


def dense_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, softcap: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention of the last ``T`` columns over all ``S``, through cattn's kernels.

    Args:
        module: the stock attention module (its ``_cattn_backend`` picks the backend).
        query: ``[B, Hq, T, D]`` post-RoPE queries of the newest ``T`` columns.
        key, value: ``[B, Hkv, S, D]`` post-RoPE keys and values of all ``S`` columns.
        attention_mask: ``[B, S]`` padding mask (nonzero: a real token), or None (no padding).
        scaling: softmax scale; sliding_window, softcap: the layer's, or None.

    Returns:
        ``([B, T, Hq, D], None)``; padding query positions are zeros.
    """
    if dropout:
        raise ValueError("dropout: cattn attention has no dropout; call model.eval() before running it")
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, width = key.shape[1], key.shape[2]
    if attention_mask is None:
        real = torch.ones(batch, width, dtype=torch.bool)
    else:
        if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, width):
            raise ValueError(f"attention_mask must be a 2D padding mask [{batch}, {width}], got "
                             f"{tuple(attention_mask.shape)}")
        real = attention_mask.to("cpu", torch.bool)
    device = query.device
    kv_lens = real.sum(1, dtype=torch.int32)
    columns = [row.nonzero().squeeze(1) + b * width for b, row in enumerate(real)]
    block_table = torch.nn.utils.rnn.pad_sequence(columns, batch_first=True).to(torch.int32)
    if block_table.shape[1] == 0:
        block_table = torch.zeros(batch, 1, dtype=torch.int32)
    new = real[:, width - q_len:]
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int32), new.sum(1).cumsum(0).to(torch.int32)])
    k_pages = key.transpose(1, 2).reshape(batch * width, 1, num_kv_heads, head_dim).contiguous()
    v_pages = value.transpose(1, 2).reshape(batch * width, 1, num_kv_heads, head_dim).contiguous()
    q_index = new.flatten().nonzero().squeeze(1).to(device)
    q = query.transpose(1, 2).reshape(batch * q_len, num_q_heads, head_dim).index_select(0, q_index)
    max_kv = int(kv_lens.max()) if batch else 0
    out = paged_attention(q.contiguous(), k_pages, v_pages, block_table.to(device), kv_lens.to(device),
                          cu_seqlens_q.to(device), None, sm_scale=scaling,
                          sliding_window=sliding_window if sliding_window is not None and max_kv > sliding_window
                          else None,
                          logit_softcap=softcap, backend=getattr(module, BACKEND_ATTR, "auto"))
    full = out.new_zeros(batch * q_len, num_q_heads, head_dim).index_copy_(0, q_index, out)
    return full.view(batch, q_len, num_q_heads, head_dim), None
