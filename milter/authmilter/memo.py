"""Bounded memos for pure functions of what senders send (DKIM tags, From fields).

A sender's values recur from one message to the next, so what is derived from them alone is worth
keeping. What is kept must stay bounded whatever a hostile sender writes: entries are counted
(``size``), and arguments larger than any legitimate value (``limit``, as ``measure`` reckons them)
are computed each time and never kept. Results are shared by every caller, so they must be
immutable; exceptions are never kept (``functools.lru_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, wraps
from typing import ParamSpec, TypeVar, cast

P = ParamSpec("P")
T = TypeVar("T")


def remembered_when_small(
    size: int, limit: int, measure: Callable[..., int]
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Keep a pure function's results for its last ``size`` arguments of ``measure`` ≤ ``limit``.

    Args:
        size: the most results kept.
        limit: the largest arguments kept, in the units of ``measure``.
        measure: how large the arguments are, given them as the function is.
    """

    def remember(function: Callable[P, T]) -> Callable[P, T]:
        # The arguments of a remembered function must be hashable (lru_cache); its callers' are.
        remembered = cast(Callable[P, T], lru_cache(maxsize=size)(function))

        @wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            if measure(*args, **kwargs) > limit:
                return function(*args, **kwargs)
            return remembered(*args, **kwargs)

        return call

    return remember


def octets(*values: bytes | None) -> int:
    """The length of ``values`` in all (None counts 0): a ``measure`` for bytes arguments."""
    return sum(map(len, filter(None, values)))  # measured on every call: no generator frame
