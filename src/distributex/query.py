"""The query string of a request, read strictly (a 400 ``INVALID`` otherwise).

Every ``%`` is followed by two hex digits, the decoded bytes are UTF-8, ``+``
is a space, no parameter is given twice, a name is printable and at most
:data:`~distributex.limits.MAX_NAME` characters, and a number is plain ASCII
decimal from 0 to :data:`~distributex.limits.MAX_SECONDS` seconds.
"""

from __future__ import annotations

import math
import re
import unicodedata
from urllib.parse import unquote, unquote_to_bytes

from aiohttp import web

from distributex.call import Call
from distributex.engine import MODES
from distributex.limits import MAX_NAME, MAX_SECONDS
from distributex.refusal import Refused

# A lock verb's call, or an aiohttp request (``/status?pool=``).
Asked = Call | web.Request
_QUERY_KEY = "distributex.query"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# ASCII only: float() also takes "1_0" and other scripts' digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _unquote(raw: str, what: str) -> str:
    # yarl turns bad escapes and bad UTF-8 into U+FFFD, which would make
    # different names one; refuse them instead.
    if _BAD_PERCENT.search(raw):
        raise Refused(400, f"{what} has a '%' not followed by two hex digits")
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, f"{what} is not UTF-8 once percent-decoded") from None


def parse_query(raw: str) -> dict[str, list[str]]:
    """Strictly decode a raw query string (``a=1&b=%41``) as urllib would, ``+`` a space.

    Raises :class:`Refused` for a bad percent escape or bytes that are not UTF-8.
    """
    params: dict[str, list[str]] = {}
    if "%" not in raw and "+" not in raw:  # nothing to decode (a client's usual query)
        for field in raw.split("&"):
            if field:
                key, _, value = field.partition("=")
                params.setdefault(key, []).append(value)
        return params
    for field in raw.split("&"):
        if not field:
            continue
        raw_key, _, raw_value = field.partition("=")
        # Reasons name the key as sent: decoded, it could put CR LF in a header.
        key = _unquote(raw_key, f"parameter name '{raw_key}'")
        params.setdefault(key, []).append(_unquote(raw_value, f"parameter '{raw_key}'"))
    return params


def lenient(raw: str, key: str) -> str | None:
    """The first ``key=`` of a raw query read as well as it can be, bad escapes
    replaced (for the audit line of a request refused before it was read)."""
    for field in raw.split("&"):
        name, _, value = field.partition("=")
        if name == key:
            return unquote(value.replace("+", " "), errors="replace")
    return None


def _raw_query(request: Asked) -> str:
    if isinstance(request, Call):
        return request.raw_query
    return request.rel_url.raw_query_string


def param(request: Asked, key: str) -> str | None:
    query = request.get(_QUERY_KEY)
    if query is None:
        query = request[_QUERY_KEY] = parse_query(_raw_query(request))
    values = query.get(key, [])
    if len(values) > 1:
        raise Refused(400, f"parameter '{key}' given more than once")
    return values[0] if values else None


def forget(request: Asked) -> None:
    """Drop the decoded query kept on ``request`` (read again if asked again)."""
    request.pop(_QUERY_KEY, None)


def name(request: Asked, key: str) -> str:
    value = param(request, key) or ""
    if not value:
        raise Refused(400, f"missing parameter '{key}'")
    if len(value) > MAX_NAME:
        raise Refused(400, f"parameter '{key}' is longer than {MAX_NAME} characters")
    if not value.isprintable():
        if any(unicodedata.category(char) == "Cc" for char in value):
            raise Refused(400, f"parameter '{key}' has control characters")
        bad = next(char for char in value if not char.isprintable())
        raise Refused(
            400, f"parameter '{key}' has a character that is not printable (U+{ord(bad):04X})"
        )
    return value


def seconds(request: Asked, key: str) -> float | None:
    raw = param(request, key)
    if raw is None:
        return None
    if raw == "":
        raise Refused(400, f"parameter '{key}' is empty: give a number of seconds or leave it out")
    if not _NUMBER.fullmatch(raw):
        raise Refused(400, f"parameter '{key}' must be a number of seconds")
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise Refused(400, f"parameter '{key}' must be a finite number >= 0")
    if value > MAX_SECONDS:
        raise Refused(400, f"parameter '{key}' must be at most {MAX_SECONDS:.0f} seconds")
    return value


def ttl(request: Asked) -> float | None:
    ttl = seconds(request, "ttl")
    if ttl == 0:
        raise Refused(400, "parameter 'ttl' must be > 0 (leave it out for the pool's expire)")
    return ttl


def mode(request: Asked) -> str | None:
    """The ``mode=`` asked (None: not given, the default mode)."""
    value = param(request, "mode")
    if value is not None and value not in MODES:
        raise Refused(400, "parameter 'mode' must be 'shared' or 'exclusive'")
    return value


def token(request: Asked, required: bool) -> str | None:
    token = param(request, "lease")
    if token is None:
        if required:
            raise Refused(400, "missing parameter 'lease'")
        return None
    # An empty token once released every lease of the host: refuse it.
    if not token:
        raise Refused(400, "parameter 'lease' is empty: give a lease token or leave it out")
    if len(token) > MAX_NAME:
        raise Refused(400, "parameter 'lease' is too long")
    return token
