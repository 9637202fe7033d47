"""Configuration: what loads, and the one-line errors for what does not."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distributex.config import ConfigError, parse_config

SEED = """\
backend: inmemory
pools:
    - name: pool1
      expire: 300

    - name: pool2
      expire: 300
      servers: acme1, acme2
      maxlocks: 5
"""


def test_seed_style_config_loads() -> None:
    config = parse_config(SEED, "seed.yaml")
    assert config.backend == "inmemory"
    assert set(config.pools) == {"pool1", "pool2"}
    assert config.pools["pool1"].expire == 300 and config.pools["pool1"].maxlocks == 1
    assert config.pools["pool1"].servers is None
    assert config.pools["pool2"].servers == {"acme1", "acme2"}
    assert config.pools["pool2"].maxlocks == 5
    assert not config.autocreate
    assert config.pool("elsewhere") is None


def test_defaults_and_lists() -> None:
    config = parse_config(
        textwrap.dedent("""\
        memcachehost: cache1
        autocreate: true
        bind: 0.0.0.0
        port: 9000
        start_delay: 60
        pools:
          - name: a
          - name: b
            expire: 0
            servers: [x, y]
          - name: 42
        """)
    )
    assert config.memcachehost == "cache1" and config.memcacheport == 11211
    assert config.bind == "0.0.0.0" and config.port == 9000
    assert config.start_delay == 60
    assert config.pools["a"].expire == 1800
    assert config.pools["b"].expire == 0 and config.pools["b"].servers == {"x", "y"}
    assert "42" in config.pools
    made = config.pool("new")
    assert made is not None and made.maxlocks == 1 and made.expire == 1800


BAD = [
    ("pools: [\n  - name: a\n", "2:3", "YAML syntax error"),
    ("backend: redisx\npools: []\n", "1:10", "unknown backend 'redisx'"),
    ("sqlite_sync: always\npools: []\n", "1:14", "unknown sqlite_sync 'always'"),
    ("backend: sqlite\npools: []\n", "1:10", "backend sqlite needs sqlite_path"),
    ("pools:\n  - expire: 3\n", "2:5", "pool without a name"),
    ("pools:\n  - name: a\n  - name: a\n", "3:5", "pool 'a' is defined twice"),
    ("pools:\n  - name: a\n    expire: -1\n", "3:13", "expire must be >= 0"),
    ("pools:\n  - name: a\n    expire: soon\n", "3:13", "expire must be a number"),
    ("pools:\n  - name: a\n    maxlocks: 0\n", "3:15", "maxlocks must be a whole number >= 1"),
    ("pools:\n  - name: a\n    maxlocks: two\n", "3:15", "maxlocks must be a whole number"),
    ("pools:\n  - name: a\n    maxlock: 2\n", "3:5", "unknown key 'maxlock'"),
    ("pools:\n  - name: a\n    max_shared: 0\n", "3:17", "pool 'a': max_shared must be a whole"),
    ("pools:\n  - name: a\n    max_shared: many\n", "3:17", "max_shared must be a whole number"),
    ("pools:\n  - name: a\n    lock_delay: -1\n", "3:17", "pool 'a': lock_delay must be >= 0"),
    ("pools:\n  - name: a\n    lock_delay: 3601\n", "3:17", "lock_delay must be at most 3600"),
    ("pools:\n  - name: a\n    lock_delay: soon\n", "3:17", "lock_delay must be a number"),
    ("pool:\n  - name: a\n", "1:1", "unknown key 'pool'"),
    ("pools: pool1\n", "1:8", "pools must be a list"),
    ("- name: a\n", "1:1", "configuration must be a mapping"),
    ("pools:\n  - name: a\n    servers: ''\n", "3:14", "servers is empty"),
    ("memcacheport: http\npools: []\n", "1:15", "memcacheport must be a port number"),
    ("", "", "the file is empty"),
]


@pytest.mark.parametrize(("text", "place", "problem"), BAD)
def test_bad_config_is_one_clear_error(text: str, place: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"site.yaml:{place}" if place else "site.yaml")
    assert problem in message


@pytest.mark.parametrize(("text", "place", "problem"), [*BAD[:6], BAD[8]])
def test_server_refuses_bad_config(tmp_path: Path, text: str, place: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(path), "-p", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and problem in lines[0]
    assert "Traceback" not in result.stderr


def test_max_shared_and_lock_delay() -> None:
    config = parse_config(
        "pools:\n  - name: a\n    max_shared: 5\n    lock_delay: 2.5\n"
        "  - name: b\n    max_shared: null\n  - name: c\n",
        "site.yaml",
    )
    assert (config.pools["a"].max_shared, config.pools["a"].lock_delay) == (5, 2.5)
    assert (config.pools["b"].max_shared, config.pools["b"].lock_delay) == (None, 0.0)
    assert (config.pools["c"].max_shared, config.pools["c"].lock_delay) == (None, 0.0)


def test_missing_config_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("nope.yaml: cannot read: No such file or directory")


def test_unreachable_memcached_stops_the_server_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "mc.yaml"
    path.write_text(f"backend: memcache\nmemcacheport: {port}\npools:\n  - name: pool1\n")
    result = subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(path), "-p", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"memcached localhost:{port} unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "backend: memcache\nmemcachehost: a, b\n",
        "backend: memcache\nmemcachehost: [a, b]\n",
    ],
)
def test_memcachehost_names_one_server(text: str) -> None:
    with pytest.raises(ConfigError, match="one memcached server"):
        parse_config(text + "pools:\n  - name: p\n", "f.yaml")


def test_key_prefix() -> None:
    config = parse_config("key_prefix: team-a/\npools:\n  - name: p\n", "f.yaml")
    assert config.key_prefix == "team-a/"
    with pytest.raises(ConfigError, match="key_prefix"):
        parse_config("key_prefix: has space\npools:\n  - name: p\n", "f.yaml")
