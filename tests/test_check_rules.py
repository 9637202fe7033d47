"""The history checker's rules on small hand-made histories (pure: no servers)."""

from __future__ import annotations

from distributex.check import rules
from distributex.check.history import History, LeaseRecord, Refusal


def lease(
    client: str, got: float, end: float, fence: int, pool: str = "mutex", sent: float | None = None
) -> LeaseRecord:
    asked = got if sent is None else sent
    return LeaseRecord(client, pool, fence, f"t{fence}", 10.0, asked, got, asked, end)


def findings(records: list[LeaseRecord], maxlocks: dict[str, int], **kw) -> list[rules.Finding]:
    return rules.check(History(leases=records, started=0.0, **kw), maxlocks)


def test_a_good_history_has_no_findings() -> None:
    records = [lease("a", 0.0, 1.0, 1), lease("b", 1.0, 2.0, 2), lease("a", 2.5, 3.0, 3)]
    assert findings(records, {"mutex": 1}) == []
    # One client's leases may overlap: asking again while holding is one hold.
    assert findings([lease("a", 0.0, 2.0, 1), lease("a", 1.0, 3.0, 1)], {"mutex": 1}) == []


def test_two_holders_at_once_are_named() -> None:
    found = findings([lease("a", 0.0, 2.0, 1), lease("b", 1.0, 3.0, 2)], {"mutex": 1})
    assert [f.rule for f in found] == [rules.SAFETY]
    assert "a fence 1 (0.000s-2.000s)" in found[0].message
    assert "b fence 2 (1.000s-3.000s)" in found[0].message
    assert [r.client for r in found[0].leases] == ["a", "b"]


def test_a_semaphore_allows_its_maxlocks_and_no_more() -> None:
    two = [lease("a", 0.0, 3.0, 1, "sem"), lease("b", 1.0, 3.0, 2, "sem")]
    assert findings(two, {"sem": 2}) == []
    found = findings([*two, lease("c", 2.0, 4.0, 3, "sem")], {"sem": 2})
    assert [f.rule for f in found] == [rules.SAFETY]
    assert "3 holders > maxlocks 2" in found[0].message


def test_fences_that_go_back_or_are_shared() -> None:
    back = findings([lease("a", 0.0, 1.0, 5), lease("b", 2.0, 3.0, 4)], {"mutex": 1})
    assert rules.FENCING in {f.rule for f in back}
    assert "fence went back" in back[0].message
    shared = findings([lease("a", 0.0, 1.0, 5), lease("b", 2.0, 3.0, 5)], {"mutex": 1})
    assert any("given to two owners" in f.message for f in shared)


def test_grant_order_in_a_semaphore() -> None:
    # b asked after a's YES arrived, so its grant came later: its fence must be higher.
    records = [lease("a", 1.0, 5.0, 5, "sem"), lease("b", 2.1, 5.0, 4, "sem", sent=2.0)]
    assert [f.rule for f in findings(records, {"sem": 2})] == [rules.FENCING]
    # Asked before a's YES arrived: either order is right.
    records[1] = lease("b", 2.1, 5.0, 4, "sem", sent=0.5)
    assert findings(records, {"sem": 2}) == []
    # A call of b's failed before: it may hold a slot granted earlier that it never saw.
    records[1] = lease("b", 2.1, 5.0, 4, "sem", sent=2.0)
    assert findings(records, {"sem": 2}, faults=[(1.5, "b")]) == []


def test_a_long_wait_refused_is_starvation_unless_something_failed() -> None:
    refused = [Refusal("a", "mutex", 37.0, 1.0, 38.0)]
    found = findings([], {"mutex": 1}, long_waits_refused=refused)
    assert [f.rule for f in found] == [rules.LIVENESS]
    assert findings([], {"mutex": 1}, long_waits_refused=refused, faults=[(20.0, "c")]) == []
    # A failure before the wait was sent does not excuse it.
    assert findings([], {"mutex": 1}, long_waits_refused=refused, faults=[(0.5, "c")])


def test_a_released_lease_renewed_again_and_one_gone_early() -> None:
    found = findings([], {"mutex": 1}, released_came_back=[("mutex", "abcdef0123")])
    assert [f.rule for f in found] == [rules.DURABILITY]
    history = History(gone_while_valid=[("a", "mutex", 3)])
    assert [f.rule for f in rules.check(history, {"mutex": 1})] == [rules.DURABILITY]
    assert rules.check(history, {"mutex": 1}, durable=False) == []


def test_every_client_granted_when_asked() -> None:
    found = rules.check(History(leases=[lease("c0", 0.0, 1.0, 1)]), {"mutex": 1}, clients=2)
    assert [f.message for f in found] == ["never granted: c1"]
