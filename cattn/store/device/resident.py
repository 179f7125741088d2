"""What the device tier holds: its configuration, and one session's resident first layers (`Resident`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DeviceTierConfig:
    """How much device memory sessions may keep between turns, and how it is shared.

    Attributes:
        budget_bytes: bytes of resident pages in all; or
        budget_fraction: a fraction of the device's free memory when the tier is made (CUDA only).
        layers: keep this many first layers per session instead of the buffer rule's ``k`` (benchmarks,
            tests); None: the rule, from measured copy and compute times.
        headroom: extra page capacity (a fraction) a session's resident tensors get, so that the
            next turns' new tokens fit in place.
        reserve_bytes: device memory `make_room` keeps free beyond what a turn's pages need (activations).
    """

    budget_bytes: int | None = None
    budget_fraction: float | None = None
    layers: int | None = None
    headroom: float = 0.5
    reserve_bytes: int = 0

    def __post_init__(self):
        if (self.budget_bytes is None) == (self.budget_fraction is None):
            raise ValueError("give exactly one of budget_bytes and budget_fraction")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or self.budget_bytes < 0):
            raise ValueError(f"budget_bytes must be an int >= 0, got {self.budget_bytes!r}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction!r}")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 0):
            raise ValueError(f"layers must be an int >= 0 or None, got {self.layers!r}")
        if not 0 <= self.headroom <= 8:
            raise ValueError(f"headroom must be in [0, 8], got {self.headroom!r}")
        if not isinstance(self.reserve_bytes, int) or self.reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be an int >= 0, got {self.reserve_bytes!r}")


@dataclass(eq=False)
class Resident:
    """A session's first layers in device pages.

    Attributes:
        token_ids: ``[n] int64`` (host), the tokens whose K/V the pages hold, in order.
        pages: ``ceil(n / page_size)`` page ids: token ``i`` is at page ``pages[i // page_size]``,
            offset ``i % page_size``, of every tensor below.
        k, v: per resident layer ``[capacity_pages, page_size, num_kv_heads, head_dim]`` pre-RoPE.
    """

    token_ids: torch.Tensor
    pages: list[int]
    k: list[torch.Tensor]
    v: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1] if self.k else 1

    @property
    def capacity_pages(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def layer_nbytes(self) -> int:
        """Device bytes one resident layer holds (K and V, whole capacity)."""
        return 2 * self.k[0].nbytes if self.k else 0

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes

    def fits(self, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> bool:
        """Whether these pages are in the layout a cache of that shape attends over (a model patched again
        with another page size, or moved, cannot use them)."""
        want = (page_size, num_kv_heads, head_dim)
        return all(tuple(t.shape[1:]) == want and t.dtype == dtype and t.device == torch.device(device)
                   for t in (*self.k, *self.v))

    def trim_tokens(self, n: int) -> None:
        """Keep the first ``n`` tokens (metadata only)."""
        self.token_ids = self.token_ids[:n]
        self.pages = self.pages[:-(-n // self.page_size)] if n else []

    def trim_layers(self, n: int) -> None:
        """Keep the first ``n`` layers; the others' memory is released."""
        del self.k[n:], self.v[n:]
