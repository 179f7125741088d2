"""Page pool and per-sequence page bookkeeping for the paged KV layout.

A layer's cache is ``[num_pages, page_size, num_kv_heads, head_dim]``; logical
token ``i`` of a sequence lives in page ``pages[i // page_size]`` at offset
``i % page_size``. Nothing stored carries a position, which is what makes
`PagedSequences.truncate` cheap: dropping old tokens only unlinks pages.

A sequence of a sliding-window layer gives back the pages its window has passed
(`PagedSequences.drop_before`): they stay in its page list as `HOLE`, and block tables
point them at the pool's ``hole_page``, which the caller keeps finite (zeros) and never
writes; the window masks whatever is read there.
"""
from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


def _count(value, name: str, *, least: int = 0) -> int:
    """``value`` as an int ``>= least``: ints and numpy ints; bool, float and tensors are refused."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be {'positive' if least == 1 else f'>= {least}'}, got {value}")
    return int(value)


HOLE = -1   # a page given back: its tokens are before every window that will still be attended


class PoolExhaustedError(RuntimeError):
    """The page pool has fewer free pages than an allocation asked for."""


class PagePool:
    """A free list over ``num_pages`` pages of ``page_size`` tokens."""

    def __init__(self, num_pages: int, page_size: int = 16):
        num_pages, page_size = _count(num_pages, "num_pages", least=1), _count(page_size, "page_size", least=1)
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._used = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free page ids (low ids first); raises `PoolExhaustedError` and changes nothing if too few."""
        n = _count(n, "n")
        if n > len(self._free):
            raise PoolExhaustedError(f"page pool exhausted: asked for {n} pages, {len(self._free)} of "
                                     f"{self.num_pages} free (page_size={self.page_size})")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def claim(self, pages: Sequence[int]) -> None:
        """Allocate these particular pages (a sequence whose pages outlived an earlier pool, e.g. a
        session's resident pages); ValueError, before any change, if one is taken or out of range."""
        wanted = set(pages)
        if len(wanted) != len(pages) or any(not 0 <= p < self.num_pages or p in self._used for p in wanted):
            raise ValueError(f"pages: {list(pages)} are not distinct free pages of this pool of {self.num_pages}")
        self._free = [p for p in self._free if p not in wanted]
        self._used.update(wanted)

    def grow(self, n: int) -> None:
        """Add ``n`` pages with the next ids (the caller enlarges its page tensors to match)."""
        n = _count(n, "n")
        self._free[:0] = range(self.num_pages + n - 1, self.num_pages - 1, -1)   # handed out after the old ones
        self.num_pages += n

    def free(self, pages: Sequence[int]) -> None:
        """Return ``pages`` to the pool, all or none: every id is checked (an int in range, allocated,
        listed once) before any is freed, so a bad list leaves the pool as it was."""
        pages = list(pages)
        for p in pages:
            if not isinstance(p, numbers.Integral) or isinstance(p, bool):
                raise TypeError(f"pages: page ids must be ints, got {type(p).__name__}")
            if not 0 <= p < self.num_pages:
                raise ValueError(f"pages: page {p} is out of range [0, {self.num_pages})")
            if p not in self._used:
                raise ValueError(f"pages: page {p} is not allocated (double free?)")
        if len(set(pages)) != len(pages):
            raise ValueError(f"pages: a page is listed more than once (double free): {pages}")
        self._used.difference_update(pages)
        self._free.extend(int(p) for p in pages)


