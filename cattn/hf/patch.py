"""`apply_cattn` / `revert_cattn`: swap a Hugging Face model's attention modules for cattn's, in place."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from cattn.hf.compat import (ATTN_IMPLEMENTATION, install_generate_cache, register_attention,
                              uninstall_generate_cache)
from cattn.hf.attention import CattnAttention
from cattn.hf.dense import BACKEND_ATTR
from cattn.hf.families import FAMILIES, SUPPORTED_MODEL_TYPES, Adapter
from cattn.hf.step import LAYOUT_ATTR, PagedLayout
from cattn.ops import BACKENDS
from cattn.rope import RopeSpec

_RESTORE_ATTR = "_cattn_restore"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Restore:
    originals: tuple[nn.Module, ...]      # the attention module of each decoder layer, in order
    attn_implementation: str
    page_size: int                        # the settings it was patched with
    backend: str


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM or of its base model."""
    return model.get_decoder().layers


def check_supported(config) -> Adapter:
    """The adapter of ``config``'s model type; raises ValueError listing the supported types otherwise
    (callers that load models check the config before any weight is read)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: cattn supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}")
    return FAMILIES[model_type]


def apply_cattn(model, *, page_size: int = 16, backend: str = "auto"):
    """Patch ``model`` in place so that its attention runs on a paged pre-RoPE cache; returns it.

    Every decoder layer's attention module becomes a `CattnAttention` that adopts its
    projections (and biases), q/k norms and scaling, read through the family's `Adapter`
    (`cattn.hf.families`), with the model's rotary spec and the layer's sliding window.
    The attention implementation becomes ``"cattn"`` so that transformers builds no 4D
    masks. The patched model works as the stock one does: with a `PagedCache` (which
    ``generate`` creates unless handed a cache) attention runs over cattn's paged
    pre-RoPE cache; with no cache or a ``DynamicCache`` the stock modules run with cattn's
    attention function. Patching a patched model again does nothing with the same settings and
    re-patches it with other ones; either way a warning says so. A model built on the meta device
    (accelerate's empty weights) patches too: its rotary spec, computed from the config, stays on
    the host until the first forward moves it to the model's device.

    Args:
        model: a ``PreTrainedModel`` (causal LM or base model) of a type in `SUPPORTED_MODEL_TYPES`.
        page_size: tokens per KV page.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unsupported model type, rope type (``dynamic``), page size or backend.
        TypeError: a decoder layer whose attention is not the family's stock module.
    """
    config = getattr(model, "config", None)
    try:
        adapter = check_supported(config)
    except ValueError as error:
        raise ValueError(f"{error} ({type(model).__name__})") from None
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    layers = decoder_layers(model)
    if (patched := getattr(model, _RESTORE_ATTR, None)) is not None:
        was = f"page_size={patched.page_size}, backend={patched.backend!r}"
        if (patched.page_size, patched.backend) == (page_size, backend):
            log.warning("apply_cattn: %s is already patched by cattn (%s); nothing to do", type(model).__name__, was)
            return model
        log.warning("apply_cattn: %s was patched by cattn with %s; re-patched with page_size=%d, backend=%r",
                    type(model).__name__, was, page_size, backend)
        revert_cattn(model)
    for i, layer in enumerate(layers):
        found = type(getattr(layer, adapter.attention_attr, None)).__name__
        if found != adapter.attention_class:
            raise TypeError(f"model: layer {i} attention is {found}, expected {adapter.attention_class} for model "
                            f"type {config.model_type!r}")
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None) if adapter.rope_per_layer_type else None
    kinds = layer_types or [None] * len(layers)
    # On the meta device there is nothing to copy the spec from later: it stays on the host until the
    # first forward moves it to the (materialised) model's device.
    device = "cpu" if model.device.type == "meta" else model.device
    ropes = {kind: RopeSpec.from_model(model, style=adapter.rope_style, layer_type=kind).to(device)
             for kind in set(kinds)}
    num_q_heads = text.num_attention_heads
    fused_heads = adapter.qkv == "fused_per_head"         # GPT-NeoX: every head has its own K/V
    num_kv_heads = num_q_heads if fused_heads else (getattr(text, "num_key_value_heads", None) or num_q_heads)

    originals = tuple(getattr(layer, adapter.attention_attr) for layer in layers)
    windows = tuple(adapter.sliding_window(a, text) for a in originals)
    for layer, original, window, kind in zip(layers, originals, windows, kinds):
        setattr(original, BACKEND_ATTR, backend)
        setattr(layer, adapter.attention_attr, CattnAttention(
            original, adapter, ropes[kind], backend=backend, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            sliding_window=window, logit_softcap=adapter.logit_softcap(original)))
    head_dim = getattr(layers[0], adapter.attention_attr).head_dim
    layout = PagedLayout(num_layers=len(layers), num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                         sliding_windows=windows)
    setattr(model, LAYOUT_ATTR, layout)
    setattr(model, _RESTORE_ATTR, _Restore(originals, config._attn_implementation, page_size, backend))
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    install_generate_cache(model)
    return model


def revert_cattn(model):
    """Undo `apply_cattn`: restore the original attention modules and implementation; returns ``model``.

    Raises:
        ValueError: ``model`` is not patched.
    """
    restore = getattr(model, _RESTORE_ATTR, None)
    if restore is None:
        raise ValueError(f"model: {type(model).__name__} is not patched by cattn")
    adapter = FAMILIES[model.config.model_type]
    for layer, original in zip(decoder_layers(model), restore.originals):
        setattr(layer, adapter.attention_attr, original)
        original.__dict__.pop(BACKEND_ATTR, None)
    uninstall_generate_cache(model)
    model.set_attn_implementation(restore.attn_implementation)
    delattr(model, _RESTORE_ATTR)
    delattr(model, LAYOUT_ATTR)
    return model


def is_patched(model) -> bool:
    return hasattr(model, _RESTORE_ATTR)
