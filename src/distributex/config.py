"""The server's configuration: the seed's YAML file of lock pools, validated.

Every key the 0.7 README documents keeps its meaning; a few new ones are
allowed. The file is checked as a whole at start-up and the first problem
comes back as a :class:`ConfigError` whose message is one line naming the
file, the line and column, and what is wrong.

The keys, their defaults and the file's rules are documented in one place,
docs/configuration.md; tests/test_docs.py checks that page against the tables
below (``_TOP_KEYS``, ``_POOL_KEYS``, ``_TLS_KEYS``, ``_TOKEN_KEYS``) and the
defaults of :class:`Config`, so a key added here must be added there.
"""

from __future__ import annotations

import functools
import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from distributex.engine import PoolSpec

DEFAULT_EXPIRE = 1800.0
DEFAULT_PORT = 9889
DEFAULT_BIND = "127.0.0.1"
BACKENDS = ("inmemory", "sqlite", "memcache", "redis", "etcd")
SQLITE_SYNC = ("full", "normal")
UNSAFE_STORE = ("refuse", "warn")

# Bounds on what a file may hold (see the module doc). Seconds stop at 10**9
# so every later sum stays a finite float; the rest are far beyond real use
# but keep a typo from asking for a billion of something.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NAME_LENGTH = 255  # limits.MAX_NAME: longer names in a request are refused
MAX_SECONDS = 10**9
MAX_MAXLOCKS = 1_000_000
# A lock-delay past an hour would keep a pool from everyone long after a crash.
MAX_LOCK_DELAY = 3600
MAX_POOLS = 10_000_000
MAX_CONNECTIONS = 10_000_000
# Store keys are at most 250 bytes; the rest of a key is under 60.
MAX_KEY_PREFIX = 150

_TOP_KEYS = (
    "backend",
    "memcachehost",
    "memcacheport",
    "key_prefix",
    "etcd_endpoints",
    "etcd_cacert",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password",
    "redis_url",
    "sqlite_path",
    "sqlite_sync",
    "unsafe_store",
    "bind",
    "port",
    "start_delay",
    "autocreate",
    "max_pools",
    "max_pools_per_identity",
    "max_connections",
    "header_timeout",
    "idle_timeout",
    "max_connections_per_peer",
    "max_requests_per_identity",
    "max_status_streams",
    "metrics",
    "pools",
    # Authentication, TLS and their limits (docs/security.md).
    "tls",
    "tokens",
    "status_public",
    "audit",
    "max_waiters_per_pool",
    "max_waiters_per_host",
    "max_body_size",
    "max_header_size",
    "max_headers",
)
_POOL_KEYS = ("name", "expire", "maxlocks", "servers", "max_shared", "lock_delay")
_TLS_KEYS = ("cert", "key", "client_ca")
_TOKEN_KEYS = ("identity", "sha256", "pools", "admin")
_SHA256_HEX = frozenset("0123456789abcdef")

_YAML_TAG = "tag:yaml.org,2002:"
_NULL_TAG = _YAML_TAG + "null"
_MERGE_TAG = _YAML_TAG + "merge"
_SEQ_TAG = _YAML_TAG + "seq"
_MAP_TAG = _YAML_TAG + "map"
# Scalars that become Python values; the _TEXT_TAGS ones stay the text written.
_TEXT_TAGS = tuple(_YAML_TAG + name for name in ("timestamp", "value", "merge"))
_SCALAR_TAGS = (
    *(_YAML_TAG + name for name in ("str", "int", "float", "bool", "null")),
    *_TEXT_TAGS,
)


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is one line for the operator."""


@dataclass(frozen=True)
class TLSSettings:
    """``tls:``: the server's certificate and key files, and the client CA for mutual TLS."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True)
class TokenSpec:
    """One entry of ``tokens:``: the SHA-256 (hex) of a bearer token and what it may do.

    ``pools`` None means every pool; ``admin`` may release other hosts' locks.
    """

    identity: str
    sha256: str
    pools: frozenset[str] | None = None
    admin: bool = False


