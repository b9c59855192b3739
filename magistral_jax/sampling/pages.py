"""The host's side of a paged KV cache: which pages are free, who holds each page, each row's table.

The device holds the pages (`model.decoder.PagedKVCache`); this pool decides which page each row
reads and writes. A page is free, or held by one or more rows (a group's samples share their
prompt's full pages): it returns to the free list when its last holder releases it. Page 0 is the
null page, never handed out: a table entry a row does not hold points at it.
"""

from __future__ import annotations

import numpy as np


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens."""
    return -(-tokens // page_size)


class PagePool:
    """Page accounting for `rows` rows over a pool of `pages` pages of `page_size` tokens (the
    null page included), each row's table `table_width` entries wide."""

    def __init__(self, pages: int, page_size: int, rows: int, table_width: int):
        if pages < 2:
            raise ValueError(f"a page pool needs at least one page besides the null page, got {pages} pages")
        self.page_size = page_size
        self.free = list(range(pages - 1, 0, -1))  # a stack: the lowest ids are handed out first
        self.holders = np.zeros(pages, np.int32)
        self.table = np.zeros((rows, table_width), np.int32)
        self.held = np.zeros(rows, np.int32)  # table entries each row holds, from the first

    @property
    def available(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        """`n` free pages, now held once each (by the caller, until it gives them to rows with
        `hold` and back with `give_back`, or holds them for a row that frees them)."""
        if n > len(self.free):
            raise ValueError(f"page pool: {n} pages wanted, {len(self.free)} free")
        pages = [self.free.pop() for _ in range(n)]
        self.holders[pages] = 1
        return pages

    def hold(self, row: int, pages: list[int], shared: bool = False) -> None:
        """Appends `pages` to `row`'s table; `shared` pages (already held by another row) gain a
        holder, the others must come from `take` for this row."""
        start = int(self.held[row])
        if start + len(pages) > self.table.shape[1]:
            raise ValueError(
                f"page pool: row {row} would hold {start + len(pages)} pages, its table has {self.table.shape[1]}"
            )
        self.table[row, start : start + len(pages)] = pages
        self.held[row] = start + len(pages)
        if shared:
            self.holders[pages] += 1

    def give_back(self, pages: list[int]) -> None:
        """Drops the holder `take` gave `pages`; those no row holds are free again."""
        self.holders[pages] -= 1
        self.free += [p for p in pages[::-1] if self.holders[p] == 0]

    def grow(self, row: int, tokens: int) -> None:
        """Gives `row` the pages it lacks to hold `tokens` tokens."""
        missing = pages_for(tokens, self.page_size) - int(self.held[row])
        if missing > 0:
            self.hold(row, self.take(missing))

    def release(self, row: int) -> None:
        """`row` lets go of its pages; those nobody else holds are free again."""
        self.give_back([int(p) for p in self.table[row, : self.held[row]]])
        self.table[row] = 0
        self.held[row] = 0
