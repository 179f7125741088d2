"""`fingerprint(model)`: the identity under which a model's KV may be stored and served again."""
from __future__ import annotations

import torch
import xxhash

from cattn.rope import RopeSpec

_CACHE_ATTR = "_cattn_fingerprint"


def fingerprint(model) -> str:
    """A 32-digit hex xxh3-128 of everything that determines a model's pre-RoPE K/V and its rotation.

    Covers the model type and shapes (layers, hidden size, heads, KV heads, head_dim,
    vocabulary), the parameter dtype, `RopeSpec.fingerprint()` and the bytes of every
    parameter and buffer, so a store entry saved by another model, another fine-tune or
    another dtype is a different key and never served. Reading all weights costs a copy
    to the host for GPU models, so the digest is remembered on the model and computed
    again only when a tensor was replaced or modified in place (its storage or version
    counter changed).
    """
    tensors = dict(model.named_parameters())          # tied weights appear once
    tensors.update(model.named_buffers())
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
              getattr(config, "num_key_value_heads", None), head_dim, config.vocab_size)
    kinds = sorted(set(getattr(config, "layer_types", None) or [None]), key=str)   # Gemma 3: a rope per layer kind
    ropes = tuple(RopeSpec.from_model(model, layer_type=kind).fingerprint() for kind in kinds)
    header = repr((shapes, str(model.dtype), ropes))
    state = (header, tuple((name, t.data_ptr(), t._version) for name, t in sorted(tensors.items())))
    cached = getattr(model, _CACHE_ATTR, None)
    if cached is not None and cached[0] == state:
        return cached[1]
    digest = xxhash.xxh3_128()
    digest.update(header.encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    setattr(model, _CACHE_ATTR, (state, digest.hexdigest()))
    return digest.hexdigest()
