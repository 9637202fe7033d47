"""What the real 0.7 client sees: Python 2.7's own ``urllib2`` and name lookup.

The 0.7 client read every answer with ``urllib2.urlopen(url).read()`` and
named its machine ``socket.gethostbyaddr(socket.gethostname())[0]``. These
tests run that very Python 2.7 (this machine image has it under pyenv), not a
Python 3 replica, so what they check is what a 0.7 site sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import request_read_by_server

Server = Any  # conftest.Server

pytestmark = pytest.mark.timeout(90)


def python27() -> str | None:
    """Python 2.7 from pyenv, or on the PATH."""
    candidates = [os.path.expanduser("~/.pyenv/versions/2.7.18/bin/python")]
    root = os.environ.get("PYENV_ROOT")
    if root:
        candidates.insert(0, os.path.join(root, "versions", "2.7.18", "bin", "python"))
    found = shutil.which("python2.7")
    if found:
        candidates.append(found)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


PY27 = python27()
needs_py27 = pytest.mark.skipif(PY27 is None, reason="Python 2.7 is not installed here")


# -- the host identity ---------------------------------------------------------------------


def in_namespace(hostname: str, hosts: str, script: str, tmp_path: Path) -> str:
    """Run ``script`` (sh) in a UTS+mount namespace with this host name and /etc/hosts."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts)
    inner = f"hostname {hostname} && mount --bind {hosts_file} /etc/hosts && {script}"
    result = subprocess.run(
        ["unshare", "-u", "-m", "sh", "-c", inner],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and "unshare" in result.stderr and "ermission" in result.stderr:
        pytest.skip(f"cannot make namespaces here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def identity_script(tmp_path: Path, with_py27: bool) -> str:
    """Shell lines printing 0.7's identity (if asked) and the new client's."""
    lock_dir = tmp_path / "locks"
    ours = (
        f"DISTRIBUTEX_CONFIG= {sys.executable} -m distributex.client.cli -l "
        f"--lock-dir {lock_dir} -r p -- sh -c 'echo \"new $DISTRIBUTEX_HOST\"'"
    )
    lookup = "socket.gethostbyaddr(socket.gethostname())[0]"
    old = f"{PY27} -c 'import socket; print(\"old \" + {lookup})'"
    return f"{old} && {ours}" if with_py27 else ours


@needs_py27
@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare here")
def test_new_client_names_the_machine_as_0_7_did(tmp_path: Path) -> None:
    hosts = "127.0.0.1 localhost\n10.9.9.1 acme1 acme1.example.com\n"
    out = in_namespace("acme1", hosts, identity_script(tmp_path, True), tmp_path)
    names = dict(line.split(" ", 1) for line in out.splitlines())
    assert names["old"] == "acme1"
    assert names["new"] == names["old"]


@needs_py27
@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare here")
def test_new_client_follows_the_primary_name_when_it_is_qualified(tmp_path: Path) -> None:
    hosts = "127.0.0.1 localhost\n10.9.9.2 acme2.example.com acme2\n"
    out = in_namespace("acme2", hosts, identity_script(tmp_path, True), tmp_path)
    names = dict(line.split(" ", 1) for line in out.splitlines())
    assert names["new"] == names["old"] == "acme2.example.com"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare here")
def test_unresolvable_host_name_falls_back_to_the_plain_name(tmp_path: Path) -> None:
    hosts = "127.0.0.1 localhost\n"
    # No entry and no DNS: 0.7 stopped with a traceback; the new client uses the plain name.
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.254\noptions timeout:1 attempts:1\n")
    script = f"mount --bind {resolv} /etc/resolv.conf && {identity_script(tmp_path, False)}"
    began = time.monotonic()
    out = in_namespace("ghost9", hosts, script, tmp_path)
    assert out.strip() == "new ghost9"
    assert time.monotonic() - began < 30


# -- answers through urllib2 ---------------------------------------------------------------


# What 0.7's client did with an answer, in Python 2.7: urlopen(url).read().
URLLIB2_CALL = textwrap.dedent(
    """\
    import sys, urllib2
    try:
        body = urllib2.urlopen(sys.argv[1]).read()
    except urllib2.HTTPError as err:
        print("HTTPError %d" % err.code)
        sys.exit(1)
    print("body %s" % body)
    """
)


def urllib2_get(url: str, tmp_path: Path) -> str:
    assert PY27 is not None
    script = tmp_path / "call27.py"
    script.write_text(URLLIB2_CALL)
    result = subprocess.run([PY27, str(script), url], capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


@needs_py27
def test_urllib2_lock_cycle(server: Server, tmp_path: Path) -> None:
    base = server.url
    assert urllib2_get(f"{base}/get/?host=a&pool=p", tmp_path) == "body YES"
    assert urllib2_get(f"{base}/get/?host=b&pool=p", tmp_path) == "body NO"
    assert urllib2_get(f"{base}/release/?host=a&pool=p", tmp_path) == "body OK"
    assert urllib2_get(f"{base}/wait/?host=b&pool=p", tmp_path) == "body YES"
    assert urllib2_get(f"{base}/release/?host=b&pool=p", tmp_path) == "body OK"


LEGACY_POOLS = """\
pools:
  - name: pool1
  - name: guarded
    servers: acme1, acme2
"""


@needs_py27
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/get/?host=me&pool=nosuchpool", "404"),  # unknown pool
        ("/get/?host=stranger&pool=guarded", "403"),  # not in servers
        ("/get/?pool=pool1", "400"),  # no host
        ("/frobnicate/?host=me&pool=pool1", "404"),  # unknown verb
    ],
)
def test_urllib2_sees_invalid_as_0_7_answered_it(
    server_factory, tmp_path: Path, path: str, status: str
) -> None:
    server = server_factory(LEGACY_POOLS)
    assert urllib2_get(server.url + path, tmp_path) == "body INVALID"
    # Everyone else keeps the real status.
    answer = server.call(path)
    assert (str(answer.status), answer.body) == (status, "INVALID")


@needs_py27
def test_urllib2_gets_the_real_status_in_a_header(server_factory, tmp_path: Path) -> None:
    server = server_factory(LEGACY_POOLS)
    script = tmp_path / "headers27.py"
    script.write_text(
        "import sys, urllib2\n"
        "r = urllib2.urlopen(sys.argv[1])\n"
        "print('%s %s %s' % (r.getcode(), r.info().getheader('X-Distributex-Status'), r.read()))\n"
    )
    assert PY27 is not None
    out = subprocess.run(
        [PY27, str(script), server.url + "/get/?host=me&pool=nosuchpool"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "200 404 INVALID", out.stderr


@needs_py27
def test_urllib2_waiter_sees_unavailable_when_the_server_stops(
    server_factory, tmp_path: Path
) -> None:
    server = server_factory(LEGACY_POOLS)
    assert server.call("/get/?host=holder&pool=pool1").body == "YES"
    script = tmp_path / "call27.py"
    script.write_text(URLLIB2_CALL)
    assert PY27 is not None
    waiter = subprocess.Popen(
        [PY27, str(script), server.url + "/wait/?host=me&pool=pool1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not request_read_by_server(server.port):
        assert time.monotonic() < deadline, "the 0.7 waiter never reached the server"
        time.sleep(0.05)
    server.stop()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert out.strip() == "body UNAVAILABLE"
