"""Everything in the HF layer that depends on the transformers version, in one place.

Supported: transformers 5.17 through the latest 5.x. The differences handled here:

- 5.24 renamed the cache argument of ``generate``, the models' and the attention
  modules' ``forward`` from ``past_key_values`` to ``cache`` (the old name still
  works there, with a deprecation warning). `CACHE_KWARG` is the name this
  version uses; pass caches as ``**{CACHE_KWARG: cache}`` to stay warning-free.
- GPT-NeoX's layers hand their attention the cache as ``layer_past``.
- The attention implementation name: registering ``"cattn"`` with
  ``AttentionInterface`` (`cattn.hf.dense.dense_attention`, what the stock modules
  call when the cache is not a `PagedCache`) makes ``set_attn_implementation("cattn")``
  legal, and registering a mask function with ``AttentionMaskInterface`` makes the
  model hand the layers the 2D padding mask as it is instead of building a 4D mask.
- Generation's cache preparation (``_prepare_cache_for_generation``): a patched model
  gets a growing `PagedCache` where stock generation would create a ``DynamicCache``.
"""
from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, GenerationMixin
from transformers.masking_utils import AttentionMaskInterface

from cattn.hf.cache import PagedCache
from cattn.hf.dense import dense_attention

ATTN_IMPLEMENTATION = "cattn"

CACHE_KWARG = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
               else "past_key_values")


CACHE_KWARGS = tuple(dict.fromkeys((CACHE_KWARG, "past_key_values", "layer_past")))
PREPARE_CACHE_ATTR = "_prepare_cache_for_generation"


def cache_from_kwargs(kwargs: dict):
    """The cache object a decoder layer passed to its attention module, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _padding_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor | None:
    """The model's 2D ``[B, kv_length]`` bool padding mask, passed through untouched (None: no padding).
    Causality and positions come from the paged cache's ``kv_lens``, so no 4D mask is ever built."""
    return attention_mask


def register_attention() -> None:
    """Register the ``"cattn"`` attention implementation and its mask function (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, dense_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)



def install_generate_cache(model) -> None:
    """Make ``model.generate`` create a `PagedCache` (one row per returned sequence or beam, growing)
    where it would create a ``DynamicCache``: no cache handed in, ``use_cache`` on, no
    ``cache_implementation`` asked for. Anything else goes to transformers' own preparation."""
    stock = type(model)._prepare_cache_for_generation

    def prepare(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        handed_in = any(model_kwargs.get(name) is not None for name in CACHE_KWARGS)
        if handed_in or generation_config.use_cache is False or generation_config.cache_implementation is not None \
                or not self._supports_default_dynamic_cache():
            return stock(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        model_kwargs[CACHE_KWARG] = PagedCache(self, batch_size=rows, max_tokens=max(max_cache_length, 1), grow=True)

    setattr(model, PREPARE_CACHE_ATTR, prepare.__get__(model))


def uninstall_generate_cache(model) -> None:
    model.__dict__.pop(PREPARE_CACHE_ATTR, None)