@dataclass(frozen=True)
class Config:
    """A validated configuration."""

    backend: str = "inmemory"
    memcachehost: str = "localhost"
    memcacheport: int = 11211
    key_prefix: str = "distributex/"
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_cacert: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    redis_url: str = "redis://localhost:6379/0"
    sqlite_path: str | None = None
    sqlite_sync: str = "full"
    unsafe_store: str = "refuse"
    bind: str | None = None  # None: the entry point's default
    port: int = DEFAULT_PORT
    start_delay: float = 0.0
    autocreate: bool = True
    # Limits (docs/configuration.md#limits): pools made on first use that may
    # hold state at once; open connections (0: from the fd limit); seconds a
    # connection may take to send a request head; seconds a kept-alive
    # connection may sit idle between requests.
    max_pools: int = 10000
    max_pools_per_identity: int = 0  # 0: a tenth of max_pools, >= 100 (limits.py)
    max_connections: int = 0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    # No one client starves the others (distributex.fairness); 0: half the cap.
    max_connections_per_peer: int = 0
    max_requests_per_identity: int = 0
    max_status_streams: int = 100
    metrics: bool = True  # GET /metrics and the counting behind it
    pools: dict[str, PoolSpec] = field(default_factory=dict)
    source: str | None = None
    # Authentication and TLS (off unless configured; see distributex.auth).
    tls: TLSSettings | None = None
    tokens: tuple[TokenSpec, ...] = ()
    status_public: bool = False  # /status, /metrics and / without credentials
    audit: bool | None = None  # None: on when authentication is on
    # Limits against exhaustion (docs/configuration.md#limits).
    max_waiters_per_pool: int = 10000
    max_waiters_per_host: int = 100
    max_body_size: int = 4096
    max_header_size: int = 8190
    max_headers: int = 64

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must prove an identity (bearer tokens or client certificates)."""
        return bool(self.tokens) or (self.tls is not None and self.tls.client_ca is not None)

    def pool(self, name: str) -> PoolSpec | None:
        """The pool called ``name``, made on first use if ``autocreate``; else None."""
        spec = self.pools.get(name)
        if spec is None and self.autocreate:
            spec = _made_on_first_use(name)
        return spec


@functools.lru_cache(maxsize=4096)
def _made_on_first_use(name: str) -> PoolSpec:
    """A pool made on first use: one spec per name while it is in use, not one per request."""
    return PoolSpec(name=name, expire=DEFAULT_EXPIRE)


def default_config() -> Config:
    """The built-in configuration used when no file is given."""
    return Config()


def load_config(path: str | Path) -> Config:
    """Read and check a configuration file; raises :class:`ConfigError`."""
    name = str(path)
    if not name.isprintable():
        name = repr(name)  # the error stays one line whatever the path holds
    try:
        data = _read_capped(path, name)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return parse_config(text, name)


def _read_capped(path: str | Path, name: str) -> bytes:
    """At most MAX_CONFIG_BYTES of the file, or a ConfigError saying why not."""
    # Non-blocking open: a FIFO nobody writes to would otherwise hang for ever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{name}: is a directory, not a configuration file")
        # Blocking reads from here: a pipe's writer may still be writing.
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:  # read one byte past the cap to know
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name}: larger than 1 MiB; is this the configuration file?")
    if size == 0 and stat.S_ISFIFO(mode):
        raise ConfigError(f"{name}: a FIFO and nothing was written to it")
    return b"".join(chunks)


class _TooDeep(yaml.MarkedYAMLError):
    """Raised by _Loader when collections nest deeper than MAX_DEPTH."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops at MAX_DEPTH: its composer recurses once per level."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_config(text: str, source: str = "<config>") -> Config:
    """Check configuration text; ``source`` names it in error messages."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _TooDeep as exc:
        raise ConfigError(
            f"{_where(source, exc.problem_mark)}: nested more than {MAX_DEPTH} levels deep"
        ) from None
    except yaml.MarkedYAMLError as exc:
        where = _where(source, exc.problem_mark or exc.context_mark)
        problem = _one_line(str(exc.problem or exc.context))
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        # Not a marked error: only an index into the text.
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ConfigError(
            f"{source}:{line}:{column}: unacceptable character #x{exc.character:04x}: "
            "special characters are not allowed"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML error: {_one_line(str(exc))}") from None
    except RecursionError:  # a backstop: _Loader's depth limit should come first
        raise ConfigError(f"{source}: nested too deeply") from None
    checker = _Checker(source)
    if root is not None:
        checker.check_tags(root)
    return checker.config(root)


def _where(source: str, mark: yaml.Mark | None) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source


def _one_line(text: str, limit: int = 120) -> str:
    """``text`` on one line and at most about ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# Options a redis_url may carry after "?" (redis-py reads them).
