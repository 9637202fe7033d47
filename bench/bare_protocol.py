"""The floor: a bare asyncio protocol answering the lock verbs, beside the real server.

The same closed loop as ``mutex_fight.py`` (N clients, one mutex, /wait/ ->
YES -> /release/ -> OK) runs, in one invocation, against:

* ``distributexd`` as users run it (default settings: uvloop, INFO log lines);
* a bare :class:`asyncio.Protocol` on uvloop (the server's default loop);
* the same protocol on the standard library's loop;
* ``bare_mutex.py`` on uvloop: a real FIFO mutex (a queue, a holder, a
  fence) with no leases, limits, logs or authentication.

The bare protocol splits request heads at the blank line and answers each
with a fixed ``YES`` (``OK`` for ``/release/``) and a counting fence: no
parsing beyond the path, no lock, no log. What it spends per grant is what
the loop, the kernel and the sockets cost; the server's figure divided by it
is the server's own work, comparable across machines and runs. It grants
every waiter at once, so its "safety violations" are expected and ignored.

The bare mutex is the floor of a lock that makes clients wait: on a mutex
49 of 50 clients sleep, and every grant wakes one (a write, a wake-up, a
read more than the bare protocol's batched answers). The server over the
bare mutex is what the leases, tokens, limits and log lines cost; the bare
mutex over the bare protocol is what waiting costs by itself.

    .venv/bin/python bench/bare_protocol.py [--clients 50] [--duration 10] [--uvloop] [--json]
    .venv/bin/python bench/bare_protocol.py --serve uvloop|asyncio PORT   # the bare server alone
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import mutex_fight
from _common import Server, add_load_options, emit, fmt_int

_HEAD_END = b"\r\n\r\n"


class BareLockProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one fixed answer per request head."""

    fence = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's is not an asyncio.Transport subclass
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        answers = []
        while (end := buffer.find(_HEAD_END)) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            if head.startswith(b"GET /release"):
                answers.append(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK"
                )
            else:
                BareLockProtocol.fence += 1
                answers.append(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                    b"X-Distributex-Fence: %d\r\n\r\nYES" % BareLockProtocol.fence
                )
        self.buffer = buffer
        if answers:
            self.transport.write(b"".join(answers))


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareLockProtocol, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def serve(loop_name: str, port: int) -> None:
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(_serve(port))
    else:
        asyncio.run(_serve(port))


def bare_server(loop_name: str) -> Server:
    return Server(command=[sys.executable, __file__, "--serve", loop_name])


def bare_mutex_server() -> Server:
    return Server(command=[sys.executable, str(Path(__file__).with_name("bare_mutex.py"))])


def run(
    clients: int = 50,
    duration: float = 10.0,
    procs: int = 1,
    uvloop: bool = False,
    warmup: float = 1.0,
    client: str = "aiohttp",
) -> dict[str, Any]:
    """The real server and the bare protocol on both loops, one after another."""
    figures: dict[str, Any] = {"clients": clients, "uvloop_clients": uvloop, "client": client}
    runs = {
        "server": None,
        "bare_uvloop": bare_server("uvloop"),
        "bare_asyncio": bare_server("asyncio"),
        "bare_mutex": bare_mutex_server(),
    }
    for name, server in runs.items():
        result = mutex_fight.run(clients, duration, procs, uvloop, warmup, None, client, server)
        figures[name] = {
            key: result[key]
            for key in (
                "grants_per_s",
                "server_cpu_pct",
                "server_cpu_us_per_grant",
                "loadgen_cpu_pct",
                "machine_busy_pct",
                "errors",
            )
        }
        if name in ("server", "bare_mutex"):
            figures[name]["safety_violations"] = result["safety_violations"]
    server_us = figures["server"]["server_cpu_us_per_grant"]
    figures["ratio_to_bare_uvloop"] = server_us / figures["bare_uvloop"]["server_cpu_us_per_grant"]
    figures["ratio_to_bare_asyncio"] = (
        server_us / figures["bare_asyncio"]["server_cpu_us_per_grant"]
    )
    mutex_us = figures["bare_mutex"]["server_cpu_us_per_grant"]
    figures["ratio_to_bare_mutex"] = server_us / mutex_us
    figures["bare_mutex_to_bare_uvloop"] = (
        mutex_us / figures["bare_uvloop"]["server_cpu_us_per_grant"]
    )
    return figures


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    lg = f"{r['clients']} clients, one mutex, {r['client']} client" + (
        " + uvloop" if r["uvloop_clients"] else ""
    )
    out = [("load", lg)]
    for name, label in (
        ("server", "distributexd (defaults)"),
        ("bare_uvloop", "bare protocol, uvloop"),
        ("bare_asyncio", "bare protocol, asyncio"),
        ("bare_mutex", "bare FIFO mutex, uvloop"),
    ):
        f = r[name]
        out.append(
            (
                label,
                f"{f['server_cpu_us_per_grant']:.1f} µs CPU per grant, "
                f"{fmt_int(f['grants_per_s'])} grants/s, server {f['server_cpu_pct']:.0f} %",
            )
        )
    out.append(("server / bare uvloop", f"{r['ratio_to_bare_uvloop']:.1f} x"))
    out.append(("server / bare asyncio", f"{r['ratio_to_bare_asyncio']:.1f} x"))
    out.append(("server / bare mutex", f"{r['ratio_to_bare_mutex']:.1f} x"))
    out.append(("bare mutex / bare uvloop", f"{r['bare_mutex_to_bare_uvloop']:.1f} x"))
    for name in ("server", "bare_mutex"):
        violations = sum(r[name]["safety_violations"].values())
        out.append((f"{name.replace('_', ' ')} safety violations", str(violations)))
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    add_load_options(parser)
    args = parser.parse_args(argv)
    result = run(args.clients, args.duration, args.procs, args.uvloop, args.warmup, args.client)
    emit(result, rows(result), "bare_protocol: the server against the floor", args.json)
    violations = sum(sum(result[n]["safety_violations"].values()) for n in ("server", "bare_mutex"))
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
