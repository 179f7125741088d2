"""`CattnAttention`: the self-attention of one decoder layer, over a paged pre-RoPE cache."""
from __future__ import annotations

import torch
from torch import nn

from cattn.hf.cache import PagedCache
from cattn.hf.compat import cache_from_kwargs
from cattn.hf.families import Adapter
from cattn.ops import paged_attention, write_kv
from cattn.rope import RopeSpec
from cattn.working_kv import write_pages


class CattnAttention(nn.Module):
    """Drop-in replacement of a supported family's attention module (see `cattn.hf.families`).

    It adopts every child module of the original (projections with their biases, q/k norms)
    under the same names, so the state dict is unchanged. With a `PagedCache` each call
    writes the new tokens' K/V *before* RoPE into the cache, then attends through
    `cattn.paged_attention`, which rotates Q and K at positions derived from ``kv_lens``; the
    model's own ``position_embeddings`` are not used. On CPU (``backend="auto"``) it attends through
    the cache's working copy of the layer (`cattn.working_kv`), the same attention without re-reading
    the history each token. With any other cache (None, a
    ``DynamicCache``) the original module runs, as in the stock model, and its attention
    function is cattn's (`cattn.hf.dense`), so outputs and caches are the stock ones.

    Args:
        original: the module it replaces.
        adapter: how its family's module is read.
        rope: the rotary spec of this layer.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see `cattn.paged_attention`).
        sliding_window: this layer's window in tokens, or None (global attention).
        logit_softcap: this layer's attention logit softcap, or None.
    """

    def __init__(self, original: nn.Module, adapter: Adapter, rope: RopeSpec, *, backend: str,
                 num_q_heads: int, num_kv_heads: int, sliding_window: int | None = None,
                 logit_softcap: float | None = None):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "stock", original)   # not a submodule: the state dict stays the stock one
        self.layer_idx = original.layer_idx
        self.head_dim = getattr(original, "head_dim", None) or original.head_size
        self.scaling = original.scaling
        self.adapter, self.rope, self.backend = adapter, rope, backend
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.sliding_window, self.logit_softcap = sliding_window, logit_softcap

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """``hidden_states [B, T, hidden]`` -> ``([B, T, hidden], None)``; the cache comes in ``kwargs``
        (see `cattn.hf.compat.cache_from_kwargs`) and ``attention_mask`` is the 2D ``[B, past + T]`` padding mask
        or None."""
        cache = cache_from_kwargs(kwargs)
        if not isinstance(cache, PagedCache):
            return self.stock(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                              **kwargs)
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2):
            raise ValueError("attention_mask must be a 2D padding mask [B, past + T]; custom 4D masks are not "
                             "supported by cattn attention")
        batch, q_len, _ = hidden_states.shape
        q, k, v = self.adapter.project(self, hidden_states, self.head_dim, self.num_q_heads, self.num_kv_heads)
        if self.rope.inv_freq.device != q.device:   # the model was moved after patching
            self.rope = self.rope.to(q.device)

        step = cache.step(self.layer_idx, attention_mask, batch, q_len)
        k_cache, v_cache = cache.layer(self.layer_idx)
        # A window no sequence reaches past masks nothing: leave it out (the kernels then skip the test).
        window = self.sliding_window if self.sliding_window is not None and step.max_kv_len > self.sliding_window \
            else None
        working = cache.working_kv(self.layer_idx)
        if working is not None and (self.backend != "auto" or self.logit_softcap is not None or window is not None
                                    or q.dtype == torch.float64 or q.dtype != k_cache.dtype):
            # the paths without a working copy: softcap, float64, a window that bites (and a dtype mismatch,
            # which write_kv reports)
            working.drop()
            working = None
        q, k, v = step.pack(q), step.pack(k), step.pack(v)
        cache.wait_layer(self.layer_idx)
        if working is not None:     # the step's slots were checked once, at layer 0 (`PagedCache.step`)
            write_pages(k, v, k_cache, v_cache, step.slot_mapping)
        else:
            write_kv(k, v, k_cache, v_cache, step.slot_mapping, backend=self.backend, check_indices=False)
        cache.layer_written(self.layer_idx)
        if working is not None:
            out = working.attend(q, k, v, k_cache, v_cache, step.block_table, self.rope, step.lens,
                                 sm_scale=self.scaling, stamp=cache.pages.edits)
        else:
            out = paged_attention(q, k_cache, v_cache, step.block_table, step.kv_lens, step.cu_seqlens_q, self.rope,
                                  sm_scale=self.scaling, sliding_window=window, logit_softcap=self.logit_softcap,
                                  backend=self.backend, max_q_len=step.max_q_len, check_indices=False)
        return getattr(self, self.adapter.out_proj)(step.unpack(out)), None