REDIS_URL_OPTIONS = (
    "db",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a redis_url (one line, no password in it), or None."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    shown = _show(_without_password(url))
    if scheme == "redis+sentinel":
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return f"{exc}: {shown}"
        return None
    if scheme not in ("redis", "rediss", "unix"):
        return f"must start with redis://, rediss://, unix:// or redis+sentinel://, not {shown}"
    try:
        port = parts.port
    except ValueError:
        return f"has a bad port: {shown}"
    if scheme == "unix":
        if not parts.path:
            return f"must name a socket file (unix:///path/to/redis.sock): {shown}"
    elif not parts.hostname:
        return f"must name a host (redis://host:6379/0): {shown}"
    elif port == 0:
        return f"has a bad port: {shown}"
    db = parts.path.strip("/") if scheme != "unix" else ""
    if db and not (db.isascii() and db.isdigit()):
        return f"must end in a database number (/0), not {shown}"
    for option, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if option not in REDIS_URL_OPTIONS:
            known = ", ".join(REDIS_URL_OPTIONS)
            return f"has an unknown option {option!r} (known: {known})"
        if option == "db" and not (value.isascii() and value.isdigit()):
            return f"must have a database number in db=, not {value!r}"
    if parts.fragment:
        return f"must not have a '#' part: {shown}"
    return None


@dataclass(frozen=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``.

    The user and password are the Redis servers'; ``?sentinel_username=`` and
    ``?sentinel_password=`` are the Sentinels' own, if they need one.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


SENTINEL_URL_OPTIONS = ("sentinel_username", "sentinel_password")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a redis+sentinel:// URL; ValueError (a short phrase) if it is malformed."""
    parts = urllib.parse.urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    sentinels = []
    for item in hostlist.split(","):
        host, port = item, "26379"
        if item.startswith("["):  # [v6 address]:port
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"has a bad Sentinel address {item!r}")
                port = rest[1:]
        elif ":" in item:
            host, port = item.rsplit(":", 1)
        if not host:
            raise ValueError("must name at least one Sentinel host (host:26379,...)")
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"has a bad Sentinel port {port!r}")
        sentinels.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("must name the Sentinel service (/mymaster or /mymaster/0)")
    db = path[1] if len(path) == 2 else "0"
    if not (db.isascii() and db.isdigit()):
        raise ValueError(f"must end in a database number (/mymaster/0), not {db!r}")
    options = {}
    for option, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if option not in SENTINEL_URL_OPTIONS:
            raise ValueError(
                f"has an unknown option {option!r} (known: {', '.join(SENTINEL_URL_OPTIONS)})"
            )
        options[option] = value
    if parts.fragment:
        raise ValueError("must not have a '#' part")
    return SentinelUrl(
        tuple(sentinels),
        urllib.parse.unquote(path[0]),
        int(db),
        username,
        password,
        options.get("sentinel_username"),
        options.get("sentinel_password"),
    )


def _without_password(url: str) -> str:
    """The URL with its passwords as ***, for messages."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostlist = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostlist}"
    query = urllib.parse.urlencode(
        [
            (k, "***" if k == "sentinel_password" else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _show(value: object) -> str:
    """A value for an error message: repr'd (so one line), shortened, nodes named."""
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return "a number that big"  # repr() of a huge int is long and may even refuse
    return _one_line(repr(value), 60)


def _tag_text(tag: str) -> str:
    """``!!int`` for the standard tags, the tag itself for any other."""
    return "!!" + tag.removeprefix(_YAML_TAG) if tag.startswith(_YAML_TAG) else tag


