"""The check's report: what the clients did, what they were granted, and what broke (plain text)."""

from __future__ import annotations

from distributex.check import rules
from distributex.check.history import History
from distributex.check.rules import Finding

MAX_LISTED = 20  # findings listed per rule; the rest are counted


def text(history: History, findings: list[Finding], pool: str, maxlocks: int, seed: int) -> str:
    by_rule: dict[str, list[Finding]] = {}
    for finding in findings:
        by_rule.setdefault(finding.rule, []).append(finding)
    ops = ", ".join(f"{kind} {n}" for kind, n in sorted(history.operations.items()))
    fences = sorted(r.fence for r in history.leases)
    granted = {r.client for r in history.leases}
    lines = [
        f"pool {pool}: maxlocks {maxlocks}, seed {seed}",
        f"operations: {history.calls} calls ({ops or 'none'})",
        f"grants: {len(history.leases)} leases to {len(granted)} clients"
        + (f", fences {fences[0]}..{fences[-1]}" if fences else ""),
        "overlaps: " + _verdict(by_rule, rules.SAFETY, "none (never more than maxlocks holders)"),
    ]
    lines += _listed(by_rule.get(rules.SAFETY, []))
    lines.append(
        "fence order: " + _verdict(by_rule, rules.FENCING, "held (increasing with grants)")
    )
    lines += _listed(by_rule.get(rules.FENCING, []))
    lines.append(
        f"refused waits: {len(history.long_waits_refused)} long waits answered NO, "
        + _verdict(by_rule, rules.LIVENESS, "none starved (each refusal met a fault)")
        if history.long_waits_refused
        else "refused waits: none of the long waits answered NO"
    )
    lines += _listed(by_rule.get(rules.LIVENESS, []))
    if rules.DURABILITY in by_rule:
        lines.append("released leases: " + _verdict(by_rule, rules.DURABILITY, ""))
        lines += _listed(by_rule[rules.DURABILITY])
    lines.append(
        f"errors: {history.errors} calls without an answer, {history.unavailable} answered 503 "
        "(uncertain: counted, not violations)"
    )
    if history.gone_while_valid:
        lines.append(
            f"leases ended early: {len(history.gone_while_valid)} renewals answered GONE before "
            "the lease could have run out (the store lost state?)"
        )
    for reason, n in history.refused.most_common(5):
        lines.append(f"refused: {n} x {reason}")
    if findings:
        lines.append(f"result: VIOLATION ({len(findings)} findings)")
    elif history.leases:
        lines.append("result: the rules held")
    else:
        lines.append("result: nothing proven (no lease granted)")
    return "\n".join(lines) + "\n"


def _verdict(by_rule: dict[str, list[Finding]], rule: str, fine: str) -> str:
    found = by_rule.get(rule, [])
    return f"{len(found)} VIOLATION(S)" if found else fine


def _listed(found: list[Finding]) -> list[str]:
    lines = [f"  {finding.pool}: {finding.message}" for finding in found[:MAX_LISTED]]
    if len(found) > MAX_LISTED:
        lines.append(f"  ... and {len(found) - MAX_LISTED} more")
    return lines