@dataclass
class SequencePages:
    """One sequence's pages and token count."""

    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PagedSequences:
    """Sequences stored in a `PagePool`: slot mapping, block tables, release and truncation.

    Args:
        pool: where the pages come from.
        hole_page: the page id block tables show for a `HOLE` (a page given back by `drop_before`).
    """

    def __init__(self, pool: PagePool, hole_page: int = 0):
        self.pool = pool
        self.hole_page = hole_page
        self.seqs: dict[Hashable, SequencePages] = {}

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def append_slots(self, seq_id: Hashable, n: int) -> list[int]:
        """Reserve ``n`` new token slots at the end of ``seq_id`` (created if new); returns their slots
        (``page * page_size + offset``). Raises `PoolExhaustedError` before changing anything."""
        n = _count(n, "n")
        seq = self.seqs.get(seq_id) or SequencePages()
        ps = self.page_size
        need = -(-(seq.num_tokens + n) // ps) - len(seq.pages)
        seq.pages.extend(self.pool.allocate(max(need, 0)))
        self.seqs[seq_id] = seq
        first = seq.num_tokens
        seq.num_tokens += n
        return [seq.pages[i // ps] * ps + i % ps for i in range(first, first + n)]

    def kv_lens(self, seq_ids: Sequence[Hashable], device=None) -> torch.Tensor:
        """``[B] int32`` token counts of ``seq_ids``."""
        return torch.tensor([self.seqs[s].num_tokens for s in seq_ids], dtype=torch.int32, device=device)

    def block_table(self, seq_ids: Sequence[Hashable], device=None) -> torch.Tensor:
        """``[B, max_pages] int32`` page ids, rows padded with 0 (never read past ``kv_lens``) and holes
        shown as ``hole_page``."""
        rows = [self.seqs[s].pages for s in seq_ids]
        table = torch.zeros(len(rows), max((len(r) for r in rows), default=0) or 1, dtype=torch.int32)
        for b, r in enumerate(rows):
            table[b, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return table.masked_fill_(table == HOLE, self.hole_page).to(device)

    def release(self, seq_id: Hashable) -> None:
        self._free(self.seqs.pop(seq_id).pages)

    def first_held(self, seq_id: Hashable) -> int:
        """The first token of ``seq_id`` whose page is held (tokens before it were given back)."""
        pages = self.seqs[seq_id].pages
        return next((i for i, p in enumerate(pages) if p != HOLE), len(pages)) * self.page_size

    def drop_before(self, seq_id: Hashable, num_tokens: int) -> int:
        """Give back the pages that hold only tokens before ``num_tokens`` (they become `HOLE`s;
        token numbering is unchanged). Returns the number of pages given back."""
        seq = self.seqs[seq_id]
        stop = min(_count(num_tokens, "num_tokens"), seq.num_tokens) // self.page_size
        # Holes are always a prefix: walk back from the cut to the last one, so a decode step costs
        # the pages it gives back, not the sequence's length.
        first = stop
        while first > 0 and seq.pages[first - 1] != HOLE:
            first -= 1
        given = seq.pages[first:stop]
        self.pool.free(given)
        seq.pages[first:stop] = [HOLE] * (stop - first)
        return len(given)

    def start_with_holes(self, seq_id: Hashable, num_tokens: int) -> None:
        """Make ``seq_id`` a sequence of ``num_tokens`` tokens whose pages are all given back
        (``num_tokens`` a multiple of the page size); `append_slots` continues it."""
        if _count(num_tokens, "num_tokens") % self.page_size:
            raise ValueError(f"num_tokens must be a multiple of page_size={self.page_size}, got {num_tokens}")
        if seq_id in self.seqs:
            self.release(seq_id)
        self.seqs[seq_id] = SequencePages([HOLE] * (num_tokens // self.page_size), num_tokens)

    def crop(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens of ``seq_id``, freeing the pages past them."""
        seq = self.seqs[seq_id]
        seq.num_tokens = min(_count(num_tokens, "num_tokens"), seq.num_tokens)
        keep_pages = -(-seq.num_tokens // self.page_size)
        self._free(seq.pages[keep_pages:])
        del seq.pages[keep_pages:]

    def _free(self, pages: Sequence[int]) -> None:
        self.pool.free([p for p in pages if p != HOLE])

    def truncate(self, seq_id: Hashable, num_drop: int, keep_first: int = 0,
                 caches: Sequence[torch.Tensor] = ()) -> int:
        """Drop the oldest tokens of ``seq_id`` after its first ``keep_first`` (attention sinks).

        The drop is rounded up to whole pages, so that every kept token keeps its
        in-page offset and no kept KV moves in bulk; the only data moved is the
        partial page that ends the ``keep_first`` prefix, copied into the page at
        the cut in each tensor of ``caches`` (each ``[num_pages, page_size, ...]``,
        e.g. every layer's K and V). Afterwards the kept tokens are numbered from 0,
        so attention over them equals attention recomputed on the kept pre-RoPE K/V.

        Returns the number of tokens actually dropped (``>= num_drop`` unless the
        sequence had fewer tokens after ``keep_first``).
        """
        num_drop, keep_first = _count(num_drop, "num_drop"), _count(keep_first, "keep_first")
        seq = self.seqs[seq_id]
        ps = self.page_size
        keep_first = min(keep_first, seq.num_tokens)
        droppable = seq.num_tokens - keep_first
        dropped = min(-(-num_drop // ps) * ps, droppable)
        if dropped == 0:
            return 0
        if dropped == droppable:      # nothing after the prefix survives: keep the prefix's pages only
            keep_pages = -(-keep_first // ps)
            self._free(seq.pages[keep_pages:])
            seq.pages, seq.num_tokens = seq.pages[:keep_pages], keep_first
            return dropped
        head_full, head_rem = divmod(keep_first, ps)
        cut = (keep_first + dropped) // ps   # page holding the first kept token after the gap
        if head_rem:
            # The prefix's partial page and the cut page share offsets [0, head_rem): the cut page's
            # slots there hold dropped tokens, so the prefix's tail moves in and its page is freed.
            # A hole on either side: those prefix tokens were given back, no window reaches them.
            src, dst = seq.pages[head_full], seq.pages[cut]
            for cache in caches if HOLE not in (src, dst) else ():
                cache[dst, :head_rem] = cache[src, :head_rem]
        self._free(seq.pages[head_full:cut])
        seq.pages = seq.pages[:head_full] + seq.pages[cut:]
        seq.num_tokens -= dropped
        return dropped
