"""The free list of KV pages. Pages are handed out and returned whole; the allocator refuses to free a
page twice or to free a page it never handed out, so accounting bugs fail loudly where they happen."""

from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        # Popped from the end: low page ids are handed out first, which keeps small runs compact.
        self._free = list(range(num_pages - 1, -1, -1))
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"out of KV pages: asked for {count}, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._is_free[page] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if not 0 <= page < self.num_pages:
                raise RuntimeError(f"freeing page {page}, which is outside the pool")
            if self._is_free[page]:
                raise RuntimeError(f"page {page} freed twice")
            self._is_free[page] = True
            self._free.append(page)

    def free_pages(self) -> list[int]:
        return list(self._free)
