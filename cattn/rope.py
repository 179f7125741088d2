"""Rotary position encoding as data: what a kernel needs to rotate Q and K itself.

cattn caches keys *before* RoPE, so the rotation is a function applied at
attention time, at positions the attention derives. `RopeSpec` is everything
that function needs, built from a Hugging Face config or model so that the
angles are bit-for-bit the ones the model would use: `position * inv_freq` in
fp32, cos/sin multiplied by `attention_scaling`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import torch

RopeStyle = Literal["neox", "gptj"]
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """Rotary encoding of one model.

    Attributes:
        inv_freq: ``[rotary_dim // 2]`` float32, angle per position of each pair.
        attention_scaling: multiplies cos and sin (yarn, longrope); 1.0 otherwise.
        style: ``"neox"`` pairs dim ``i`` with ``i + rotary_dim/2`` (rotate-half,
            HF Llama); ``"gptj"`` pairs ``2i`` with ``2i+1`` (interleaved).
        long_inv_freq: longrope only: ``[rotary_dim // 2]`` float32 used once a
            sequence is longer than ``original_max_position``.
        original_max_position: longrope only: the switch length.
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    style: RopeStyle = "neox"
    long_inv_freq: torch.Tensor | None = None
    original_max_position: int | None = None

    def __post_init__(self):
        """Every field is checked here, once, so that kernels and the reference never see a bad spec.
        (Reads inv_freq on the host to check it is finite: a spec is built once per model.)"""
        _check_freqs(self.inv_freq, "inv_freq")
        scaling = self.attention_scaling
        if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
            raise TypeError(f"attention_scaling must be a real number, got {type(scaling).__name__}")
        try:
            finite = math.isfinite(float(scaling))
        except OverflowError:   # an int past float's range
            finite = False
        if not (finite and scaling > 0):
            raise ValueError(f"attention_scaling must be finite and positive, got {scaling}")
        if self.style not in ("neox", "gptj"):
            raise ValueError(f"style must be 'neox' or 'gptj', got {self.style!r}")
        if (self.long_inv_freq is None) != (self.original_max_position is None):
            raise ValueError("long_inv_freq and original_max_position go together (longrope): got "
                             f"long_inv_freq={'None' if self.long_inv_freq is None else 'a tensor'}, "
                             f"original_max_position={self.original_max_position!r}")
        if self.long_inv_freq is not None:
            _check_freqs(self.long_inv_freq, "long_inv_freq")
            if self.long_inv_freq.shape != self.inv_freq.shape:
                raise ValueError(f"long_inv_freq must have inv_freq's shape {tuple(self.inv_freq.shape)}, "
                                 f"got {tuple(self.long_inv_freq.shape)}")
            omp = self.original_max_position
            if not isinstance(omp, numbers.Integral) or isinstance(omp, bool):
                raise TypeError(f"original_max_position must be an int, got {type(omp).__name__}")
            if omp <= 0:
                raise ValueError(f"original_max_position must be positive, got {omp}")
            object.__setattr__(self, "original_max_position", int(omp))
            object.__setattr__(self, "long_inv_freq", self.long_inv_freq.detach().float().contiguous())
        object.__setattr__(self, "attention_scaling", float(scaling))
        object.__setattr__(self, "inv_freq", self.inv_freq.detach().float().contiguous())

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that are rotated; the rest pass through."""
        return 2 * self.inv_freq.numel()

    @cached_property
    def freq_table(self) -> torch.Tensor:
        """``[2, rotary_dim // 2]`` float32 on inv_freq's device: row 0 the frequencies of short
        sequences, row 1 of sequences longer than ``original_max_position`` (equal rows unless
        longrope). Kernels pick a row per sequence, so a batch needs no host-side length."""
        long = self.inv_freq if self.long_inv_freq is None else self.long_inv_freq
        return torch.stack([self.inv_freq, long.to(self.inv_freq.device)])

    def at_length(self, seq_len: int) -> RopeSpec:
        """The spec in force for a sequence of ``seq_len`` tokens (longrope switches
        to its long factors past ``original_max_position``, exactly as HF does)."""
        if self.long_inv_freq is None or seq_len <= self.original_max_position:
            return self
        return self._long_regime

    @cached_property
    def _long_regime(self) -> RopeSpec:
        return replace(self, inv_freq=self.long_inv_freq, long_inv_freq=None, original_max_position=None)

    def to(self, device: torch.device | str) -> RopeSpec:
        long = None if self.long_inv_freq is None else self.long_inv_freq.to(device)
        return replace(self, inv_freq=self.inv_freq.to(device), long_inv_freq=long)

    def fingerprint(self) -> tuple:
        """Hashable identity: two specs with equal fingerprints rotate identically."""
        long = None if self.long_inv_freq is None else tuple(self.long_inv_freq.tolist())
        return (tuple(self.inv_freq.tolist()), float(self.attention_scaling), self.style, long,
                self.original_max_position)

    @classmethod
    def from_config(cls, config, *, style: RopeStyle = "neox", layer_type: str | None = None) -> RopeSpec:
        """Build from an HF ``PretrainedConfig`` (transformers 5.x ``rope_parameters``).

        ``layer_type`` (e.g. ``"sliding_attention"``) picks that layer kind's parameters where the
        config keys ``rope_parameters`` by layer type (Gemma 3's local and global bases).
        Raises ValueError for ``dynamic`` rope, whose frequencies change with the
        length of every call and so cannot be applied to a cache consistently.
        """
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(config, "rope_parameters", None) or {}
        per_type = layer_type is not None and isinstance(params.get(layer_type), dict)
        params = params[layer_type] if per_type else params
        by_type = {"layer_type": layer_type} if per_type else {}
        rope_type = params.get("rope_type", "default")
        if "dynamic" in rope_type:
            raise ValueError("config: rope_type 'dynamic' rescales RoPE with each call's length and is "
                             f"not supported; supported types are {STATIC_ROPE_TYPES}")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"config: rope_type {rope_type!r} is not supported; expected one of {STATIC_ROPE_TYPES}")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config, params), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **by_type)
        if rope_type != "longrope":
            return cls(inv_freq, float(scaling), style)
        original = int(params["original_max_position_embeddings"])
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=original + 1, **by_type)
        return cls(inv_freq, float(scaling), style, long_inv_freq, original)

    @classmethod
    def from_model(cls, model, *, style: RopeStyle = "neox", layer_type: str | None = None) -> RopeSpec:
        """Build from an HF model (or its config); refuses ``dynamic`` rope."""
        config = getattr(model, "config", model)
        return cls.from_config(config.get_text_config(), style=style, layer_type=layer_type)


def _check_freqs(freqs, name: str) -> None:
    """A ``[rotary_dim // 2]`` tensor of finite real floating-point frequencies, at least one."""
    if not isinstance(freqs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [rotary_dim // 2], got {type(freqs).__name__}")
    if freqs.ndim != 1:
        raise TypeError(f"{name} must be a 1-D tensor [rotary_dim // 2], got shape {tuple(freqs.shape)}")
    if freqs.numel() == 0:
        raise ValueError(f"{name} must hold at least one frequency (no rotation is rope=None)")
    if not freqs.is_floating_point():     # integer, bool and complex frequencies are refused, not converted
        raise TypeError(f"{name} must be a real floating-point tensor, got {freqs.dtype}")
    # A meta tensor has no values to check: a spec moved there (a model built on the meta device, as
    # accelerate builds large checkpoints) was checked where its values were made.
    if not freqs.is_meta and not bool(torch.isfinite(freqs.float()).all()):
        raise ValueError(f"{name} must be finite, got {freqs.tolist()}")


def _default_inv_freq(config, params: dict) -> torch.Tensor:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    base = params["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
