"""Configuration under hostile input: odd YAML, odd files, odd numbers and names.

Whatever the file holds, the loader either gives a Config or one ConfigError
line naming the file; distributexd turns that into one line and exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from distributex.config import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    ConfigError,
    load_config,
    parse_config,
)


def refused(text: str) -> str:
    """The one-line error ``text`` gets from the parser."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.yaml")
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith("site.yaml"), message
    return message


def run_server(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distributex", "-c", str(path), "-p", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], path: Path | str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("distributexd: error: ") and str(path) in lines[0]
    return lines[0]


# --- YAML features: merge keys, tags, nesting, aliases --------------------------

DEEP = "pools: " + "[" * 20000 + "]" * 20000 + "\n"

CRASHERS = [
    (
        "pools:\n  - name: a\n    <<: {expire: 10}\n",
        "3:5",
        "YAML merge keys (<<) are not supported",
    ),
    ("<<: {port: 1}\npools: []\n", "1:1", "YAML merge keys (<<) are not supported"),
    ("backend: !custom foo\n", "1:10", "unsupported YAML tag '!custom'"),
    ("pools:\n  - name: !custom foo\n", "2:11", "unsupported YAML tag '!custom'"),
    ("pools: !custom [a]\n", "1:8", "unsupported YAML tag '!custom'"),
    ("pools:\n  - name: a\n    expire: !!binary AAAA\n", "3:13", "unsupported YAML tag"),
    ("port: !!int abc\n", "1:7", "not a valid !!int"),
    ("pools:\n  - name: a\n    expire: 1" + "0" * 5000 + "\n", "3:13", "not a valid"),
    ("pools:\n  - name: a\n    expire: 1" + "0" * 400 + "\n", "3:13", "at most"),
    (DEEP, "1:", f"nested more than {MAX_DEPTH} levels deep"),
    ("pools:\n  - name: a\x00\n", "2:12", "unacceptable character #x0000"),
    ("pools:\n  - name: a\n    servers: [a, [b]]\n", "3:18", "servers must be host names"),
    ('pools:\n  - name: a\n    "ex\\npire": 3\n', "3:5", "unknown key 'ex\\npire'"),
]


@pytest.mark.parametrize(("text", "place", "problem"), CRASHERS)
def test_hostile_yaml_is_one_line(text: str, place: str, problem: str) -> None:
    message = refused(text)
    assert message.startswith(f"site.yaml:{place}"), message
    assert problem in message, message
    assert len(message) < 300


@pytest.mark.parametrize(("text", "place", "problem"), CRASHERS)
def test_server_refuses_hostile_yaml(tmp_path: Path, text: str, place: str, problem: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    line = assert_one_line_exit_2(run_server(path), path)
    assert problem in line


def test_aliases_still_work() -> None:
    config = parse_config(
        "pools:\n"
        "  - name: &n pool1\n"
        "    expire: &e 300\n"
        "    servers: &hosts [acme1, acme2]\n"
        "  - name: pool2\n"
        "    expire: *e\n"
        "    servers: *hosts\n",
        "site.yaml",
    )
    assert config.pools["pool2"].expire == 300
    assert config.pools["pool2"].servers == frozenset({"acme1", "acme2"})


def laughs(anchor_key: str) -> str:
    """Nine levels of ten aliases each: 10**10 strings if ever expanded."""
    text = f"{anchor_key}: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        text += f"{anchor_key}{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


def test_billion_laughs_is_refused_quickly() -> None:
    assert "unknown key 'x'" in refused(laughs("x"))
    # The same bomb as the pools list itself, and as a servers list.
    items = "".join(f"  - {line.split(': ', 1)[1]}\n" for line in laughs("x").splitlines())
    assert "pool must be a mapping" in refused("pools:\n" + items)
    servers = "pools:\n  - name: p\n    servers: &big [" + ", ".join(["*big"] * 10) + "]\n"
    assert "servers must be host names" in refused(servers)


def test_recursive_alias_is_one_line() -> None:
    assert "pool must be a mapping" in refused("pools: &a [*a]\n")
    assert "servers must be host names" in refused("pools:\n  - name: p\n    servers: &a [*a]\n")


# --- the file itself: size, devices, FIFOs, directories ---------------------------


def test_dev_zero_is_too_large(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(run_server("/dev/zero"), "/dev/zero")
    assert "larger than" in line


def test_large_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\npools: []\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(path)
    # Exactly at the cap is still fine.
    path.write_text("pools: []\n" + "#" * (MAX_CONFIG_BYTES - 11) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path).pools == {}


def test_directory_is_one_line(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(run_server(tmp_path), tmp_path)
    assert "is a directory" in line


def test_fifo_without_writer_is_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / "conf.fifo"
    os.mkfifo(fifo)
    line = assert_one_line_exit_2(run_server(fifo), fifo)
    assert "nothing was written" in line


def test_fifo_with_writer_loads(tmp_path: Path) -> None:
    fifo = tmp_path / "conf.fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "w") as out:
            out.write("pools:\n  - name: piped\n")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        # The writer may not have opened the FIFO yet; the loader then sees
        # no writer. Retry briefly rather than depend on the timing.
        for _ in range(200):
            try:
                config = load_config(fifo)
                break
            except ConfigError:
                writer.join(0.01)
        assert set(config.pools) == {"piped"}
    finally:
        writer.join(5)


def test_unreadable_bytes_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"pools:\n  - name: caf\xe9\n")
    line = assert_one_line_exit_2(run_server(path), path)
    assert "not UTF-8" in line


# --- names are the text written ----------------------------------------------


@pytest.mark.parametrize(
    ("written", "name"),
    [
        ("010", "010"),
        ("12:30", "12:30"),
        ("0x1F", "0x1F"),
        ("1e3", "1e3"),
        ("1_000", "1_000"),
        ("2001-12-14", "2001-12-14"),
        ("yes", "yes"),
        ("true", "true"),
        ("'null'", "null"),
        ('"~"', "~"),
        ("'010'", "010"),
        ('"1e3"', "1e3"),
        ("!!int 010", "010"),
        ("!!str 12:30", "12:30"),
        ("42", "42"),
        ("=", "="),
        ("<<", "<<"),
    ],
)
def test_pool_name_is_the_text_written(written: str, name: str) -> None:
    config = parse_config(f"pools:\n  - name: {written}\n    servers: [{written}]\n")
    assert list(config.pools) == [name]
    assert config.pools[name].servers == frozenset({name})


def test_numeric_servers_are_text() -> None:
    config = parse_config(
        "pools:\n  - name: a\n    servers: 1234\n  - name: b\n    servers: 010, 0x1F\n"
    )
    assert config.pools["a"].servers == frozenset({"1234"})
    assert config.pools["b"].servers == frozenset({"010", "0x1F"})
    assert parse_config("pools:\n  - name: a\n    servers:\n").pools["a"].servers is None


def test_names_differing_only_in_number_spelling_are_distinct() -> None:
    # Before, 010 and 8 both became pool "8" ("defined twice").
    config = parse_config("pools:\n  - name: 010\n  - name: 8\n  - name: 0x8\n")
    assert set(config.pools) == {"010", "8", "0x8"}


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("", "pool name must be"),
        ("''", "pool name must be"),
        ("~", "not null (quote it"),
        ("null", "not null (quote it"),
        ('"a\\0b"', "not printable"),
        ('"a\\tb"', "not printable"),
        ('"a\\nb"', "not printable"),
        ('"\\x7f"', "not printable"),
        ('"a\\u00a0b"', "not printable"),
        ('"\\ud800"', "not printable"),
        ('"\\u200b"', "not printable"),
        ("x" * 256, "longer than 255 characters"),
        ("[a, b]", "pool name must be a non-empty string, not a list"),
        ("{a: b}", "pool name must be a non-empty string, not a mapping"),
    ],
)
def test_bad_pool_names(written: str, problem: str) -> None:
    message = refused(f"pools:\n  - name: {written}\n")
    assert message.startswith("site.yaml:2:"), message
    assert problem in message


def test_name_of_255_characters_is_fine() -> None:
    name = "é" * 255
    assert list(parse_config(f"pools:\n  - name: {name}\n").pools) == [name]


@pytest.mark.parametrize(
    "servers", ['["a\\0b"]', '"a, b\\x01"', "[" + "h" * 256 + "]", '["a\\u200bb"]', "['']"]
)
def test_bad_server_names(servers: str) -> None:
    message = refused(f"pools:\n  - name: a\n    servers: {servers}\n")
    assert message.startswith("site.yaml:3:"), message
    assert "servers" in message


def test_bad_name_in_server(tmp_path: Path) -> None:
    path = tmp_path / "name.yaml"
    path.write_text('pools:\n  - name: "a\\x00b"\n')
    line = assert_one_line_exit_2(run_server(path), path)
    assert "not printable" in line


@pytest.mark.parametrize("key", ["bind", "memcachehost"])
def test_text_settings_are_text_and_printable(key: str) -> None:
    assert getattr(parse_config(f"{key}: 1234\npools: []\n"), key) == "1234"
    assert "not printable" in refused(f'{key}: "a\\nb"\npools: []\n')


# --- numbers: finite and within bounds --------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("pools:\n  - name: a\n    expire: .nan\n", "expire must be a number of seconds"),
        ("pools:\n  - name: a\n    expire: .inf\n", "finite"),
        ("pools:\n  - name: a\n    expire: -.inf\n", ">= 0"),
        ("pools:\n  - name: a\n    expire: 1.0e+400\n", "finite"),
        ("pools:\n  - name: a\n    expire: 1000000001\n", "at most 1000000000"),
        ("pools:\n  - name: a\n    expire: 1.0e+30\n", "at most 1000000000"),
        # YAML 1.1: a float needs a dot and a signed exponent; 1e30 is text.
        ("pools:\n  - name: a\n    expire: 1e30\n", "expire must be a number of seconds"),
        ("pools:\n  - name: a\n    maxlocks: 1000001\n", "at most 1000000"),
        ("pools:\n  - name: a\n    maxlocks: " + "9" * 30 + "\n", "at most 1000000"),
        ("pools:\n  - name: a\n    maxlocks: 2.5\n", "whole number"),
        ("pools:\n  - name: a\n    maxlocks: true\n", "whole number"),
        ("port: 1e3\n", "port must be a port number"),
        ("port: 65536\n", "port must be a port number"),
        ("port: .nan\n", "port must be a port number"),
        ("start_delay: .nan\n", "start_delay must be a number"),
        ("start_delay: 1.0e+10\n", "at most 1000000000"),
    ],
)
def test_numbers_must_be_sane(text: str, problem: str) -> None:
    assert problem in refused(text)


