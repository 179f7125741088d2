"""`CattnAttention`: the self-attention of one decoder layer, over a paged pre-RoPE cache."""
from __future__ import annotations

import torch
from torch import nn

from cattn.hf import compat
from cattn.hf.cache import PagedCache
from cattn.ops import paged_attention, write_kv
from cattn.rope import RopeSpec


class CattnAttention(nn.Module):
    """Drop-in replacement of a Llama/Mistral/Qwen2/Qwen3 attention module.

    It keeps the original module's projections (with their biases) and, for Qwen3, the
    per-head q/k RMSNorm applied before RoPE, so the state dict is unchanged. Each call
    writes the new tokens' K/V *before* RoPE into the `PagedCache`, then attends through
    `cattn.paged_attention`, which rotates Q and K at positions derived from ``kv_lens``.
    The model's own ``position_embeddings`` are not used.

    Args:
        original: the module it replaces (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
            ``head_dim``, ``scaling``, ``layer_idx``; ``q_norm``/``k_norm`` if ``qk_norm``).
        rope: the model's rotary spec.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see `cattn.paged_attention`).
        qk_norm: apply ``original.q_norm`` / ``original.k_norm`` per head before RoPE.
    """

    def __init__(self, original: nn.Module, rope: RopeSpec, *, backend: str, qk_norm: bool):
        super().__init__()
        self.layer_idx = original.layer_idx
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (original.q_proj, original.k_proj, original.v_proj,
                                                              original.o_proj)
        if qk_norm:
            self.q_norm, self.k_norm = original.q_norm, original.k_norm
        self.qk_norm = qk_norm
        self.rope = rope
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """``hidden_states [B, T, hidden]`` -> ``([B, T, hidden], None)``; the cache comes in ``kwargs``
        under `compat.CACHE_KWARG` and ``attention_mask`` is the 2D ``[B, past + T]`` padding mask or None."""
        cache = compat.cache_from_kwargs(kwargs)
        if not isinstance(cache, PagedCache):
            raise TypeError(f"a cattn-patched model needs a cattn.hf.PagedCache as its cache (pass "
                            f"{compat.CACHE_KWARG}=PagedCache(model)), got {type(cache).__name__}")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2):
            raise ValueError("attention_mask must be a 2D padding mask [B, past + T]; custom 4D masks are not "
                             "supported by cattn attention")
        batch, q_len, _ = hidden_states.shape
        shape = (batch, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope.inv_freq.device != q.device:   # the model was moved after patching
            self.rope = self.rope.to(q.device)

        step = cache.step(self.layer_idx, attention_mask, batch, q_len)
        k_cache, v_cache = cache.layer(self.layer_idx)
        cache.wait_layer(self.layer_idx)
        write_kv(step.pack(k), step.pack(v), k_cache, v_cache, step.slot_mapping, backend=self.backend,
                 check_indices=False)
        cache.layer_written(self.layer_idx)
        out = paged_attention(step.pack(q), k_cache, v_cache, step.block_table, step.kv_lens, step.cu_seqlens_q,
                              self.rope, sm_scale=self.scaling, backend=self.backend, max_q_len=step.max_q_len,
                              check_indices=False)
        return self.o_proj(step.unpack(out)), None
