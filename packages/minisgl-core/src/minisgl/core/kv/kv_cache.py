"""KV page ownership. Every page of the pool has exactly one owner at any time:
- the free list (PageAllocator),
- the prefix cache (a radix tree node), possibly shared read-only by running requests that locked it,
- or one running request, as its private tail: `req.pages[req.num_tree_pages:]`.

The manager is the only code that moves pages between owners, and `check_integrity` proves the
invariant: the three sets are disjoint and together are the whole pool, and the locks and counters of
the tree agree with the requests that hold them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from minisgl.core.kv.page_allocator import PageAllocator
from minisgl.core.kv.radix_cache import NaiveCache, PrefixCache, RadixCache, RadixNode
from minisgl.core.kv.tables import RequestTables
from minisgl.core.request import Request

CACHE_KINDS = ("radix", "naive")


class KVCacheManager:
    def __init__(self, num_pages: int, tables: RequestTables, cache: str = "radix") -> None:
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {', '.join(CACHE_KINDS)}, got {cache!r}")
        self.num_pages = num_pages
        self.page_size = tables.page_size
        self.tables = tables
        self.allocator = PageAllocator(num_pages)
        self.cache: PrefixCache = (
            RadixCache(self.page_size) if cache == "radix" else NaiveCache(self.page_size)
        )

    @property
    def available_pages(self) -> int:
        """Pages a new allocation can get: free ones plus unlocked cached ones (evicted on demand)."""
        return self.allocator.num_free + self.cache.evictable_pages

    @property
    def cached_pages(self) -> int:
        return self.cache.evictable_pages + self.cache.protected_pages

    # ---- request lifecycle ---------------------------------------------------------------------------

    def attach(self, req: Request, use_cache: bool = True) -> None:
        """Give a newly admitted request its table row and the cached prefix of its tokens (locked).

        At least one token is left uncached, so that the request computes logits for its next token."""
        ids = req.all_token_ids()
        node, pages = self.cache.match(ids[: len(ids) - 1]) if use_cache else (None, [])
        self.cache.lock(node)
        req.cache_node = node
        req.pages = list(pages)
        req.num_tree_pages = len(pages)
        req.num_computed = len(pages) * self.page_size
        req.table_row = self.tables.acquire_row(ids)
        self.tables.set_pages(req.table_row, 0, req.pages)

    def grow(self, req: Request, num_tokens: int) -> None:
        """Make sure req has pages for its first num_tokens tokens, evicting cached pages if needed."""
        self.grow_all([(req, num_tokens)])

    def grow_all(self, needs: list[tuple[Request, int]]) -> None:
        """grow() for every (request, num_tokens) of a batch, with one eviction and one allocation."""
        missing = self._pages_missing(needs)
        total = sum(count for _, count in missing)
        if total == 0:
            return
        if total > self.allocator.num_free:
            self.allocator.free(self.cache.evict(total - self.allocator.num_free))
        new_pages = self.allocator.allocate(total)
        start = 0
        for req, count in missing:
            self._add_pages(req, new_pages[start : start + count])
            start += count

    def _pages_missing(self, needs: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """How many more pages each (request, num_tokens) needs (0 when it has enough)."""
        return [(req, max(0, -(-n // self.page_size) - len(req.pages))) for req, n in needs]

    def _add_pages(self, req: Request, pages: list[int]) -> None:
        if pages:
            self.tables.set_pages(req.table_row, len(req.pages), pages)
            req.pages.extend(pages)

    def cache_progress(self, req: Request) -> None:
        """Hand the computed, page-aligned prefix of a still-running request to the prefix cache, so that
        requests admitted later can share it. The request switches to the cache's copy of any page the
        cache already had and keeps its private tail."""
        owned = self._insert(req)
        old_node, req.cache_node = req.cache_node, owned
        self.cache.lock(owned)
        self.cache.unlock(old_node)

    def detach(self, req: Request) -> None:
        """The request is done (finished, aborted or retracted): cache its computed prefix, free its private
        tail, unlock its path and give back its table row."""
        self._insert(req)
        self.allocator.free(req.pages[req.num_tree_pages :])
        self.cache.unlock(req.cache_node)
        req.cache_node = None
        req.pages = []
        req.num_tree_pages = 0
        self.tables.release_row(req.table_row)
        req.table_row = -1

    def _insert(self, req: Request) -> RadixNode | None:
        # Never less than what the request already shares with the cache: those pages stay the cache's.
        ids = req.all_token_ids()[: max(req.num_computed, req.num_tree_pages * self.page_size)]
        prefix_len, node = self.cache.insert(ids, req.pages)
        owned_pages = self.cache.path_pages(node)
        # Pages in [num_tree_pages, prefix pages) were computed privately while the cache got its own copy
        # from another request: the duplicates go back to the free list and the request uses the cache's.
        duplicates = req.pages[req.num_tree_pages : prefix_len // self.page_size]
        if duplicates:
            self.allocator.free(duplicates)
            first = req.num_tree_pages
            req.pages[first : len(owned_pages)] = owned_pages[first:]
            if req.table_row >= 0:
                self.tables.set_pages(req.table_row, first, owned_pages[first:])
        req.num_tree_pages = len(owned_pages)
        return node

    # ---- accounting ----------------------------------------------------------------------------------

    def check_integrity(self, requests: Iterable[Request]) -> None:
        """Raise AssertionError unless every page has exactly one owner and the tree's locks and counters
        match the requests holding them."""
        requests = list(requests)
        self._check_one_owner_per_page(requests)
        locks = self._check_request_paths(requests)
        self._check_tree(locks)

    def _check_one_owner_per_page(self, requests: list[Request]) -> None:
        cached = self.cache.all_pages()
        private = [page for req in requests for page in req.pages[req.num_tree_pages :]]
        owners = Counter(self.allocator.free_pages()) + Counter(cached) + Counter(private)
        doubled = [page for page, count in owners.items() if count > 1]
        assert not doubled, f"pages with two owners: {sorted(doubled)[:10]}"
        assert len(owners) == self.num_pages, f"{self.num_pages - len(owners)} pages have no owner (leaked)"
        assert self.cache.evictable_pages + self.cache.protected_pages == len(cached), (
            "cache counters disagree"
        )

    def _check_request_paths(self, requests: list[Request]) -> Counter[int]:
        """Each request's tree pages are its cached path's; returns how many requests lock each node."""
        locks: Counter[int] = Counter()
        for req in requests:
            assert req.pages[: req.num_tree_pages] == self.cache.path_pages(req.cache_node), (
                f"request {req.uid} does not use its cached path's pages"
            )
            node = req.cache_node
            while node is not None and not node.is_root:
                locks[id(node)] += 1
                node = node.parent
        return locks

    def _check_tree(self, locks: Counter[int]) -> None:
        """Every node's lock count matches its holders and its pages are page-aligned; the evictable
        counter matches the unlocked nodes."""
        evictable = 0
        for node in self.cache.nodes():
            assert node.lock_ref == locks[id(node)], (
                f"node lock count {node.lock_ref} != {locks[id(node)]} holders"
            )
            assert len(node.key) == len(node.pages) * self.page_size and node.key, "node is not page-aligned"
            evictable += len(node.pages) if node.lock_ref == 0 else 0
        assert evictable == self.cache.evictable_pages, "evictable page count disagrees with the tree"
