"""The parser of every client command: options in full, and no secret in a usage error.

argparse takes any unambiguous prefix of an option (``--tok FILE`` for
``--token-file``), so a mistyped ``--token SECRET`` became a token *file*
named after the secret, and the error line showed it. Its usage errors also
repeat the words they could not use (``unrecognized arguments: --token
s3cr3t``), and such lines end up in cron mail and logs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# An option we do not know whose name says it carries a secret (--token, --tok, --password).
SECRET_OPTION = re.compile(r"tok|secret|passw", re.IGNORECASE)
REDACTED = "<redacted>"


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` without abbreviations (also for its
    subcommands: they are made of this class) whose errors never show the value
    given to an unknown option named like a secret."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.secrets: list[str] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        self.secrets = self._secrets_in(words)
        return super().parse_known_args(words, namespace)

    def _secrets_in(self, words: list[str]) -> list[str]:
        """Values of unknown secret-like options: ``--token VALUE`` and ``--token=VALUE``."""
        found = []
        for i, word in enumerate(words):
            name, equals, value = word.partition("=")
            if not name.startswith("-") or name in self._option_string_actions:
                continue
            if not SECRET_OPTION.search(name):
                continue
            if equals:
                found.append(value)
            elif i + 1 < len(words):
                found.append(words[i + 1])
        return [secret for secret in found if secret]

    def error(self, message: str) -> NoReturn:
        for secret in self.secrets:
            # The value as a word of its own (or after '='), not inside other words.
            message = message.replace(repr(secret), repr(REDACTED))
            message = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", REDACTED, message)
        super().error(message)
