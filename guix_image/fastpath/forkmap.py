"""`forked_map`: a function over a list, in forked processes, for work that holds the GIL.

The readers parse tar headers in Python, which holds the GIL: threads would
take turns. Forked workers inherit the function and its inputs (nothing is
pickled on the way there), so only the results travel back.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from .blocks import require_only_thread

T = TypeVar("T")
R = TypeVar("R")

# What the workers inherit: the function and its inputs, for one call at a time.
_WORK: list[tuple[Callable[[Any], Any], Sequence[Any]]] = []


def forked_map(function: Callable[[T], R], items: Sequence[T], processes: int = 2) -> list[R]:
    """`[function(item) for item in items]`, computed by `processes` forked workers.

    The results are pickled back: make them cheap to pickle (columns, not a
    list of objects). Forking follows the rule in __init__.py.
    """
    require_only_thread()
    _WORK[:] = [(function, items)]
    try:
        # With "fork", the pool forks its workers before it starts its own thread.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            return list(pool.map(_call, range(len(items))))
    finally:
        _WORK.clear()


def _call(index: int) -> Any:
    function, items = _WORK[0]
    return function(items[index])
