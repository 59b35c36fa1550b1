"""Property test of the prefix cache and KV page ownership.

Hypothesis drives random sequences of request starts (match + lock + insert), progress, finishes, aborts,
plain matches and explicit evictions through KVCacheManager, on a pool small enough that allocation
keeps evicting. A plain-Python reference (a dict from every cached page-aligned prefix to the page
holding its last page of tokens) predicts every match exactly; after each step check_integrity()
must hold, the tree may only lose prefixes (never change their pages), never a locked one, and every
inserted prefix must be present.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisgl.core.kv.kv_cache import KVCacheManager
from minisgl.core.kv.radix_cache import RadixCache
from minisgl.core.kv.tables import RequestTables
from minisgl.core.request import Request
from minisgl.core.sampling_params import SamplingParams

Prefix = tuple[int, ...]


class Reference:
    """What the cache should contain: page-aligned prefix -> page id of its last page."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.pages: dict[Prefix, int] = {}

    def match(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for end in range(self.page_size, len(ids) + 1, self.page_size):
            page = self.pages.get(tuple(ids[:end]))
            if page is None:
                break
            out.append(page)
        return out


def tree_contents(cache: RadixCache) -> dict[Prefix, int]:
    contents: dict[Prefix, int] = {}
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            key = prefix + child.key
            for i, page in enumerate(child.pages):
                contents[key[: len(prefix) + (i + 1) * cache.page_size]] = page
            stack.append((child, key))
    return contents


tokens = st.lists(st.integers(0, 2), min_size=1, max_size=12)
operation = st.one_of(
    st.tuples(st.just("start"), tokens),
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("abort"), st.integers(0, 7), st.integers(0, 12)),
    st.tuples(st.just("match"), tokens),
    st.tuples(st.just("evict"), st.integers(1, 6)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(12, 40), ops=st.lists(operation, max_size=60)
)
def test_cache_matches_reference_and_keeps_ownership(
    page_size: int, num_pages: int, ops: list[tuple]
) -> None:
    tables = RequestTables(max_rows=8, max_seq_len=16, page_size=page_size, device=torch.device("cpu"))
    kv = KVCacheManager(num_pages, tables, "radix")
    cache = kv.cache
    assert isinstance(cache, RadixCache)
    ref = Reference(page_size)
    running: list[Request] = []
    rid = 0

    for op in ops:
        before = dict(ref.pages)
        if op[0] == "start" and tables.num_free_rows:
            ids = op[1]
            req = Request(rid, ids, SamplingParams())
            rid += 1
            expected = ref.match(ids[: len(ids) - 1])
            kv.attach(req)
            assert req.pages == expected, "match disagrees with the reference"
            locked_pages = sum(len(n.pages) for n in cache.nodes() if n.lock_ref > 0)
            if (
                kv.available_pages < -(-len(ids) // page_size) - len(req.pages)
                or locked_pages > num_pages // 2
            ):
                kv.detach(req)  # would not be admitted: too little memory
            else:
                kv.grow(req, len(ids))
                req.num_computed = len(ids)
                kv.cache_progress(req)
                running.append(req)
        elif op[0] in ("finish", "abort") and running:
            req = running.pop(op[1] % len(running))
            if op[0] == "abort":
                req.num_computed = min(req.num_computed, op[2])
            kv.detach(req)
        elif op[0] == "match":
            _, pages = cache.match(op[1])
            assert pages == ref.match(op[1])
        elif op[0] == "evict":
            kv.allocator.free(cache.evict(op[1]))

        kv.check_integrity(running)
        contents = tree_contents(cache)
        # Only eviction removes prefixes, and never changes the page behind one.
        for prefix, page in contents.items():
            assert before.get(prefix, page) == page, "a cached prefix changed its page"
            assert len(prefix) <= page_size or prefix[:-page_size] in contents, "cache is not prefix-closed"
        for req in running:
            ids = req.all_token_ids()[: req.num_computed]
            aligned = len(ids) - len(ids) % page_size
            for end in range(page_size, aligned + 1, page_size):
                assert tuple(ids[:end]) in contents, "a running request's cached prefix was evicted"
        ref.pages = contents

    for req in running:
        kv.detach(req)
    kv.check_integrity([])
    assert kv.allocator.num_free + cache.evictable_pages == num_pages
    assert cache.protected_pages == 0
    kv.allocator.free(cache.evict(num_pages))
    assert kv.allocator.num_free == num_pages


def test_inserted_prefixes_are_matched_to_the_page() -> None:
    tables = RequestTables(max_rows=4, max_seq_len=64, page_size=4, device=torch.device("cpu"))
    kv = KVCacheManager(32, tables, "radix")
    first = Request(0, list(range(10)), SamplingParams())
    kv.attach(first)
    kv.grow(first, 10)
    first.num_computed = 10
    kv.detach(first)
    second = Request(1, [*range(10), 99], SamplingParams())
    kv.attach(second)
    assert second.num_computed == 8  # two whole pages of the first request's ten tokens
    kv.check_integrity([second])


def test_naive_cache_reuses_nothing() -> None:
    tables = RequestTables(max_rows=4, max_seq_len=64, page_size=1, device=torch.device("cpu"))
    kv = KVCacheManager(32, tables, "naive")
    for rid in range(2):
        req = Request(rid, list(range(10)), SamplingParams())
        kv.attach(req)
        assert req.num_computed == 0
        kv.grow(req, 10)
        req.num_computed = 10
        kv.detach(req)
        kv.check_integrity([])
    assert kv.allocator.num_free == 32
