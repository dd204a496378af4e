"""The KV page pool's bookkeeping on the host: which pages are free, how many sequences hold each, and
the prefix cache. No device calls: the scheduler puts held pages in its page table.

A page is free, held (reference count > 0: in some sequence's table), or idle: unheld but cached, its
contents a known prefix kept for reuse until it is evicted, least recently used first, when a page is
needed and none is free.

The prefix cache keys a full page of a prompt by (the id of the cached page before it, its tokens), so a
key stands for every token from the start to the page's end and a lookup walks a prompt page by page.
Keys are compared whole (a dict of tuples), so two prompts share a page only if they share every token up
to its end. A cached page may also keep, for echo, each position's (logprob, top tokens) of the tokens it
holds: the rows predicting them, computed when it was filled.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools


@dataclasses.dataclass(eq=False)
class CachedPage:
    page: int
    key: tuple
    id: int
    rows: list | None = None  # echo rows predicting this page's tokens (see Fill), when a scored prefill filled it


class PagePool:
    def __init__(self, pages: int, page_size: int, caching: bool = True):
        self.pages, self.page_size, self.caching = pages, page_size, caching
        self._free = collections.deque(range(pages))
        self._refs = [0] * pages
        self._by_key: dict[tuple, CachedPage] = {}
        self._by_page: dict[int, CachedPage] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self._ids = itertools.count()
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found cached
        self.evictions = 0

    @property
    def available(self) -> int:
        """Pages that can be handed out now: free, or idle and evictable."""
        return len(self._free) + len(self._idle)

    @property
    def held(self) -> int:
        return self.pages - self.available

    @property
    def cached(self) -> int:
        return len(self._by_page)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self) -> int | None:
        """A page for one holder (a reference count of 1), evicting the least recently used idle page if
        none is free; None when every page is held."""
        if self._free:
            page = self._free.popleft()
        elif self._idle:
            page, _ = self._idle.popitem(last=False)
            entry = self._by_page.pop(page)
            del self._by_key[entry.key]
            self.evictions += 1
        else:
            return None
        self._refs[page] = 1
        return page

    def hold(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._idle[page]
        self._refs[page] += 1

    def drop(self, page: int) -> None:
        self._refs[page] -= 1
        assert self._refs[page] >= 0, f"page {page} dropped more often than held"
        if self._refs[page] == 0:
            if page in self._by_page:
                self._idle[page] = None  # most recently used last
            else:
                self._free.append(page)

    def lookup(self, tokens, rows: bool = False, root: int = -1) -> list[CachedPage]:
        """The cached pages holding the longest run of `tokens`' full pages from the start (with `rows`:
        only pages that kept their echo rows) under key root `root` (see `publish`). Counted in
        queried/hit tokens; holds nothing."""
        found: list[CachedPage] = []
        if not self.caching:
            return found
        S = self.page_size
        for i in range(len(tokens) // S):
            entry = self._by_key.get((found[-1].id if found else root, tuple(tokens[i * S : (i + 1) * S])))
            if entry is None or (rows and entry.rows is None):
                break
            found.append(entry)
        return found

    def count_query(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def publish(self, before: CachedPage | None, tokens, page: int, root: int = -1) -> CachedPage | None:
        """Cache full page `page` holding `tokens` after the prefix `before` (None: the first page, whose key
        hangs off `root`: -1, or a negative id of what else the contents depend on, a LoRA adapter). If
        that prefix is cached already (another sequence filled it meanwhile), that entry is returned and
        `page` stays private. None when caching is off."""
        if not self.caching:
            return None
        key = (before.id if before else root, tuple(tokens))
        entry = self._by_key.get(key)
        if entry is None and page not in self._by_page:
            entry = CachedPage(page, key, next(self._ids))
            self._by_key[key] = self._by_page[page] = entry
        return entry
