"""The KV manager: each slot's pages, per sequence, over the page pool (`pages.PagePool`, which speaks per
page). As vLLM's kv_cache_manager over its block_pool: a sequence is opened with its cached prefix, grows a
page at a time, shares its prompt's pages with the other choices of its request, publishes its full pages
to the prefix cache and is freed. No device calls: the page table it keeps goes out with every plan.

A request is admitted when its prompt's pages are available; its prefill shares the longest run of cached
full pages of the same tokens and computes the rest; the choices of n / best_of share the prompt's pages,
each with its own copy of the partial last one; before each step every decoding sequence gets the page its
step writes into.
"""

from __future__ import annotations

import numpy as np

from jaxserve.engine.pages import CachedPage, PagePool


class KVManager:
    def __init__(self, slots: int, pages: int, page_size: int, pages_per_seq: int, caching: bool = True):
        self.pool = PagePool(pages, page_size, caching)
        self.page_size, self.pages_per_seq = page_size, pages_per_seq
        self.table = np.full((slots, pages_per_seq), pages, np.int32)  # each slot's pages; `pages`: none
        self._held: list[list[int]] = [[] for _ in range(slots)]  # the same, as lists

    def pages_for(self, tokens: int) -> int:
        return self.pool.pages_for(tokens)

    @property
    def available(self) -> int:
        return self.pool.available

    def stats(self) -> dict:
        """The pool's counters, by their names in EngineStats."""
        p = self.pool
        return {
            "kv_pages": p.pages,
            "kv_pages_held": p.held,
            "kv_pages_cached": p.cached,
            "kv_evictions": p.evictions,
            "prefix_queried_tokens": p.queried_tokens,
            "prefix_hit_tokens": p.hit_tokens,
        }

    def pages(self, slot: int) -> list[int]:
        return self._held[slot]

    def _set(self, slot: int, pages: list[int]) -> None:
        self._held[slot] = pages
        self.table[slot] = self.pool.pages
        self.table[slot, : len(pages)] = pages

    def open(self, slot: int, tokens: list[int], rows: bool, root: int = -1) -> list[CachedPage]:
        """Give `slot` pages for `tokens`: the longest cached run of their full pages under key root `root`
        (see PagePool.publish; with `rows`: only pages that kept their echo rows), held, then fresh ones.
        Returns the cached run. The caller counted that enough pages are available."""
        hits = self.pool.lookup(tokens, rows=rows, root=root)
        self.pool.count_query(len(tokens), len(hits) * self.page_size)
        for entry in hits:
            self.pool.hold(entry.page)
        pages = [e.page for e in hits]
        for _ in range(self.pages_for(len(tokens)) - len(hits)):
            page = self.pool.allocate()
            assert page is not None, "admission counted the pages"
            pages.append(page)
        self._set(slot, pages)
        return hits

    def share(self, src: int, dst: int, tokens: int) -> tuple[int, int] | None:
        """`dst` takes `src`'s first `tokens` positions: their full pages held by both, and its own copy of
        the partial last one. Returns that copy as (src page, dst page) for the device, or None."""
        full = self._held[src][: tokens // self.page_size]
        for page in full:
            self.pool.hold(page)
        copy = None
        if tokens % self.page_size:
            page = self.pool.allocate()
            assert page is not None, "admission counted the copies"
            copy = (self._held[src][len(full)], page)
        self._set(dst, full + ([copy[1]] if copy else []))
        return copy

    def grow(self, slot: int, position: int) -> bool:
        """Make sure `slot` has the page that `position` goes into; False when no page is available."""
        held = self._held[slot]
        while len(held) <= position // self.page_size < self.pages_per_seq:
            page = self.pool.allocate()
            if page is None:
                return False
            self.table[slot, len(held)] = page
            held.append(page)
        return True

    def publish(self, slot: int, index: int, before: CachedPage | None, tokens, root: int = -1) -> CachedPage | None:
        """Cache `slot`'s full page `index` (holding `tokens`, after the cached page `before`, or the first
        under key root `root`)."""
        return self.pool.publish(before, tokens, self._held[slot][index], root)

    def free(self, slot: int) -> None:
        for page in self._held[slot]:
            self.pool.drop(page)
        self._set(slot, [])
