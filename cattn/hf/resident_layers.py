"""A session's resident first layers (`cattn.store.device.tier.Resident`) as the first layers of a
`ModelPages`: layers whose K/V live in tensors of their own, which the device tier keeps between turns."""
from __future__ import annotations

import torch

from cattn.hf.step import PagedLayout
from cattn.store.device.tier import Resident


def check_resident(res: Resident, layout: PagedLayout, dtype: torch.dtype, device: torch.device) -> None:
    """ValueError unless ``res``'s pages fit pages of ``layout``, ``dtype`` and ``device``."""
    want = (layout.page_size, layout.num_kv_heads, layout.head_dim)
    for t in (*res.k, *res.v):
        if tuple(t.shape[1:]) != want or t.dtype != dtype or t.device != device:
            raise ValueError(f"resident: pages must be [pages, {want[0]}, {want[1]}, {want[2]}] {dtype} on {device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if res.num_layers > layout.num_layers or len(res.v) != res.num_layers \
            or len(res.pages) != -(-res.num_tokens // layout.page_size):
        raise ValueError("resident: layers, pages and tokens do not agree with each other or the model")


def separate_layers(lay: PagedLayout, resident: Resident | None, separate: int, num_pages: int, headroom: float,
                    dtype: torch.dtype, device: torch.device) -> tuple[list, list, int]:
    """Per-layer ``[capacity, page_size, Hkv, D]`` tensors for the first ``separate`` layers: ``resident``'s
    own (in place), grown by one device-to-device copy if they have fewer than ``num_pages`` pages, then new
    ones of the same capacity (``num_pages`` and ``headroom`` more). Returns ``(k, v, bytes copied)``."""
    grown = 0
    if resident is not None and resident.num_layers and resident.capacity_pages >= num_pages:
        capacity = resident.capacity_pages
        k, v = list(resident.k), list(resident.v)
    else:
        capacity = max(num_pages, int(num_pages * (1 + headroom)))
        k, v = [], []
        for old_k, old_v in zip(resident.k, resident.v) if resident is not None else ():
            # The session outgrew its resident tensors: one device-to-device copy into larger ones.
            for old, out in ((old_k, k), (old_v, v)):
                out.append(old.new_empty(capacity, *old.shape[1:]))
                out[-1][:old.shape[0]] = old
                grown += old.nbytes
    shape = (capacity, lay.page_size, lay.num_kv_heads, lay.head_dim)
    while len(k) < separate:
        k.append(torch.empty(shape, dtype=dtype, device=device))
        v.append(torch.empty(shape, dtype=dtype, device=device))
    return k, v, grown
