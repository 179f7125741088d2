"""What a paged forward step needs: the patched model's KV layout, and one forward call's batch
description (`ForwardStep`), built once at layer 0 (`ModelPages.begin_step`) and shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cattn.working_kv import StepLens

LAYOUT_ATTR = "_cattn_layout"


@dataclass(frozen=True)
class PagedLayout:
    """What a paged cache needs to know about a patched model (set by `cattn.hf.apply_cattn`).

    Attributes:
        num_layers, num_kv_heads, head_dim: the KV shape per token and layer.
        page_size: tokens per page.
        sliding_windows: per layer, its attention window in tokens, or None for a global layer.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    sliding_windows: tuple[int | None, ...]

    @staticmethod
    def of(model) -> PagedLayout:
        layout = getattr(model, LAYOUT_ATTR, None)
        if layout is None:
            raise ValueError(f"model: {type(model).__name__} is not patched; call cattn.hf.apply_cattn(model) first")
        return layout


@dataclass(frozen=True)
class ForwardStep:
    """One forward call's batch description, built at layer 0 and shared by every layer.

    Attributes:
        batch_size, q_len: the input's ``[B, T]``.
        slot_mapping: ``[total_q] int32``, slot of each new (non-padding) token, row-major.
        block_table: ``[B, max_pages] int32``.
        kv_lens: ``[B] int32``, tokens per sequence including this step's.
        cu_seqlens_q: ``[B + 1] int32``, prefix sums of the new tokens per sequence.
        max_q_len: the most new tokens of any sequence.
        max_kv_len: the most tokens of any sequence, this step's included.
        token_index: ``[total_q] int64``, index of each new token in the flattened ``[B * T]``
            input; None when the input has no padding (packing is then a view).
        lens: the lengths on the host (`cattn.working_kv.StepLens`), for the CPU's working copies.
    """

    batch_size: int
    q_len: int
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    kv_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    max_kv_len: int
    token_index: torch.Tensor | None
    lens: StepLens

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` -> ``[total_q, H, D]``: the new tokens, sequence after sequence."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.token_index is None else flat.index_select(0, self.token_index)

    def unpack(self, out: torch.Tensor) -> torch.Tensor:
        """``[total_q, H, D]`` -> ``[B, T, H * D]``, zeros at padding positions."""
        flat = out.flatten(1)
        if self.token_index is not None:
            flat = flat.new_zeros(self.batch_size * self.q_len, flat.shape[1]).index_copy_(0, self.token_index, flat)
        return flat.view(self.batch_size, self.q_len, -1)
