"""Everything in the HF layer that depends on the transformers version, in one place.

Supported: transformers 5.17 through the latest 5.x. The differences handled here:

- 5.24 renamed the cache argument of ``generate``, the models' and the attention
  modules' ``forward`` from ``past_key_values`` to ``cache`` (the old name still
  works there, with a deprecation warning). `CACHE_KWARG` is the name this
  version uses; pass caches as ``**{CACHE_KWARG: cache}`` to stay warning-free.
- The attention implementation name: registering ``"cattn"`` with
  ``AttentionInterface`` makes ``set_attn_implementation("cattn")`` legal, and
  registering a mask function with ``AttentionMaskInterface`` makes the model
  hand the layers the 2D padding mask as it is instead of building a 4D mask.
"""
from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, GenerationMixin
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "cattn"

CACHE_KWARG = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
               else "past_key_values")


def cache_from_kwargs(kwargs: dict):
    """The cache object a decoder layer passed to its attention module, or None."""
    return kwargs.get(CACHE_KWARG)


def _unreachable_attention(module, *args, **kwargs):
    raise RuntimeError(f"{type(module).__name__} called the '{ATTN_IMPLEMENTATION}' attention function: that name "
                       "only routes masks; attention runs inside the modules installed by cattn.hf.apply_cattn")


def _padding_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor | None:
    """The model's 2D ``[B, kv_length]`` bool padding mask, passed through untouched (None: no padding).
    Causality and positions come from the paged cache's ``kv_lens``, so no 4D mask is ever built."""
    return attention_mask


def register_attention() -> None:
    """Register the ``"cattn"`` attention implementation and its mask function (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _unreachable_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)

