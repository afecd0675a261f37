"""``wait_until``: poll a condition until it holds or a timeout passes."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, *, poll_s: float = 0.01) -> bool:
    """True as soon as ``cond()`` holds, checked every ``poll_s`` seconds; after ``timeout``
    seconds, ``cond()`` checked once more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()
