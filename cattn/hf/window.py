"""The pages of a `PagedCache`'s sliding-window layers: only what a window can still reach.

A query at position ``p`` of a layer with window ``w`` sees keys ``p - w < k <= p``. Before a
forward step whose first new token is at ``n`` (per sequence), keys before ``n - w + 1`` are
never attended again by that layer, so their pages go back to this space's pool: a sliding
layer holds at most the window plus the step's new tokens (rounded to pages) instead of the
whole sequence. The sliding layers have a page space of their own (a pool tensor
``[sliding layers, 2, pages, page_size, Hkv, D]`` and a page table with `HOLE`s where pages
were given back); the global layers keep every token in the cache's main pool. The two share
token counts, ``kv_lens`` and ``cu_seqlens_q``; only slots and block tables differ.

Page 0 of the space is never handed out: block tables point holes at it and it holds zeros, so
what a kernel reads there (the lower edge of a window inside a tile) is finite and masked.
"""
from __future__ import annotations

import torch

from cattn.hf.step import PagedLayout
from cattn.paged import PagedSequences, PagePool

ZERO_PAGE = 0


class WindowPages:
    """The sliding layers' own pages (see the module docstring).

    Args:
        layout: the patched model's layout; its layers with a window live here.
        batch_size: sequences (one per row).
        max_tokens: the cache's tokens per sequence: this space starts with room for
            ``min(max_tokens, window + page_size)`` per row and grows when a step needs more.
        dtype, device: of the pool tensor.
    """

    def __init__(self, layout: PagedLayout, batch_size: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device):
        self.layers = tuple(i for i, w in enumerate(layout.sliding_windows) if w is not None)
        # One space for every sliding layer: the widest window keeps what each of them needs.
        self.window = max(layout.sliding_windows[i] for i in self.layers)
        ps = layout.page_size
        per_row = -(-min(max_tokens, self.window + ps) // ps) + 1
        self.pool = PagePool(batch_size * per_row + 1, ps)
        self.pool.claim([ZERO_PAGE])
        self.seqs = PagedSequences(self.pool, hole_page=ZERO_PAGE)
        self.kv = torch.empty(len(self.layers), 2, self.pool.num_pages, ps, layout.num_kv_heads, layout.head_dim,
                              dtype=dtype, device=device)
        self.kv[:, :, ZERO_PAGE].zero_()
        for row in range(batch_size):
            self.seqs.append_slots(row, 0)

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def caches(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer index -> ``(k_cache, v_cache)``, each ``[num_pages, page_size, num_kv_heads, head_dim]``."""
        return {layer: (self.kv[i, 0], self.kv[i, 1]) for i, layer in enumerate(self.layers)}

    def give_back(self, row: int) -> None:
        """Before a step: give back ``row``'s pages that no query from its next token on can reach."""
        self.seqs.drop_before(row, max(self.seqs.seqs[row].num_tokens - self.window + 1, 0))

    def reserve(self, counts: dict[int, int]) -> None:
        """Make room for ``counts[row]`` new tokens per row, growing the pool if needed."""
        ps = self.page_size
        need = sum(max(-(-(self.seqs.seqs[r].num_tokens + n) // ps) - len(self.seqs.seqs[r].pages), 0)
                   for r, n in counts.items())
        if need > self.pool.num_free:
            self.grow(need - self.pool.num_free)

    def grow(self, min_pages: int) -> None:
        """Enlarge the pool by at least ``min_pages`` (at least doubling it)."""
        extra = max(min_pages, self.pool.num_pages)
        old = self.kv
        self.kv = old.new_empty(old.shape[0], 2, old.shape[2] + extra, *old.shape[3:])
        self.kv[:, :, : old.shape[2]] = old
        self.pool.grow(extra)

    def check_keeps(self, row: int, num_tokens: int, keep_first: int, dropped: int) -> None:
        """ValueError unless dropping ``dropped`` tokens of ``row`` after its first ``keep_first`` (of
        ``num_tokens``) leaves every token the last one's window reaches held: the first tokens may
        have been given back, and the drop would bring them back into the window."""
        held = self.seqs.first_held(row)
        window_start = num_tokens - dropped - self.window + 1
        if min(keep_first, held) > max(window_start, 0) and held > 0:
            raise ValueError(f"keep_first: the sliding layers gave back tokens [0, {held}), and after dropping "
                             f"{dropped} tokens the window of {self.window} would reach back to token "
                             f"{window_start} among the first {keep_first}: drop more, or keep fewer first tokens")

    def gather(self, row: int) -> tuple[int, torch.Tensor]:
        """``(first held token, K/V [layers, 2, n, Hkv, D])`` of ``row``'s held tokens."""
        first, n, ps = self.seqs.first_held(row), self.seqs.seqs[row].num_tokens, self.page_size
        pages = self.seqs.seqs[row].pages
        slots = torch.tensor([pages[i // ps] * ps + i % ps for i in range(first, n)], dtype=torch.long,
                             device=self.kv.device)
        return first, self.kv.flatten(2, 3).index_select(2, slots)

    def place(self, row: int, first: int, num_tokens: int, data: torch.Tensor) -> None:
        """Make ``row`` ``num_tokens`` tokens whose first ``first`` are given back and the rest are ``data``
        (`gather`'s second result)."""
        self.seqs.start_with_holes(row, first)
        self.reserve({row: num_tokens - first})
        slots = torch.tensor(self.seqs.append_slots(row, num_tokens - first), dtype=torch.long,
                             device=self.kv.device)
        self.kv.flatten(2, 3)[:, :, slots] = data
