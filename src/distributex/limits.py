"""Every limit on a request, in one place (docs/configuration.md#limits).

* the request line and each header line: ``max_header_size`` bytes, at most
  ``max_headers`` headers (aiohttp's parser answers 400 or 431);
* a body: a ``Content-Length`` is required (411) and at most
  ``max_body_size`` bytes (413); bodies are never read;
* a name (``host``, ``pool``) or a lease token: :data:`MAX_NAME` characters;
* a number of seconds (``timeout``, ``ttl``): at most :data:`MAX_SECONDS`,
  the same bound the configuration file has.
"""

from __future__ import annotations

from typing import Any

from distributex.config import MAX_NAME_LENGTH, Config
from distributex.config import MAX_SECONDS as MAX_SECONDS
from distributex.refusal import Refused

MAX_NAME = MAX_NAME_LENGTH


def parser_limits(config: Config) -> dict[str, Any]:
    """The request-head limits, as aiohttp's server takes them."""
    return {
        "max_line_size": config.max_header_size,
        "max_field_size": config.max_header_size,
        "max_headers": config.max_headers,
    }


def check_body(length: int | None, config: Config) -> None:
    """:class:`Refused` (411, 413) for a body without a length or longer than allowed.

    ``length`` is the body's ``Content-Length``: 0 for none, None for a body
    of unknown length (chunked).
    """
    if length == 0:
        return
    if length is None:
        raise Refused(411, "a request body needs a Content-Length (bodies are not used)")
    if length > config.max_body_size:
        raise Refused(
            413,
            f"request body of {length} bytes is larger than {config.max_body_size} "
            "(max_body_size; bodies are not used)",
        )