def test_number_edges_load() -> None:
    config = parse_config(
        "pools:\n  - name: a\n    expire: 1000000000\n    maxlocks: 1000000\n"
        "  - name: b\n    expire: -0.0\n"
    )
    assert config.pools["a"].expire == 1e9 and config.pools["a"].maxlocks == 1_000_000
    assert config.pools["b"].expire == 0 and str(config.pools["b"].expire) == "0.0"


# --- the limits keys -------------------------------------------------------------


def test_limit_keys_default() -> None:
    config = parse_config("pools: []\n")
    assert config.max_pools == 10000 and config.max_connections == 0
    assert config.header_timeout == 10 and config.idle_timeout == 60


def test_limit_keys_load() -> None:
    config = parse_config(
        "max_pools: 50\nmax_connections: 200\nheader_timeout: 2.5\nidle_timeout: 30\npools: []\n"
    )
    assert config.max_pools == 50 and config.max_connections == 200
    assert config.header_timeout == 2.5 and config.idle_timeout == 30.0
    assert isinstance(config.idle_timeout, float)
    assert parse_config("max_connections: 0\npools: []\n").max_connections == 0


@pytest.mark.parametrize(
    ("text", "place", "problem"),
    [
        ("max_pools: 0\n", "1:12", "max_pools must be a whole number >= 1"),
        ("max_pools: -5\n", "1:12", "max_pools must be a whole number >= 1"),
        ("max_pools: 1.5\n", "1:12", "max_pools must be a whole number"),
        ("max_pools: many\n", "1:12", "max_pools must be a whole number"),
        ("max_pools: 10000001\n", "1:12", "max_pools must be at most 10000000"),
        ("max_connections: -1\n", "1:18", "max_connections must be a whole number >= 0"),
        ("max_connections: 1e6\n", "1:18", "max_connections must be a whole number"),
        ("max_connections: 10000001\n", "1:18", "max_connections must be at most 10000000"),
        ("header_timeout: 0\n", "1:17", "header_timeout must be > 0"),
        ("header_timeout: -1\n", "1:17", "header_timeout must be > 0"),
        ("header_timeout: .inf\n", "1:17", "header_timeout must be > 0 and finite"),
        ("header_timeout: soon\n", "1:17", "header_timeout must be a number of seconds"),
        ("idle_timeout: 0\n", "1:15", "idle_timeout must be > 0"),
        ("idle_timeout: .nan\n", "1:15", "idle_timeout must be a number of seconds"),
        ("idle_timeout: 1.0e+10\n", "1:15", "idle_timeout must be at most 1000000000"),
        ("idle_timeout: [1]\n", "1:15", "idle_timeout must be a number of seconds"),
    ],
)
def test_limit_keys_refused(text: str, place: str, problem: str) -> None:
    message = refused(text + "pools: []\n")
    assert message.startswith(f"site.yaml:{place}: "), message
    assert problem in message


def test_server_refuses_bad_limit(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("idle_timeout: 0\npools: []\n")
    line = assert_one_line_exit_2(run_server(path), path)
    assert "idle_timeout must be > 0" in line
