"""Running per-module LoRA work side by side on threads (compress, combine)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch


def map_modules(func, items, workers: int | None = None):
    """``map(func, items)`` in order, on ``workers`` threads (default ``torch.get_num_threads()``)
    with one torch thread each.

    Per module the work is a few matrix products and small r × r factorisations: running
    modules side by side on single-threaded torch uses the cores far better than splitting each
    small product over threads (and avoids OpenMP's spin-waits when the machine is busy). Every
    module computes on one torch thread whatever ``workers`` is, so the result does not depend
    on it.
    """
    threads = torch.get_num_threads()
    workers = threads if workers is None else workers
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
    try:
        if pool is None:
            yield from map(func, items)
            return
        todo = iter(items)
        ahead = deque(pool.submit(func, item) for _, item in zip(range(2 * workers), todo))  # bounded: memory
        while ahead:
            result = ahead.popleft().result()
            for item in todo:
                ahead.append(pool.submit(func, item))
                break
            yield result
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
