"""The supported model families: one small `Adapter` each, saying how its attention module is built.

An adapter names what differs between families and nothing else: where the attention
module sits in a decoder layer, its class, how Q/K/V come out of the projections, how
q/k are normalised, the RoPE pairing, the output projection, and where a per-layer
sliding window and a logit softcap come from. `CattnAttention` reads its module
through the adapter; the projections, norms and scaling stay the module's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cattn.rope import RopeStyle


@dataclass(frozen=True)
class Adapter:
    """How cattn reads one family's attention module.

    Attributes:
        attention_class: the stock module's class name (anything else in a layer is refused).
        attention_attr: the decoder layer's attribute holding it.
        qkv: ``"split"`` (``q_proj``/``k_proj``/``v_proj``), ``"fused"`` (one ``qkv_proj`` whose output
            is ``[all q | all k | all v]``, Phi-3) or ``"fused_per_head"`` (``query_key_value`` whose
            output is ``[q | k | v]`` per head, GPT-NeoX).
        qk_norm: ``None``, ``"head"`` (``q_norm``/``k_norm`` over each head, Qwen3, Cohere, Gemma 3) or
            ``"full"`` (over the whole projection, before the head split, OLMo 2). Applied only if the
            module has a ``q_norm`` (Cohere's is optional).
        rope_style: ``"neox"`` (rotate-half) or ``"gptj"`` (interleaved pairs, Cohere).
        out_proj: the output projection's attribute.
        window_from: ``"module"`` (the module's ``sliding_window``, absent or None: a global layer) or
            ``"config"`` (``config.sliding_window`` for every layer, Mistral's convention).
        softcap_attr: the module's attention logit softcap attribute, if the family applies one (Gemma 2).
        rope_per_layer_type: RoPE parameters differ by ``config.layer_types`` (Gemma 3's local base).
    """

    attention_class: str
    attention_attr: str = "self_attn"
    qkv: Literal["split", "fused", "fused_per_head"] = "split"
    qk_norm: Literal["head", "full"] | None = None
    rope_style: RopeStyle = "neox"
    out_proj: str = "o_proj"
    window_from: Literal["module", "config"] = "module"
    softcap_attr: str | None = None
    rope_per_layer_type: bool = False

    def project(self, module: nn.Module, hidden: torch.Tensor, head_dim: int, num_q_heads: int,
                num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [B, T, hidden]`` -> q ``[B, T, Hq, D]``, k and v ``[B, T, Hkv, D]``, normed, before RoPE."""
        batch, q_len, _ = hidden.shape
        if self.qkv == "split":
            q, k, v = module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
        elif self.qkv == "fused":
            q, k, v = module.qkv_proj(hidden).split(
                [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        else:
            per_head = module.query_key_value(hidden).view(batch, q_len, -1, 3 * head_dim)
            q, k, v = (t.flatten(2) for t in per_head.chunk(3, dim=-1))
        has_norm = self.qk_norm is not None and getattr(module, "q_norm", None) is not None
        if has_norm and self.qk_norm == "full":
            q, k = module.q_norm(q), module.k_norm(k)
        q, k, v = (t.reshape(batch, q_len, -1, head_dim) for t in (q, k, v))
        if has_norm and self.qk_norm == "head":
            q, k = module.q_norm(q), module.k_norm(k)
        return q, k, v

    def sliding_window(self, module: nn.Module, config) -> int | None:
        """The layer's window in tokens, or None for a global layer."""
        if self.window_from == "config":
            return getattr(config, "sliding_window", None)
        return getattr(module, "sliding_window", None)

    def logit_softcap(self, module: nn.Module) -> float | None:
        """The layer's attention logit softcap, or None."""
        value = getattr(module, self.softcap_attr, None) if self.softcap_attr else None
        return None if value is None else float(value)


FAMILIES: dict[str, Adapter] = {
    "llama": Adapter("LlamaAttention"),
    "mistral": Adapter("MistralAttention", window_from="config"),
    "mixtral": Adapter("MixtralAttention", window_from="config"),
    "qwen2": Adapter("Qwen2Attention"),
    "qwen2_moe": Adapter("Qwen2MoeAttention"),
    "qwen3": Adapter("Qwen3Attention", qk_norm="head"),
    "qwen3_moe": Adapter("Qwen3MoeAttention", qk_norm="head"),
    "phi3": Adapter("Phi3Attention", qkv="fused", window_from="config"),
    "olmo2": Adapter("Olmo2Attention", qk_norm="full"),
    "granite": Adapter("GraniteAttention"),
    "gpt_neox": Adapter("GPTNeoXAttention", attention_attr="attention", qkv="fused_per_head", out_proj="dense"),
    "cohere": Adapter("CohereAttention", qk_norm="head", rope_style="gptj"),
    "gemma2": Adapter("Gemma2Attention", softcap_attr="attn_logit_softcapping"),
    "gemma3_text": Adapter("Gemma3Attention", qk_norm="head", rope_per_layer_type=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
