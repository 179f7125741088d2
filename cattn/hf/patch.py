"""`apply_cattn` / `revert_cattn`: swap a Hugging Face model's attention modules for cattn's, in place."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cattn.hf import compat
from cattn.hf.attention import CattnAttention
from cattn.hf.step import LAYOUT_ATTR, PagedLayout
from cattn.ops import BACKENDS
from cattn.rope import RopeSpec

_RESTORE_ATTR = "_cattn_restore"


@dataclass(frozen=True)
class Family:
    """A supported model family: the attention class it must have, and whether it norms q/k per head."""

    attention_class: str
    qk_norm: bool = False


FAMILIES = {
    "llama": Family("LlamaAttention"),
    "mistral": Family("MistralAttention"),
    "qwen2": Family("Qwen2Attention"),
    "qwen3": Family("Qwen3Attention", qk_norm=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class _Restore:
    originals: tuple[nn.Module, ...]      # the attention module of each decoder layer, in order
    attn_implementation: str


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM or of its base model."""
    return model.get_decoder().layers


def _sliding_window(attention: nn.Module, config) -> int | None:
    if hasattr(attention, "sliding_window"):      # Qwen2/Qwen3: per layer type
        return attention.sliding_window
    return getattr(config, "sliding_window", None)  # Mistral: every layer; Llama: none


def apply_cattn(model, *, page_size: int = 16, backend: str = "auto"):
    """Patch ``model`` in place so that its attention runs on a paged pre-RoPE cache; returns it.

    Every decoder layer's attention module becomes a `CattnAttention` that keeps its
    projections (and biases), Qwen3's q/k norms and the model's rotary spec; the
    attention implementation becomes ``"cattn"`` so that transformers builds no 4D
    masks. The patched model then runs with a `PagedCache` as its cache. Patching a
    patched model re-patches it with the new settings.

    Args:
        model: a ``PreTrainedModel`` (causal LM or base model) of a type in `SUPPORTED_MODEL_TYPES`.
        page_size: tokens per KV page.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unsupported model type, rope type (``dynamic``), page size or backend.
        TypeError: a decoder layer whose attention is not the family's stock module.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: cattn supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got "
                         f"{model_type!r} ({type(model).__name__})")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    family = FAMILIES[model_type]
    layers = decoder_layers(model)
    if hasattr(model, _RESTORE_ATTR):
        revert_cattn(model)
    for i, layer in enumerate(layers):
        if type(layer.self_attn).__name__ != family.attention_class:
            raise TypeError(f"model: layer {i} attention is {type(layer.self_attn).__name__}, expected "
                            f"{family.attention_class} for model type {model_type!r}")
    rope = RopeSpec.from_model(model).to(model.device)

    originals = tuple(layer.self_attn for layer in layers)
    for layer, original in zip(layers, originals):
        layer.self_attn = CattnAttention(original, rope, backend=backend, qk_norm=family.qk_norm)
    windows = [w for w in (_sliding_window(a, config) for a in originals) if w is not None]
    head_dim = originals[0].head_dim
    layout = PagedLayout(num_layers=len(layers), num_kv_heads=originals[0].k_proj.out_features // head_dim,
                         head_dim=head_dim, page_size=page_size, sliding_window=min(windows) if windows else None)
    setattr(model, LAYOUT_ATTR, layout)
    setattr(model, _RESTORE_ATTR, _Restore(originals, config._attn_implementation))
    compat.register_attention()
    model.set_attn_implementation(compat.ATTN_IMPLEMENTATION)
    return model


def revert_cattn(model):
    """Undo `apply_cattn`: restore the original attention modules and implementation; returns ``model``.

    Raises:
        ValueError: ``model`` is not patched.
    """
    restore = getattr(model, _RESTORE_ATTR, None)
    if restore is None:
        raise ValueError(f"model: {type(model).__name__} is not patched by cattn")
    for layer, original in zip(decoder_layers(model), restore.originals):
        layer.self_attn = original
    model.set_attn_implementation(restore.attn_implementation)
    delattr(model, _RESTORE_ATTR)
    delattr(model, LAYOUT_ATTR)
    return model


def is_patched(model) -> bool:
    return hasattr(model, _RESTORE_ATTR)
