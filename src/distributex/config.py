"""The server's configuration: the seed's YAML file of lock pools, validated.

Every key the 0.7 README documents keeps its meaning; a few new ones are
allowed. The file is checked as a whole at start-up and the first problem
comes back as a :class:`ConfigError` whose message is one line naming the
file, the line and column, and what is wrong.

Top-level keys:

``backend``       ``inmemory`` (default) or ``memcache``.
``memcachehost``  memcache backend: host (default ``localhost``).
``memcacheport``  memcache backend: port (default 11211).
``bind``          address to listen on (default: ``127.0.0.1`` for
                  ``distributexd``; every interface under ``twistd``, as 0.7).
``port``          port to listen on (default 9889).
``start_delay``   seconds after start-up during which nothing is granted
                  (default 0): see the README's "Restarts".
``autocreate``    ``true``: a pool not listed is created on first use as a
                  mutex with the default expire (default ``false`` when the
                  file lists pools; ``true`` with no file at all).
``pools``         a list of pools, each with ``name`` (required), ``expire``
                  (seconds, default 1800, 0 = never), ``maxlocks`` (default
                  1) and ``servers`` (allow-list: comma-separated string or a
                  list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distributex.engine import PoolSpec

DEFAULT_EXPIRE = 1800.0
DEFAULT_PORT = 9889
DEFAULT_BIND = "127.0.0.1"
BACKENDS = ("inmemory", "memcache")

_TOP_KEYS = (
    "backend",
    "memcachehost",
    "memcacheport",
    "bind",
    "port",
    "start_delay",
    "autocreate",
    "pools",
)
_POOL_KEYS = ("name", "expire", "maxlocks", "servers")


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is one line for the operator."""


@dataclass(frozen=True)
class Config:
    """A validated configuration."""

    backend: str = "inmemory"
    memcachehost: str = "localhost"
    memcacheport: int = 11211
    bind: str | None = None  # None: the entry point's default
    port: int = DEFAULT_PORT
    start_delay: float = 0.0
    autocreate: bool = True
    pools: dict[str, PoolSpec] = field(default_factory=dict)
    source: str | None = None

    def pool(self, name: str) -> PoolSpec | None:
        """The pool called ``name``, made on first use if ``autocreate``; else None."""
        spec = self.pools.get(name)
        if spec is None and self.autocreate:
            spec = PoolSpec(name=name, expire=DEFAULT_EXPIRE)
        return spec


def default_config() -> Config:
    """The built-in configuration used when no file is given."""
    return Config()


def load_config(path: str | Path) -> Config:
    """Read and check a configuration file; raises :class:`ConfigError`."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text: {exc.reason}") from None
    return parse_config(text, name)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Check configuration text; ``source`` names it in error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML error: {exc}") from None
    return _Checker(source).config(root)


class _Checker:
    """Walks the YAML node tree so every error can say where it is."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._loader = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, problem: str) -> ConfigError:
        if node is None:
            return ConfigError(f"{self.source}: {problem}")
        mark = node.start_mark
        return ConfigError(f"{self.source}:{mark.line + 1}:{mark.column + 1}: {problem}")

    def value(self, node: yaml.Node) -> Any:
        """The Python value of a scalar node, resolved the way SafeLoader would."""
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self._loader.construct_object(node)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.fail(key_node, f"{what}: keys must be names, not {key!r}")
            if key not in allowed:
                raise self.fail(
                    key_node, f"{what}: unknown key '{key}' (known: {', '.join(allowed)})"
                )
            if key in out:
                raise self.fail(key_node, f"{what}: key '{key}' given twice")
            out[key] = (key_node, value_node)
        return out

    def config(self, root: yaml.Node | None) -> Config:
        if root is None:
            raise self.fail(None, "the file is empty (expected at least 'pools:')")
        top = self.mapping(root, "configuration", _TOP_KEYS)
        kwargs: dict[str, Any] = {"source": self.source, "autocreate": False}
        if "backend" in top:
            node = top["backend"][1]
            backend = self.value(node)
            if backend not in BACKENDS:
                raise self.fail(node, f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
            kwargs["backend"] = backend
        if "memcachehost" in top:
            kwargs["memcachehost"] = self.text(top["memcachehost"][1], "memcachehost")
        if "memcacheport" in top:
            kwargs["memcacheport"] = self.port(top["memcacheport"][1], "memcacheport")
        if "bind" in top:
            kwargs["bind"] = self.text(top["bind"][1], "bind")
        if "port" in top:
            kwargs["port"] = self.port(top["port"][1], "port")
        if "start_delay" in top:
            kwargs["start_delay"] = self.number(top["start_delay"][1], "start_delay", minimum=0)
        if "autocreate" in top:
            node = top["autocreate"][1]
            value = self.value(node)
            if not isinstance(value, bool):
                raise self.fail(node, f"autocreate must be true or false, not {value!r}")
            kwargs["autocreate"] = value
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
        return Config(**kwargs)

    def pool(self, node: yaml.Node) -> PoolSpec:
        keys = self.mapping(node, "pool", _POOL_KEYS)
        if "name" not in keys:
            raise self.fail(node, "pool without a name")
        name_node = keys["name"][1]
        name = self.value(name_node)
        if isinstance(name, bool) or not isinstance(name, str | int | float) or name == "":
            raise self.fail(name_node, f"pool name must be a non-empty string, not {name!r}")
        name = str(name)
        where = f"pool '{name}'"
        expire = DEFAULT_EXPIRE
        if "expire" in keys:
            expire = self.number(keys["expire"][1], f"{where}: expire", minimum=0)
        maxlocks = 1
        if "maxlocks" in keys:
            mnode = keys["maxlocks"][1]
            maxlocks = self.value(mnode)
            if isinstance(maxlocks, bool) or not isinstance(maxlocks, int) or maxlocks < 1:
                raise self.fail(
                    mnode, f"{where}: maxlocks must be a whole number >= 1, not {maxlocks!r}"
                )
        servers = None
        if "servers" in keys:
            servers = self.servers(keys["servers"][1], where)
        return PoolSpec(name=name, maxlocks=maxlocks, expire=float(expire), servers=servers)

    def servers(self, node: yaml.Node, where: str) -> frozenset[str] | None:
        if isinstance(node, yaml.SequenceNode):
            items = []
            for item in node.value:
                value = self.value(item)
                if not isinstance(value, str) or not value.strip():
                    raise self.fail(item, f"{where}: servers must be host names, not {value!r}")
                items.append(value.strip())
        else:
            value = self.value(node)
            if value is None:
                return None
            if not isinstance(value, str):
                raise self.fail(
                    node, f"{where}: servers must be a comma-separated string or a list"
                )
            items = [part.strip() for part in value.split(",") if part.strip()]
        if not items:
            raise self.fail(node, f"{where}: servers is empty (leave it out to allow any host)")
        return frozenset(items)

    def number(self, node: yaml.Node, what: str, minimum: float) -> float:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise self.fail(node, f"{what} must be a number of seconds, not {value!r}")
        if value < minimum or value == float("inf"):
            raise self.fail(node, f"{what} must be >= {minimum:g} and finite, not {value!r}")
        return float(value)

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value:
            raise self.fail(node, f"{what} must be a non-empty string, not {value!r}")
        return value

    def port(self, node: yaml.Node, what: str) -> int:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise self.fail(node, f"{what} must be a port number 0-65535, not {value!r}")
        return value
