"""Re-rotating keys that vLLM cached after RoPE, for a history whose oldest tokens were dropped.

A key cached at position ``p`` is ``R(p) k`` (times yarn's or longrope's attention scaling, which
rides along untouched). The same token needed at position ``p'`` is ``R(p') k = R(p' - p) R(p) k``:
rotations compose, so the stored key is rotated once, by the difference, and nothing else is
needed. Each call rotates from the stored original (never from an already shifted copy), so a
second truncation of the same session costs one rounding again, not two.

The angle of pair ``i`` is the difference of the two angles the model itself uses,
``fp32(p' * f_i) - fp32(p * f_i)`` taken in float64 (exact: both are fp32 numbers), so the rotated
key is the key a recompute at ``p'`` would cache from the same ``k``, even 128K positions apart,
where ``fp32((p' - p) * f_i)`` would already be off by ~1e-2 radians. cos and sin are rounded to
fp32, the rotation is done in fp32, and the result is rounded once to the cache dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cattn.rope import RopeSpec
from cattn.vllm.block_layout import layout_named

# vLLM's rotary style per architecture (its models' ``is_neox_style``); an architecture not listed
# is not shifted (a clean miss), since the wrong pairing would rotate the wrong channels.
NEOX_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "OlmoForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM", "StableLmForCausalLM", "GPTNeoXForCausalLM",
})
GPTJ_ARCHITECTURES = frozenset({"GPTJForCausalLM"})


def shift_angles(rope: RopeSpec, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[T, rotary_dim // 2]`` float32 on ``src``'s device, of the rotation that
    takes a key cached at ``src [T]`` to ``dst [T]`` (int64 positions): angle ``fp32(dst * f) -
    fp32(src * f)`` in float64, ``f`` the spec's ``inv_freq``. No attention scaling: it is in the key."""
    for name, pos in (("src", src), ("dst", dst)):
        if not isinstance(pos, torch.Tensor) or pos.ndim != 1 or pos.dtype != torch.int64:
            raise TypeError(f"{name} must be a 1-D int64 tensor of positions, got {getattr(pos, 'shape', pos)!r}")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.numel() and min(int(src.min()), int(dst.min())) < 0:
        raise ValueError("src and dst positions must be non-negative")
    f = rope.inv_freq.to(device=src.device, dtype=torch.float32)
    angle = (dst.float()[:, None] * f).double() - (src.float()[:, None] * f).double()
    return angle.cos().float(), angle.sin().float()