class _Checker:
    """Walks the YAML node tree so every error can say where it is."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._loader = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, problem: str) -> ConfigError:
        if node is None:
            return ConfigError(f"{self.source}: {problem}")
        return ConfigError(f"{_where(self.source, node.start_mark)}: {problem}")

    def check_tags(self, root: yaml.Node) -> None:
        """Refuse tags and merge keys anywhere in the file, before anything is built.

        Each node is visited once, so aliases (even a billion laughs, or an
        alias inside its own anchor) cost no more than the text they are in.
        """
        seen: set[int] = set()
        todo = [root]
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.ScalarNode):
                allowed = _SCALAR_TAGS
            elif isinstance(node, yaml.SequenceNode):
                allowed = (_SEQ_TAG,)
                todo.extend(node.value)
            else:
                allowed = (_MAP_TAG,)
                for key, value in node.value:
                    if key.tag == _MERGE_TAG:
                        raise self.fail(key, "YAML merge keys (<<) are not supported")
                    todo += (key, value)
            if node.tag not in allowed:
                raise self.fail(node, f"unsupported YAML tag {_show(_tag_text(node.tag))}")

    def value(self, node: yaml.Node) -> Any:
        """The Python value of a scalar node, resolved the way SafeLoader would.

        Dates and the odd ``=`` / ``<<`` scalars stay the text written: nothing
        here wants a date, and SafeLoader cannot build the other two.
        """
        if not isinstance(node, yaml.ScalarNode):
            return node
        if node.tag in _TEXT_TAGS:
            return node.value
        try:
            return self._loader.construct_object(node)
        except (ValueError, LookupError, OverflowError, TypeError, yaml.YAMLError):
            # e.g. "!!int abc", or more digits than Python will convert
            raise self.fail(
                node, f"not a valid {_tag_text(node.tag)}: {_show(node.value)}"
            ) from None

    def choice(self, node: yaml.Node, what: str, known: tuple[str, ...]) -> str:
        """One of ``known`` words, or a line naming them."""
        value = self.value(node)
        if value not in known:
            raise self.fail(node, f"unknown {what} {_show(value)} (known: {', '.join(known)})")
        return str(value)

    def name(self, node: yaml.Node, what: str) -> str:
        """The text written for a name: ``010`` is "010", not 8 (see the module doc)."""
        if not isinstance(node, yaml.ScalarNode) or node.value == "":
            shown = _show(node.value if isinstance(node, yaml.ScalarNode) else node)
            raise self.fail(node, f"{what} must be a non-empty string, not {shown}")
        if node.tag == _NULL_TAG and node.style is None:
            raise self.fail(
                node, f"{what} must be a non-empty string, not null (quote it to use it as text)"
            )
        text: str = node.value
        if len(text) > MAX_NAME_LENGTH:
            raise self.fail(node, f"{what} is longer than {MAX_NAME_LENGTH} characters")
        if not text.isprintable():
            # The HTTP API refuses such names, so nothing could ever use them.
            raise self.fail(node, f"{what} {_show(text)} is not printable")
        return text

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.fail(key_node, f"{what}: keys must be names, not {_show(key)}")
            if key not in allowed:
                raise self.fail(
                    key_node, f"{what}: unknown key {_show(key)} (known: {', '.join(allowed)})"
                )
            if key in out:
                raise self.fail(key_node, f"{what}: key {_show(key)} given twice")
            out[key] = (key_node, value_node)
        return out

    def config(self, root: yaml.Node | None) -> Config:
        if root is None:
            raise self.fail(None, "the file is empty (expected at least 'pools:')")
        top = self.mapping(root, "configuration", _TOP_KEYS)
        kwargs: dict[str, Any] = {"source": self.source, "autocreate": False}
        if "backend" in top:
            kwargs["backend"] = self.choice(top["backend"][1], "backend", BACKENDS)
        if "memcachehost" in top:
            node = top["memcachehost"][1]
            if isinstance(node, yaml.SequenceNode) or "," in str(self.value(node) or ""):
                # Keys spread over several servers: the epoch record that detects
                # a lost store would live on one of them only.
                raise self.fail(node, "memcachehost names one memcached server, not a list of them")
            kwargs["memcachehost"] = self.name(node, "memcachehost")
        if "key_prefix" in top:
            node = top["key_prefix"][1]
            prefix = self.name(node, "key_prefix")
            if not prefix.isascii() or " " in prefix or len(prefix) > MAX_KEY_PREFIX:
                raise self.fail(
                    node,
                    f"key_prefix must be at most {MAX_KEY_PREFIX} ASCII characters without "
                    f"spaces, not {_show(prefix)}",
                )
            kwargs["key_prefix"] = prefix
        if "memcacheport" in top:
            kwargs["memcacheport"] = self.port(top["memcacheport"][1], "memcacheport")
        if "redis_url" in top:
            node = top["redis_url"][1]
            url = self.name(node, "redis_url")
            problem = redis_url_problem(url)
            if problem is not None:
                raise self.fail(node, f"redis_url {problem}")
            kwargs["redis_url"] = url
        self.etcd(top, kwargs)
        if "sqlite_path" in top:
            kwargs["sqlite_path"] = self.name(top["sqlite_path"][1], "sqlite_path")
        if "sqlite_sync" in top:
            kwargs["sqlite_sync"] = self.choice(top["sqlite_sync"][1], "sqlite_sync", SQLITE_SYNC)
        if "unsafe_store" in top:
            node = top["unsafe_store"][1]
            kwargs["unsafe_store"] = self.choice(node, "unsafe_store", UNSAFE_STORE)
        if kwargs.get("backend") == "sqlite" and "sqlite_path" not in kwargs:
            raise self.fail(top["backend"][1], "backend sqlite needs sqlite_path: FILE")
        if "bind" in top:
            kwargs["bind"] = self.name(top["bind"][1], "bind")
        if "port" in top:
            kwargs["port"] = self.port(top["port"][1], "port")
        if "start_delay" in top:
            kwargs["start_delay"] = self.number(top["start_delay"][1], "start_delay", minimum=0)
        if "autocreate" in top:
            node = top["autocreate"][1]
            value = self.value(node)
            if not isinstance(value, bool):
                raise self.fail(node, f"autocreate must be true or false, not {_show(value)}")
            kwargs["autocreate"] = value
        if "metrics" in top:
            node = top["metrics"][1]
            value = self.value(node)
            if not isinstance(value, bool):
                raise self.fail(node, f"metrics must be true or false, not {_show(value)}")
            kwargs["metrics"] = value
        if "max_pools" in top:
            kwargs["max_pools"] = self.whole(top["max_pools"][1], "max_pools", 1, MAX_POOLS)
        if "max_pools_per_identity" in top:
            node = top["max_pools_per_identity"][1]
            kwargs["max_pools_per_identity"] = self.whole(
                node, "max_pools_per_identity", 0, MAX_POOLS
            )
        if "max_connections" in top:
            node = top["max_connections"][1]
            kwargs["max_connections"] = self.whole(node, "max_connections", 0, MAX_CONNECTIONS)
        for key, low in (
            ("max_connections_per_peer", 0),
            ("max_requests_per_identity", 0),
            ("max_status_streams", 1),
        ):
            if key in top:
                kwargs[key] = self.whole(top[key][1], key, low, MAX_CONNECTIONS)
        for key in ("header_timeout", "idle_timeout"):
            if key in top:
                kwargs[key] = self.number(top[key][1], key, minimum=0, above=True)
        self.security(top, kwargs)
        pools: dict[str, PoolSpec] = {}
        if "pools" in top:
            node = top["pools"][1]
            if isinstance(node, yaml.ScalarNode) and self.value(node) is None:
                pass  # "pools:" with nothing under it
            elif not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, "pools must be a list (each item starting with '- name:')")
            else:
                for item in node.value:
                    spec = self.pool(item)
                    if spec.name in pools:
                        raise self.fail(item, f"pool '{spec.name}' is defined twice")
                    pools[spec.name] = spec
        kwargs["pools"] = pools
        if "tokens" in top:
            self.check_token_pools(top["tokens"][1], kwargs["tokens"], pools, kwargs["autocreate"])
        return Config(**kwargs)

    # -- authentication, TLS and request limits -----------------------------------------

    def security(self, top: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """The keys of ``tls``, ``tokens`` and the request limits."""
        if "tls" in top:
            kwargs["tls"] = self.tls(top["tls"][1])
        if "tokens" in top:
            kwargs["tokens"] = self.tokens(top["tokens"][1])
        for key in ("status_public", "audit"):
            if key in top:
                node = top[key][1]
                value = self.value(node)
                if not isinstance(value, bool):
                    raise self.fail(node, f"{key} must be true or false, not {_show(value)}")
                kwargs[key] = value
        for key, low in (
            ("max_waiters_per_pool", 1),
            ("max_waiters_per_host", 1),
            ("max_body_size", 0),
            ("max_header_size", 256),
            ("max_headers", 8),
        ):
            if key in top:
                kwargs[key] = self.whole(top[key][1], key, low, MAX_CONNECTIONS)

    def tls(self, node: yaml.Node) -> TLSSettings:
        keys = self.mapping(node, "tls", _TLS_KEYS)
        for key in ("cert", "key"):
            if key not in keys:
                raise self.fail(node, f"tls needs {key}: FILE")
        files = {key: self.name(value, f"tls {key}") for key, (_k, value) in keys.items()}
        return TLSSettings(files["cert"], files["key"], files.get("client_ca"))

    def tokens(self, node: yaml.Node) -> tuple[TokenSpec, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, "tokens must be a list (each item starting with '- identity:')")
        specs: dict[str, TokenSpec] = {}
        for item in node.value:
            keys = self.mapping(item, "token", _TOKEN_KEYS)
            for key in ("identity", "sha256"):
                if key not in keys:
                    raise self.fail(item, f"token without {key}")
            identity = self.name(keys["identity"][1], "token identity")
            digest_node = keys["sha256"][1]
            digest = str(self.value(digest_node)).lower()
            if len(digest) != 64 or not _SHA256_HEX.issuperset(digest):
                # Never echo the value: it may be the token itself pasted by mistake.
                raise self.fail(
                    digest_node,
                    f"token of '{identity}': sha256 must be the 64 hex digits of the token's "
                    "SHA-256 (printf %s TOKEN | sha256sum), never the token itself",
                )
            if digest in specs:
                raise self.fail(digest_node, f"token of '{identity}': the same sha256 twice")
            pools = None
            if "pools" in keys:
                pools_node = keys["pools"][1]
                pools = self.servers(pools_node, f"token of '{identity}'", "pools")
                if pools is None:
                    raise self.fail(pools_node, f"token of '{identity}': pools is empty")
            admin = False
            if "admin" in keys:
                admin_node = keys["admin"][1]
                admin = self.value(admin_node)
                if not isinstance(admin, bool):
                    raise self.fail(admin_node, f"admin must be true or false, not {_show(admin)}")
            specs[digest] = TokenSpec(identity, digest, pools, admin)
        return tuple(specs.values())

    def check_token_pools(
        self,
        node: yaml.Node,
        tokens: tuple[TokenSpec, ...],
        pools: dict[str, PoolSpec],
        autocreate: bool,
    ) -> None:
        """A token's pools must exist (unless pools are made on first use)."""
        if autocreate:
            return
        for item, spec in zip(node.value, tokens, strict=False):
            for name in sorted(spec.pools or ()):
                if name not in pools:
                    raise self.fail(item, f"token of '{spec.identity}': unknown pool '{name}'")

    def etcd(self, top: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """The etcd backend's keys: endpoints as ``scheme://host:port``, TLS files, auth."""
        if "etcd_endpoints" in top:
            node = top["etcd_endpoints"][1]
            items = node.value if isinstance(node, yaml.SequenceNode) else [node]
            endpoints: list[str] = []
            for item in items:
                for text in self.name(item, "etcd_endpoints").split(","):
                    endpoints.append(self.endpoint(item, text.strip()))
            if not endpoints:
                raise self.fail(node, "etcd_endpoints names no endpoint")
            kwargs["etcd_endpoints"] = tuple(dict.fromkeys(endpoints))
        for key in ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_user", "etcd_password"):
            if key in top:
                kwargs[key] = self.name(top[key][1], key)
        if ("etcd_cert" in top) != ("etcd_key" in top):
            given = "etcd_cert" if "etcd_cert" in top else "etcd_key"
            raise self.fail(top[given][0], "etcd_cert and etcd_key go together (give both)")
        if ("etcd_user" in top) != ("etcd_password" in top):
            given = "etcd_user" if "etcd_user" in top else "etcd_password"
            raise self.fail(top[given][0], "etcd_user and etcd_password go together (give both)")
        tls = [k for k in ("etcd_cacert", "etcd_cert") if k in top]
        endpoints = kwargs.get("etcd_endpoints", Config.etcd_endpoints)
        if tls and not any(e.startswith("https://") for e in endpoints):
            raise self.fail(top[tls[0]][0], f"{tls[0]} needs https:// etcd_endpoints")

    def endpoint(self, node: yaml.Node, text: str) -> str:
        """One etcd client URL, as ``scheme://host:port``."""
        try:
            url = urlsplit(text if "://" in text else f"http://{text}")
            port = url.port or 2379
        except ValueError:
            url, port = None, 0
        if (
            url is None
            or url.scheme not in ("http", "https")
            or not url.hostname
            or url.path not in ("", "/")
            or url.query
            or url.fragment
            or url.username is not None
        ):
            raise self.fail(node, f"etcd_endpoints: not an http(s)://host:port URL: {_show(text)}")
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"{url.scheme}://{host}:{port}"

    def pool(self, node: yaml.Node) -> PoolSpec:
        keys = self.mapping(node, "pool", _POOL_KEYS)
        if "name" not in keys:
            raise self.fail(node, "pool without a name")
        name = self.name(keys["name"][1], "pool name")
        where = f"pool '{name}'"
        expire = DEFAULT_EXPIRE
        if "expire" in keys:
            expire = self.number(keys["expire"][1], f"{where}: expire", minimum=0)
        maxlocks = 1
        if "maxlocks" in keys:
            maxlocks = self.whole(keys["maxlocks"][1], f"{where}: maxlocks", 1, MAX_MAXLOCKS)
        servers = None
        if "servers" in keys:
            servers = self.servers(keys["servers"][1], where)
        max_shared = None  # no limit
        if "max_shared" in keys and self.value(keys["max_shared"][1]) is not None:
            max_shared = self.whole(keys["max_shared"][1], f"{where}: max_shared", 1, MAX_MAXLOCKS)
        lock_delay = 0.0
        if "lock_delay" in keys:
            node = keys["lock_delay"][1]
            lock_delay = self.number(node, f"{where}: lock_delay", minimum=0)
            if lock_delay > MAX_LOCK_DELAY:
                raise self.fail(
                    node,
                    f"{where}: lock_delay must be at most {MAX_LOCK_DELAY} seconds, "
                    f"not {_show(self.value(node))}",
                )
        return PoolSpec(
            name=name,
            maxlocks=maxlocks,
            expire=expire,
            servers=servers,
            max_shared=max_shared,
            lock_delay=lock_delay,
        )

    def servers(self, node: yaml.Node, where: str, what: str = "servers") -> frozenset[str] | None:
        if isinstance(node, yaml.SequenceNode):
            items = []
            for item in node.value:
                if not isinstance(item, yaml.ScalarNode) or not item.value.strip():
                    value = _show(item.value if isinstance(item, yaml.ScalarNode) else item)
                    noun = "host names" if what == "servers" else "pool names"
                    raise self.fail(item, f"{where}: {what} must be {noun}, not {value}")
                items.append(self.host(item, item.value, where))
        elif isinstance(node, yaml.ScalarNode):
            if node.tag == _NULL_TAG and node.style is None:
                return None  # "servers:" with nothing: any host, as in 0.7
            # The text written, so a host "1234" or "010" stays as written.
            parts = node.value.split(",")
            items = [self.host(node, part, where) for part in parts if part.strip()]
        else:
            raise self.fail(node, f"{where}: {what} must be a comma-separated string or a list")
        if not items:
            anything = "host" if what == "servers" else "pool"
            raise self.fail(
                node, f"{where}: {what} is empty (leave it out to allow any {anything})"
            )
        return frozenset(items)

    def host(self, node: yaml.Node, text: str, where: str) -> str:
        host = text.strip()
        if len(host) > MAX_NAME_LENGTH:
            raise self.fail(
                node, f"{where}: servers entry is longer than {MAX_NAME_LENGTH} characters"
            )
        if not host.isprintable():
            # The HTTP API refuses such hosts, so the entry could never match.
            raise self.fail(node, f"{where}: servers entry {_show(host)} is not printable")
        return host

    def number(self, node: yaml.Node, what: str, minimum: float, above: bool = False) -> float:
        """Seconds: finite, >= ``minimum`` (> with ``above``), at most MAX_SECONDS."""
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise self.fail(node, f"{what} must be a number of seconds, not {_show(value)}")
        if value < minimum or (above and value == minimum) or value == float("inf"):
            relation = ">" if above else ">="
            raise self.fail(
                node, f"{what} must be {relation} {minimum:g} and finite, not {_show(value)}"
            )
        if value > MAX_SECONDS:
            raise self.fail(
                node, f"{what} must be at most {MAX_SECONDS} seconds, not {_show(value)}"
            )
        return float(value) + 0.0  # + 0.0 turns -0.0 into 0.0

    def whole(self, node: yaml.Node, what: str, minimum: int, maximum: int) -> int:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(node, f"{what} must be a whole number >= {minimum}, not {_show(value)}")
        if value > maximum:
            raise self.fail(node, f"{what} must be at most {maximum}, not {_show(value)}")
        return value

    def port(self, node: yaml.Node, what: str) -> int:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise self.fail(node, f"{what} must be a port number 0-65535, not {_show(value)}")
        return value
