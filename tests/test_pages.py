"""The page pool's bookkeeping: allocation and freeing, reference counts, the prefix cache and its LRU eviction."""

from jaxserve.engine.pages import PagePool


def fill(pool: PagePool, tokens: list[int]) -> list[int]:
    """Allocate pages for `tokens` and publish the full ones, as a finished prefill does."""
    pages = [pool.allocate() for _ in range(pool.pages_for(len(tokens)))]
    before = None
    for i in range(len(tokens) // pool.page_size):
        before = pool.publish(before, tokens[i * pool.page_size : (i + 1) * pool.page_size], pages[i])
    return pages


def test_pages_are_handed_out_until_none_is_left_and_come_back_when_dropped():
    pool = PagePool(3, 4)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [0, 1, 2] and pool.allocate() is None
    assert (pool.available, pool.held) == (0, 3)
    pool.hold(pages[0])  # a second holder
    pool.drop(pages[0])
    assert pool.available == 0  # still held once
    pool.drop(pages[0])
    assert pool.available == 1 and pool.allocate() == pages[0]


def test_lookup_finds_the_longest_run_of_full_pages_of_the_same_tokens():
    pool = PagePool(8, 4)
    tokens = list(range(10))  # two full pages and a partial one
    pages = fill(pool, tokens)
    assert [e.page for e in pool.lookup(tokens)] == pages[:2]
    assert [e.page for e in pool.lookup(tokens[:8] + [99])] == pages[:2]
    assert [e.page for e in pool.lookup(tokens[:4] + [99] * 6)] == pages[:1]  # diverges in the second page
    assert pool.lookup([99] + tokens[1:]) == []  # a page is keyed by every token before it too
    assert pool.lookup(tokens[:3]) == []  # no full page
    pool.count_query(10, 8)
    assert (pool.queried_tokens, pool.hit_tokens) == (10, 8)


def test_unheld_cached_pages_stay_until_evicted_least_recently_used_first():
    pool = PagePool(4, 2)
    a = fill(pool, [1, 2])
    b = fill(pool, [3, 4])
    for page in a + b:
        pool.drop(page)
    assert pool.available == 4 and pool.cached == 2
    assert [e.page for e in pool.lookup([1, 2])] == a  # still cached while idle
    pool.hold(b[0])  # b is used again: a is now the least recently used
    pool.drop(b[0])
    new = [pool.allocate() for _ in range(3)]  # two free pages, then an eviction
    assert a[0] in new and b[0] not in new
    assert pool.lookup([1, 2]) == [] and pool.lookup([3, 4])  # a evicted, b kept
    assert pool.evictions == 1


def test_a_held_cached_page_is_never_evicted():
    pool = PagePool(2, 2)
    a = fill(pool, [1, 2])  # held
    other = pool.allocate()
    assert pool.allocate() is None
    pool.drop(other)
    assert pool.allocate() == other and pool.lookup([1, 2])[0].page == a[0]


def test_the_same_prefix_published_twice_keeps_the_first_page():
    pool = PagePool(4, 2)
    first = fill(pool, [1, 2])
    second = fill(pool, [1, 2])  # filled concurrently by another sequence
    assert pool.lookup([1, 2])[0].page == first[0] and pool.cached == 1
    pool.drop(second[0])  # the duplicate was never cached: it is simply free again
    assert pool.available == 3


def test_lookup_for_echo_stops_at_pages_without_their_rows():
    pool = PagePool(4, 2)
    fill(pool, [1, 2, 3, 4])
    first, second = pool.lookup([1, 2, 3, 4])
    first.rows = [(-0.5, [])]
    assert pool.lookup([1, 2, 3, 4], rows=True) == [first]


def test_caching_off_caches_nothing():
    pool = PagePool(4, 2, caching=False)
    pages = fill(pool, [1, 2, 3, 4])
    assert pool.lookup([1, 2, 3, 4]) == [] and pool.cached == 0
    for page in pages:
        pool.drop(page)
    assert pool.available == 4
