"""Prefix caches. A prefix cache owns KV pages of token sequences it has seen, so that a new request whose
prompt starts the same way reuses them instead of recomputing.

RadixCache is a radix tree over token ids, page-aligned: every edge holds a whole number of pages, so a
match or an insert always covers whole pages. Nodes on the path of a running request are locked (a
reference count up to the root) and never evicted; unlocked leaves are evicted least recently used first.
NaiveCache keeps nothing (`cache="naive"`): every request computes its whole prompt.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first position where a and b differ (the shorter length if one is a prefix)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]
    pages: list[int]
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None


class PrefixCache:
    """The interface the KV cache manager uses. Page lists are page ids; lengths are in tokens."""

    page_size: int
    evictable_pages: int
    protected_pages: int

    def match(self, ids: Sequence[int]) -> tuple[RadixNode | None, list[int]]:
        """The deepest node matching a page-aligned prefix of ids, and the pages of that prefix."""
        raise NotImplementedError

    def insert(self, ids: Sequence[int], pages: Sequence[int]) -> tuple[int, RadixNode | None]:
        """Cache ids (cut to whole pages) with their pages. Returns (tokens already cached before this
        insert, node now ending the sequence). Pages past the first return value become the cache's."""
        raise NotImplementedError

    def path_pages(self, node: RadixNode | None) -> list[int]:
        raise NotImplementedError

    def lock(self, node: RadixNode | None) -> None:
        raise NotImplementedError

    def unlock(self, node: RadixNode | None) -> None:
        raise NotImplementedError

    def evict(self, num_pages: int) -> list[int]:
        """Free at least num_pages pages (fewer only if fewer are evictable); returns them."""
        raise NotImplementedError

    def all_pages(self) -> list[int]:
        raise NotImplementedError

    def nodes(self) -> Iterator[RadixNode]:
        raise NotImplementedError


class NaiveCache(PrefixCache):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.evictable_pages = 0
        self.protected_pages = 0

    def match(self, ids: Sequence[int]) -> tuple[RadixNode | None, list[int]]:
        return None, []

    def insert(self, ids: Sequence[int], pages: Sequence[int]) -> tuple[int, RadixNode | None]:
        return 0, None

    def path_pages(self, node: RadixNode | None) -> list[int]:
        return []

    def lock(self, node: RadixNode | None) -> None:
        pass

    def unlock(self, node: RadixNode | None) -> None:
        pass

    def evict(self, num_pages: int) -> list[int]:
        return []

    def all_pages(self) -> list[int]:
        return []

    def nodes(self) -> Iterator[RadixNode]:
        return iter(())


class RadixCache(PrefixCache):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = RadixNode(key=(), pages=[], parent=None, lock_ref=1)
        self.evictable_pages = 0
        self.protected_pages = 0
        # A logical clock for LRU: deterministic, unlike wall time.
        self._clock = itertools.count(1)

    def _edge(self, ids: Sequence[int], start: int) -> tuple[int, ...]:
        return tuple(ids[start : start + self.page_size])

    def _walk(self, ids: Sequence[int]) -> tuple[RadixNode, int]:
        """Follow ids down the tree, splitting a node where the match ends inside it."""
        now = next(self._clock)
        node, matched = self.root, 0
        while len(ids) - matched >= self.page_size:
            child = node.children.get(self._edge(ids, matched))
            if child is None:
                break
            length = first_mismatch(child.key, ids[matched : matched + len(child.key)])
            length -= length % self.page_size  # >= one page: the edge key matched
            partial = length < len(child.key)
            if partial:
                child = self._split(child, length)
            child.last_access = now
            node, matched = child, matched + length
            if partial:
                break
        return node, matched

    def _split(self, child: RadixNode, length: int) -> RadixNode:
        """Cut child after `length` tokens; returns the new upper node (same locks as child)."""
        parent = child.parent
        assert parent is not None and 0 < length < len(child.key)
        upper = RadixNode(
            key=child.key[:length],
            pages=child.pages[: length // self.page_size],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        parent.children[self._edge(upper.key, 0)] = upper
        child.key = child.key[length:]
        child.pages = child.pages[length // self.page_size :]
        child.parent = upper
        upper.children[self._edge(child.key, 0)] = child
        return upper

    def match(self, ids: Sequence[int]) -> tuple[RadixNode | None, list[int]]:
        node, _ = self._walk(ids)
        return node, self.path_pages(node)

    def insert(self, ids: Sequence[int], pages: Sequence[int]) -> tuple[int, RadixNode | None]:
        aligned = len(ids) - len(ids) % self.page_size
        if len(pages) < aligned // self.page_size:
            raise ValueError(
                f"insert of {aligned} tokens needs {aligned // self.page_size} pages, got {len(pages)}"
            )
        node, matched = self._walk(ids[:aligned])
        if matched < aligned:
            leaf = RadixNode(
                key=tuple(ids[matched:aligned]),
                pages=list(pages[matched // self.page_size : aligned // self.page_size]),
                parent=node,
                last_access=next(self._clock),
            )
            node.children[self._edge(leaf.key, 0)] = leaf
            self.evictable_pages += len(leaf.pages)
            node = leaf
        return matched, node

    def path_pages(self, node: RadixNode | None) -> list[int]:
        parts: list[list[int]] = []
        while node is not None:
            parts.append(node.pages)
            node = node.parent
        return [page for part in reversed(parts) for page in part]

    def lock(self, node: RadixNode | None) -> None:
        while node is not None and not node.is_root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
                self.protected_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode | None) -> None:
        while node is not None and not node.is_root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix node unlocked more often than locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.protected_pages -= len(node.pages)
                self.evictable_pages += len(node.pages)
            node = node.parent

    def evict(self, num_pages: int) -> list[int]:
        tie = itertools.count()
        heap = [(n.last_access, next(tie), n) for n in self._evictable_leaves()]
        heapq.heapify(heap)
        freed: list[int] = []
        while len(freed) < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = self._remove_leaf(leaf)
            freed.extend(leaf.pages)
            if _is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        return freed

    def _evictable_leaves(self) -> list[RadixNode]:
        return [node for node in self.nodes() if _is_evictable_leaf(node)]

    def _remove_leaf(self, leaf: RadixNode) -> RadixNode:
        """Cut an unlocked leaf (its pages are the caller's now); returns its parent."""
        parent = leaf.parent
        assert parent is not None
        del parent.children[self._edge(leaf.key, 0)]
        self.evictable_pages -= len(leaf.pages)
        return parent

    def nodes(self) -> Iterator[RadixNode]:
        """Every node but the root."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def all_pages(self) -> list[int]:
        return [page for node in self.nodes() for page in node.pages]


def _is_evictable_leaf(node: RadixNode) -> bool:
    """An unlocked node without children, other than the root: eviction may remove it."""
    return not node.is_root and not node.children and node.lock_ref == 0
