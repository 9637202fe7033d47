"""Run every benchmark (each a fresh server) and print one Markdown table.

    .venv/bin/python bench/run_all.py [--repeat 2] [--duration 10] [--waiters 10000] [--json]

Each scenario runs ``--repeat`` times in its own process; the table shows
every run's figure (``run 1 ; run 2``) next to the original 0.7's. The
last line says how busy the rest of the machine was: figures taken
while other processes used a core are not comparable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (label, script, extra arguments)
SCENARIOS: list[tuple[str, str, list[str]]] = [
    ("fight", "mutex_fight.py", []),
    ("fight2", "mutex_fight.py", ["--procs", "2"]),
    ("fightraw", "mutex_fight.py", ["--client", "raw"]),
    ("cycles", "get_release.py", []),
    ("cyclesraw", "get_release.py", ["--client", "raw"]),
    ("parked", "parked_waiters.py", []),
    # The floor: every CPU figure above is also a ratio to it (same machine, same run).
    ("bare", "bare_protocol.py", ["--client", "raw", "--uvloop"]),
]

Fig = Callable[[dict[str, Any]], str]

# (scenario, figure, original 0.7, how to show one run)
TABLE: list[tuple[str, str, str, Fig]] = [
    ("fight", "50 clients, one mutex: grants/s", "0.1", lambda r: f"{r['grants_per_s']:,.0f}"),
    (
        "fight",
        "same: wait p50 / p99",
        "- / 5.1 s",
        lambda r: f"{r['wait_p50_ms']:.0f} / {r['wait_p99_ms']:.0f} ms",
    ),
    (
        "fight",
        "same: Jain fairness (grants per client min-max)",
        "46 of 50 starved",
        lambda r: f"{r['jain']:.3f} ({r['per_client_min']}-{r['per_client_max']})",
    ),
    (
        "fight",
        "same: server CPU per grant",
        "-",
        lambda r: f"{r['server_cpu_us_per_grant']:.0f} µs",
    ),
    (
        "fight",
        "same: server / load-generator CPU (% of a core)",
        "-",
        lambda r: f"{r['server_cpu_pct']:.0f} / {sum(r['loadgen_cpu_pct']):.0f}",
    ),
    (
        "fight2",
        "same, 2 load-generator processes: grants/s, p99",
        "-",
        lambda r: f"{r['grants_per_s']:,.0f}, {r['wait_p99_ms']:.0f} ms",
    ),
    (
        "fightraw",
        "same, lean hand-written client: grants/s, p99",
        "-",
        lambda r: f"{r['grants_per_s']:,.0f}, {r['wait_p99_ms']:.0f} ms",
    ),
    (
        "fightraw",
        "same, lean client: Jain, server CPU per grant, server CPU",
        "-",
        lambda r: (
            f"{r['jain']:.3f}, {r['server_cpu_us_per_grant']:.0f} µs, {r['server_cpu_pct']:.0f} %"
        ),
    ),
    (
        "cycles",
        "50 clients, 64 pools: get+release cycles/s",
        "1,643",
        lambda r: f"{r['cycles_per_s']:,.0f} (+{r['no_per_s']:,.0f} NO/s)",
    ),
    (
        "cycles",
        "server CPU per get+release",
        "581 µs",
        lambda r: f"{r['server_cpu_us_per_get_release']:.0f} µs",
    ),
    (
        "cyclesraw",
        "same, lean client: cycles/s, CPU per get+release",
        "-",
        lambda r: f"{r['cycles_per_s']:,.0f}, {r['server_cpu_us_per_get_release']:.0f} µs",
    ),
    (
        "bare",
        "50 clients, one mutex (lean client): CPU per grant, server / bare asyncio protocol",
        "-",
        lambda r: (
            f"{r['server']['server_cpu_us_per_grant']:.0f} / "
            f"{r['bare_uvloop']['server_cpu_us_per_grant']:.1f} µs = "
            f"{r['ratio_to_bare_uvloop']:.1f} x"
        ),
    ),
    (
        "parked",
        "10,000 parked /wait/: server memory per parked client",
        "-",
        lambda r: f"{r['kb_per_parked']:.1f} KiB",
    ),
    (
        "parked",
        "10,000 parked: drained after release",
        "(100: 2 in 60 s)",
        lambda r: f"{r['drained_per_s']:,.0f}/s",
    ),
    (
        "parked",
        "drain: server CPU per waiter served",
        "-",
        lambda r: f"{r['server_cpu_us_per_served']:.0f} µs",
    ),
]


def wait_for_quiet(limit_pct: float, patience: float) -> float:
    """Wait up to ``patience`` s until the machine is < ``limit_pct`` % busy over 1 s."""
    sys.path.insert(0, str(HERE))
    from _loadgen import machine_busy_ticks

    deadline = time.monotonic() + patience
    while True:
        b0 = machine_busy_ticks()
        time.sleep(1.0)
        b1 = machine_busy_ticks()
        busy = 100.0 * (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
        if busy < limit_pct or time.monotonic() > deadline:
            return busy


def run_scenario(script: str, extra: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark script with ``--json``; returns its figures."""
    proc = subprocess.run(
        [sys.executable, str(HERE / script), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if not proc.stdout.strip().startswith("{"):
        raise RuntimeError(f"{script} {extra} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    result["exit_status"] = proc.returncode
    return result


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    """The combined table, figures of every run side by side."""
    lines = [
        f"Measured {datetime.date.today().isoformat()} on this 2-core machine "
        "(server and load generator on the same machine, loopback).",
        "",
        "| scenario | original 0.7 | distributex (run 1 ; run 2 ; ...) |",
        "|---|---|---|",
    ]
    for scenario, label, original, show in TABLE:
        runs = results.get(scenario, [])
        if runs:
            lines.append(f"| {label} | {original} | {' ; '.join(show(r) for r in runs)} |")
    safety = sum(
        sum(r.get("safety_violations", {}).values()) for runs in results.values() for r in runs
    )
    checked = sum(
        r.get("safety_checked_grants", r.get("served", 0)) for rs in results.values() for r in rs
    )
    lines.append(
        f"| safety violations (fencing, mutual exclusion) | - | {safety} in {checked:,} grants |"
    )
    other = "; ".join(
        f"{label} " + ", ".join(f"{r['other_cpu_pct']:.0f}" for r in runs)
        for label, runs in results.items()
        if runs and "other_cpu_pct" in runs[0]
    )
    lines += ["", f"Other processes' CPU in the measured windows (% of a core): {other}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per run")
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--only", nargs="*", help="scenario labels to run (default all)")
    parser.add_argument(
        "--quiet",
        type=float,
        default=10.0,
        metavar="PCT",
        help="before each run wait (up to 120 s) for the machine to be under PCT %% busy",
    )
    parser.add_argument("--json", action="store_true", help="print all figures as JSON too")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    for label, script, extra in SCENARIOS:
        if args.only and label not in args.only:
            continue
        if script == "parked_waiters.py":
            extra = [*extra, "--waiters", str(args.waiters)]
        else:
            extra = [*extra, "--duration", str(args.duration)]
        for i in range(args.repeat):
            busy = wait_for_quiet(args.quiet, 120)
            print(
                f"running {label} ({script} {' '.join(extra)}) #{i + 1}; machine {busy:.0f} % busy",
                file=sys.stderr,
            )
            results.setdefault(label, []).append(run_scenario(script, extra, 600))
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    print(markdown(results))
    failed = [r for runs in results.values() for r in runs if r["exit_status"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
