"""Random tokens (lease tokens, waiter ids): ``secrets.token_urlsafe``, read in blocks.

Every grant makes one or two tokens; ``secrets`` asks the kernel for each
(one ``getrandom`` call, a few percent of a hand-off). Here the same kernel
randomness is read 4 KiB at a time and handed out in slices: each byte is
used once. A child process made by ``fork`` starts with an empty block, so
it never repeats its parent's tokens.
"""

from __future__ import annotations

import base64
import os

_BLOCK = 4096
_pool = b""
_at = 0


def token_urlsafe(nbytes: int) -> str:
    """``nbytes`` random bytes as URL-safe base64 without padding."""
    global _pool, _at
    end = _at + nbytes
    if end > len(_pool):
        _pool, _at, end = os.urandom(max(_BLOCK, nbytes)), 0, nbytes
    chunk = _pool[_at:end]
    _at = end
    return base64.urlsafe_b64encode(chunk).rstrip(b"=").decode("ascii")


def _forget() -> None:
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_forget)
