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
what a kernel reads there (the lower edge of a window inside a tile) is finite and masked. A
history streamed in from a store brings only its window's tokens; the rest of their first page
is zeros too, and `first_held` never counts it as held.
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
            ``min(max_tokens, start_tokens)`` per row and grows when a step needs more.
        dtype, device: of the pool tensor.
        slack: tokens kept before each window's reach (for a caller that may want them back).
        start_tokens: default the window, the slack and a page.
    """

    def __init__(self, layout: PagedLayout, batch_size: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, slack: int = 0, start_tokens: int | None = None):
        self.layers = tuple(i for i, w in enumerate(layout.sliding_windows) if w is not None)
        # One space for every sliding layer: the widest window keeps what each of them needs.
        self.window = max(layout.sliding_windows[i] for i in self.layers)
        self.slack = slack
        ps = layout.page_size
        start_tokens = self.window + slack + ps if start_tokens is None else start_tokens
        per_row = -(-min(max_tokens, start_tokens) // ps) + 1
        self.pool = PagePool(batch_size * per_row + 1, ps)
        self.pool.claim([ZERO_PAGE])
        self.seqs = PagedSequences(self.pool, hole_page=ZERO_PAGE)
        self.kv = torch.empty(len(self.layers), 2, self.pool.num_pages, ps, layout.num_kv_heads, layout.head_dim,
                              dtype=dtype, device=device)
        self.kv[:, :, ZERO_PAGE].zero_()
        self._valid_from: dict[int, int] = {}   # per row: tokens before it in a held page are zeros
        for row in range(batch_size):
            self.seqs.append_slots(row, 0)

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def caches(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer index -> ``(k_cache, v_cache)``, each ``[num_pages, page_size, num_kv_heads, head_dim]``."""
        return {layer: (self.kv[i, 0], self.kv[i, 1]) for i, layer in enumerate(self.layers)}

    def first_held(self, row: int) -> int:
        """The first token of ``row`` whose K/V this space holds (every later one is held too)."""
        return max(self.seqs.first_held(row), self._valid_from.get(row, 0))

    def give_back(self, row: int) -> None:
        """Before a step: give back ``row``'s pages that no query from its next token on can reach."""
        self.seqs.drop_before(row, max(self.seqs.seqs[row].num_tokens - self.window + 1 - self.slack, 0))

    def needs_pages(self, counts: dict[int, int]) -> int:
        """Pages missing for ``counts[row]`` new tokens per row (0 if the free ones suffice)."""
        ps = self.page_size
        need = sum(max(-(-(self.seqs.seqs[r].num_tokens + n) // ps) - len(self.seqs.seqs[r].pages), 0)
                   for r, n in counts.items())
        return max(need - self.pool.num_free, 0)

    def reserve(self, counts: dict[int, int]) -> None:
        """Make room for ``counts[row]`` new tokens per row, growing the pool if needed."""
        if missing := self.needs_pages(counts):
            self.grow(missing)

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
        held = self.first_held(row)
        window_start = num_tokens - dropped - self.window + 1
        if min(keep_first, held) > max(window_start, 0):
            raise ValueError(f"keep_first: the sliding layers gave back tokens [0, {held}), and after dropping "
                             f"{dropped} tokens the window of {self.window} would reach back to token "
                             f"{window_start} among the first {keep_first}: drop more, or keep fewer first tokens")

    def truncated(self, row: int, keep_first: int, dropped: int) -> None:
        """``row`` lost ``dropped`` tokens after its first ``keep_first`` (its page table did already)."""
        valid = self._valid_from.get(row, 0)
        if valid > keep_first:
            self._valid_from[row] = keep_first if valid <= keep_first + dropped else valid - dropped

    def reset(self, row: int) -> None:
        self.seqs.release(row)
        self.seqs.append_slots(row, 0)
        self._valid_from.pop(row, None)

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        """``[end - start] int64``: the slots of ``row``'s tokens ``[start, end)``; ValueError unless held."""
        held = self.first_held(row)
        if start < held:
            raise ValueError(f"token range [{start}, {end}): the sliding layers gave back tokens [0, {held}) "
                             "(a PagedCache(..., window_pages=False) keeps them)")
        pages, ps = self.seqs.seqs[row].pages, self.page_size
        return torch.tensor([pages[i // ps] * ps + i % ps for i in range(start, end)], dtype=torch.long,
                            device=self.kv.device)

    def gather(self, row: int) -> tuple[int, torch.Tensor]:
        """``(first held token, K/V [layers, 2, n, Hkv, D])`` of ``row``'s held tokens."""
        first = self.first_held(row)
        return first, self.kv.flatten(2, 3).index_select(2, self.slots(row, first, self.seqs.seqs[row].num_tokens))

    def start_at(self, row: int, first: int, num_tokens: int) -> torch.Tensor:
        """Make ``row`` ``num_tokens`` tokens of which only ``[first, num_tokens)`` are held (pages before
        ``first``'s are holes, the tokens before ``first`` in its page zeros); returns those tokens' slots
        ``[num_tokens - first] int64``, for the caller to fill."""
        aligned = first // self.page_size * self.page_size
        self.seqs.start_with_holes(row, aligned)
        self.reserve({row: num_tokens - aligned})
        slots = torch.tensor(self.seqs.append_slots(row, num_tokens - aligned), dtype=torch.long,
                             device=self.kv.device)
        self.kv.flatten(2, 3)[:, :, slots[:first - aligned]] = 0
        self._valid_from[row] = first
        return slots[first - aligned:]

    def place(self, row: int, first: int, num_tokens: int, data: torch.Tensor) -> None:
        """Make ``row`` ``num_tokens`` tokens whose first ``first`` are given back and the rest are ``data``
        (`gather`'s second result)."""
        self.kv.flatten(2, 3)[:, :, self.start_at(row, first, num_tokens)] = data
