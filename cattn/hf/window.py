"""The pages of a model's sliding-window layers (a part of `ModelPages`): only what a window can still reach.

A query at position ``p`` of a layer with window ``w`` sees keys ``p - w < k <= p``. Before a
forward step whose first new token is at ``n`` (per sequence), keys before ``n - w + 1`` are
never attended again by that layer, so their pages go back to this space's pool: a sliding
layer holds at most the window plus the step's new tokens (rounded to pages) instead of the
whole sequence. The sliding layers have a page space of their own (a pool tensor
``[sliding layers, 2, pages, page_size, Hkv, D]`` and a page table with `HOLE`s where pages
were given back); the global layers keep every token in the main pool (`ModelPages.kv`). The two share
token counts, ``kv_lens`` and ``cu_seqlens_q``; only slots and block tables differ.

Page 0 of the space is never handed out: block tables point holes at it and it holds zeros, so
what a kernel reads there (the lower edge of a window inside a tile) is finite and masked. A
history streamed in from a store brings only its window's tokens; the rest of their first page
is zeros too, and `first_held` never counts it as held.
"""
from __future__ import annotations

import itertools

import torch

from cattn.hf.step import PagedLayout
from cattn.paged import PagedSequences, PagePool, PoolExhaustedError

ZERO_PAGE = 0


class WindowPages:
    """The sliding layers' own pages (see the module docstring).

    Args:
        layout: the patched model's layout; its layers with a window live here.
        batch_size: sequences (one per row).
        max_tokens: the pages' tokens per sequence: this space starts with room for
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

    def begin_step(self, counts: list[int], may_grow: bool) -> list[int]:
        """Before a step of ``counts[row]`` new tokens per row: give back what no window reaches any more,
        make room for the new tokens (growing the pool unless ``may_grow`` is False: a history streams into
        the pages), and return their slots, row-major. `PoolExhaustedError` if they need pages it cannot have."""
        for row in range(len(counts)):
            self.give_back(row)
        if not may_grow and self.needs_pages(dict(enumerate(counts))):
            raise PoolExhaustedError(f"the sliding layers' pages ({self.pool.num_free} free) cannot take this "
                                     "step's tokens and cannot grow while a history streams into them: create the "
                                     "PagedCache with a larger window_tokens")
        self.reserve(dict(enumerate(counts)))
        return list(itertools.chain.from_iterable(self.seqs.append_slots(r, n) for r, n in enumerate(counts)))

    def check_crop(self, row: int, num_tokens: int) -> None:
        """ValueError unless ``row`` may be cropped to ``num_tokens``: a window ending there must not reach
        tokens given back."""
        if num_tokens - self.window + 1 < self.first_held(row):
            raise ValueError(f"crop: the sliding layers gave back tokens [0, {self.first_held(row)}) "
                             f"of row {row}, which a window ending at token {num_tokens} would reach; a "
                             "PagedCache(..., window_pages=False) can be cropped that far")

    def truncate(self, row: int, num_drop: int, keep_first: int) -> None:
        """`PagedSequences.truncate` of ``row``, refused (ValueError, before any change) if the last token's
        window would then reach tokens given back: dropping tokens after the first ``keep_first`` brings
        those first ones closer, and they may have been given back."""
        n = self.seqs.seqs[row].num_tokens
        kf = min(keep_first, n)
        dropped = min(-(-num_drop // self.page_size) * self.page_size, n - kf)
        held = self.first_held(row)
        window_start = n - dropped - self.window + 1
        if min(kf, held) > max(window_start, 0):
            raise ValueError(f"keep_first: the sliding layers gave back tokens [0, {held}), and after dropping "
                             f"{dropped} tokens the window of {self.window} would reach back to token "
                             f"{window_start} among the first {kf}: drop more, or keep fewer first tokens")
        self.seqs.truncate(row, num_drop, keep_first, caches=[self.kv.permute(2, 3, 0, 1, 4, 5)])
        valid = self._valid_from.get(row, 0)     # tokens before it in a held page are zeros
        if valid > kf:
            self._valid_from[row] = kf if valid <= kf + dropped else valid - dropped

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