def rotate_keys(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """``key [T, H, D]`` (any float dtype) rotated by ``cos, sin [T, rotary_dim // 2]`` float32 in the
    spec's style (``neox``: dim ``i`` with ``i + rotary_dim/2``; ``gptj``: ``2i`` with ``2i+1``); dims
    past ``rotary_dim`` pass through. Computed in fp32, rounded once to ``key.dtype``; a new tensor."""
    if not isinstance(key, torch.Tensor) or key.ndim != 3 or not key.is_floating_point():
        raise TypeError(f"key must be a floating [T, H, D] tensor, got {getattr(key, 'shape', key)!r}")
    rd, t = rope.rotary_dim, key.shape[0]
    if rd > key.shape[-1]:
        raise ValueError(f"key's head dim {key.shape[-1]} is smaller than the rotary dim {rd}")
    for name, x in (("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor) or x.shape != (t, rd // 2) or x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [{t}, {rd // 2}], got {getattr(x, 'shape', x)!r}")
    out = key.clone()
    k = key[..., :rd].float()
    if rope.style == "neox":
        x, y = k[..., :rd // 2], k[..., rd // 2:]
    else:
        x, y = k[..., 0::2], k[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    rx, ry = x * c - y * s, y * c + x * s
    if rope.style == "neox":
        out[..., :rd] = torch.cat([rx, ry], dim=-1).to(key.dtype)
    else:
        out[..., :rd] = torch.stack([rx, ry], dim=-1).flatten(-2).to(key.dtype)
    return out


def rope_style(architectures) -> str | None:
    """vLLM's rotary style (``"neox"``/``"gptj"``) for a model's ``architectures``, None if unknown."""
    archs = set(architectures or ())
    if archs and archs <= NEOX_ARCHITECTURES:
        return "neox"
    if archs and archs <= GPTJ_ARCHITECTURES:
        return "gptj"
    return None


def shift_refusal(rope: RopeSpec | None, *, stored_end: int, prompt_len: int, sliding_window: int | None,
                  rope_reason: str = "") -> str | None:
    """Why a shifted load of stored tokens ``[0, stored_end)`` into a prompt of ``prompt_len`` tokens
    cannot be exact, or None when it can.

    - no spec (``rope_reason`` says why: a dynamic rope, an unknown rotary style);
    - longrope with either length past ``original_max_position``: the frequencies of one side
      differ from the other's (and vLLM picks them per batch);
    - a sliding window that either sequence outgrows: the kept span crosses the window.
    """
    if rope is None:
        return f"no rope table ({rope_reason or 'unknown rope'})"
    if rope.original_max_position is not None and max(stored_end, prompt_len) > rope.original_max_position:
        return (f"longrope switches frequencies past {rope.original_max_position} tokens "
                f"(stored {stored_end}, prompt {prompt_len})")
    if sliding_window is not None and max(stored_end, prompt_len) > sliding_window:
        return f"the kept span crosses the sliding window of {sliding_window} tokens"
    return None


def rope_for(hf_config) -> tuple[RopeSpec | None, str]:
    """``(spec, "")`` for a vLLM model's HF config, or ``(None, reason)`` when keys cannot be shifted
    exactly: an unknown rotary style, a rope type without a static table (``dynamic``), no rope."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    style = rope_style(getattr(hf_config, "architectures", None))
    if style is None:
        return None, f"rotary style of {getattr(hf_config, 'architectures', None)} not known"
    try:
        return RopeSpec.from_config(text, style=style), ""
    except (ValueError, KeyError, TypeError) as exc:
        return None, str(exc)


def sliding_window_of(hf_config) -> int | None:
    """The model's attention window, if any layer uses one (Qwen2's ``use_sliding_window`` off: none)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    return int(window)


def relocate(blocks: torch.Tensor, layout, index: torch.Tensor, rotate_from: int, cos: torch.Tensor,
             sin: torch.Tensor, rope: RopeSpec, block_size: int) -> torch.Tensor:
    """Build destination blocks from tokens of stored blocks, rotating the shifted ones' keys.

    Args:
        blocks: stored blocks in ``layout`` (a `cattn.vllm.block_layout` layout), holding ``S`` tokens.
        index: ``[T]`` int64, ``T`` a multiple of ``block_size``: destination token ``j`` is stored
            token ``index[j]`` (an index into the ``S`` tokens).
        rotate_from: destination tokens ``[rotate_from, T)`` are shifted: their keys are rotated by
            ``cos, sin [T - rotate_from, rotary_dim // 2]`` float32 (`shift_angles`); values never are.
    Returns:
        ``T / block_size`` destination blocks in ``layout``, the dtype of ``blocks``.
    """
    if index.ndim != 1 or index.dtype != torch.int64 or index.numel() % block_size:
        raise ValueError(f"index must be a 1-D int64 tensor of a multiple of {block_size} tokens, "
                         f"got {tuple(index.shape)} {index.dtype}")
    if not 0 <= rotate_from <= index.numel():
        raise ValueError(f"rotate_from must be in [0, {index.numel()}], got {rotate_from}")
    key, value = layout.decode(blocks)                     # [B, N, H, D] each
    h, d = key.shape[2], key.shape[3]
    key, value = key.reshape(-1, h, d)[index], value.reshape(-1, h, d)[index]
    if rotate_from < index.numel():
        key[rotate_from:] = rotate_keys(key[rotate_from:], cos, sin, rope)
    shape = (index.numel() // block_size, block_size, h, d)
    return layout.encode(key.reshape(shape), value.reshape(shape))


@dataclass(frozen=True)
class ShiftSupport:
    """What one engine can shift: its rope (or why none), its sliding window, its KV block layout's
    name (`cattn.vllm.block_layout.layout_named`). The same on the scheduler side and every worker."""

    rope: RopeSpec | None
    rope_reason: str
    sliding_window: int | None
    layout_name: str

    def refusal(self, stored_end: int, prompt_len: int) -> str | None:
        """Why stored tokens ``[0, stored_end)`` cannot be shifted exactly into a prompt of
        ``prompt_len`` tokens, or None."""
        if layout_named(self.layout_name) is None:
            return f"unknown KV block layout {self.layout_name!r}"
        return shift_refusal(self.rope, stored_end=stored_end, prompt_len=prompt_len,
                             sliding_window=self.sliding_window, rope_reason=self.rope_reason)
