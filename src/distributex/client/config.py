"""The client's configuration file and environment: where every command reads its defaults.

A value comes from the option, else ``DISTRIBUTEX_<NAME>``, else the config
file(s) (``$DISTRIBUTEX_CONFIG`` if set, empty for none; else
/etc/distributex/client.conf then ~/.config/distributex/client.conf, later
wins), else the built-in default. Errors are one line naming the file and
line or the variable, and never show a token.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from distributex.client.core import MAX_SECONDS, check_token

SYSTEM_CONFIG = "/etc/distributex/client.conf"
CONFIG_KEYS = (
    "server",
    "port",
    "host_id",
    "ttl",
    "grace",
    "lock_dir",
    "http_timeout",
    "cacert",
    "cert",
    "key",
    "token_file",
)

Values = dict[str, tuple[str, str]]


class ConfigProblem(Exception):
    """A bad configuration file or environment variable."""


def config_files(env: dict[str, str]) -> list[Path]:
    if "DISTRIBUTEX_CONFIG" in env:
        chosen = env["DISTRIBUTEX_CONFIG"]
        return [Path(chosen)] if chosen else []
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path(SYSTEM_CONFIG), Path(xdg) / "distributex" / "client.conf"]


def read_config(paths: list[Path], required: bool) -> Values:
    """key -> (value, where) from ``key = value`` files; later files win."""
    values: Values = {}
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            if required:
                raise ConfigProblem(f"{path}: no such config file (DISTRIBUTEX_CONFIG)") from None
            continue
        except OSError as exc:
            raise ConfigProblem(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigProblem(f"{path}: not UTF-8 text (byte {exc.start})") from None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not sep:
                raise ConfigProblem(f"{path}:{number}: expected 'key = value', got {raw.strip()!r}")
            if key not in CONFIG_KEYS:
                raise ConfigProblem(
                    f"{path}:{number}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})"
                )
            values[key] = (value.strip().strip("\"'"), f"{path}:{number}")
    return values


def load(env: dict[str, str]) -> Values:
    """The config files' values for this environment."""
    return read_config(config_files(env), required=bool(env.get("DISTRIBUTEX_CONFIG")))


# -- converters of option, environment and file text ---------------------------------------


def seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds >= 0")
    if value > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS:.0f} seconds (about 3 years)")
    return value


def encodable(text: str) -> bool:
    """Valid text (command-line bytes that are not UTF-8 come as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(value: str) -> str:
    if not encodable(value):
        raise ValueError("not valid UTF-8 text")
    return value


def port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError("must be a port number 1-65535")
    return number


def positive(value: str) -> float:
    number = seconds(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def arg(convert: Callable[[str], object]) -> Callable[[str], object]:
    """``convert`` as an argparse ``type``: a ValueError becomes a usage error."""

    def checked(value: str) -> object:
        try:
            return convert(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None

    checked.__name__ = convert.__name__.strip("_")
    return checked


def pick(
    name: str,
    given: object,
    env: dict[str, str],
    config: Values,
    convert: Callable[[str], object],
    builtin: object,
) -> object:
    """Option value, else DISTRIBUTEX_<NAME>, else the config file, else the built-in."""
    if given is not None:
        return given
    var = f"DISTRIBUTEX_{name.upper()}"
    if env.get(var):
        try:
            return convert(env[var])
        except ValueError as exc:
            raise ConfigProblem(f"environment {var}={env[var]!r}: {exc}") from None
    if name in config:
        value, where = config[name]
        if value == "":
            return builtin
        try:
            return convert(value)
        except ValueError as exc:
            raise ConfigProblem(f"{where}: {name} = {value!r}: {exc}") from None
    return builtin


def read_token(
    token_file: str | None, env: dict[str, str], config: Values
) -> tuple[str | None, str]:
    """(the bearer token, where it came from): --token-file, else $DISTRIBUTEX_TOKEN,
    else $DISTRIBUTEX_TOKEN_FILE, else the config's token_file. Errors never show the token."""
    if token_file is None and env.get("DISTRIBUTEX_TOKEN"):
        try:
            return check_token(env["DISTRIBUTEX_TOKEN"]), "environment DISTRIBUTEX_TOKEN"
        except ValueError as exc:
            raise ConfigProblem(f"environment DISTRIBUTEX_TOKEN: {exc}") from None
    path = token_file or env.get("DISTRIBUTEX_TOKEN_FILE")
    where = "--token-file" if token_file else "environment DISTRIBUTEX_TOKEN_FILE"
    if not path and "token_file" in config and config["token_file"][0]:
        path, where = config["token_file"][0], config["token_file"][1] + ": token_file"
    if not path:
        return None, ""
    try:
        with open(path, "rb") as file:
            first = file.read(4096).split(b"\n", 1)[0]
        return check_token(first.decode("ascii")), f"{where} {path}"
    except OSError as exc:
        raise ConfigProblem(f"{where} {path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        why = (
            exc
            if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError)
            else ("the token must be printable ASCII without spaces")
        )
        raise ConfigProblem(f"{where} {path}: {why}") from None
