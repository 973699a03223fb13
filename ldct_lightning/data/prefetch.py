"""Ordered prefetching on a thread pool: the next items are read while the caller works on the current one.

Threads fit here because DICOM reading is file I/O plus numpy and pydicom work that releases the GIL in parts,
and the consumer (a torch forward pass) releases it too; processes would have to pickle every slice back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_prefetch(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 2, ahead: int = 8
) -> Iterator[R]:
    """``map(fn, items)`` with up to ``ahead`` calls running or done ahead of the consumer, in input order.

    At most ``ahead`` results wait in memory, so a long series never sits in memory at once. An exception
    of ``fn`` is raised when its item's turn comes; closing the iterator cancels the calls not started.

    Args:
        fn: the function applied to each item.
        items: the inputs.
        workers: threads (0: no thread, plain ``map``).
        ahead: items submitted ahead of the one being consumed (>= 1).

    Returns:
        An iterator over ``fn(item)`` in the order of ``items``.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    source = iter(items)
    pending: deque[Future[R]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ldct-prefetch")
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            result = pending.popleft().result()
            for item in source:  # top up by one
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
