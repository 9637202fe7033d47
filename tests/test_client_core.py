"""The client core's rules, driven by a fake clock: renewal times, loss, re-queueing, answers.

No server and no sockets: :mod:`distributex.client.core` and
:mod:`distributex.client.schedule` decide, given ``now``; these tests play
the server and the passing of time.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distributex.client import core, schedule
from distributex.client.core import Lease, Sent, check_answer, grant_fields
from distributex.client.errors import (
    AuthenticationFailed,
    ConnectionLost,
    LockLost,
    LockRefused,
    LockTimeout,
    ServerUnavailable,
)
from distributex.client.schedule import (
    KEEPER_TICK,
    REQUEUE_FOR,
    REWAIT_PAUSE_MAX,
    Acquisition,
    Lost,
    Renew,
    Renewal,
    Sleep,
)

CALL_TIMEOUT = 10.0
ttls = st.floats(min_value=0.3, max_value=3600, allow_nan=False)
margins = st.one_of(st.none(), st.floats(min_value=0, max_value=0.3))


def lease(ttl: float | None, renewed_at: float = 0.0) -> Lease:
    return Lease("p", "me", 1, "tok", ttl, renewed_at)


# -- the renewal schedule --------------------------------------------------------------------


@given(ttl=ttls, lost_margin=margins, start=st.floats(min_value=0, max_value=1e6))
def test_renewal_is_due_at_a_third_of_the_ttl(
    ttl: float, lost_margin: float | None, start: float
) -> None:
    held = lease(ttl, start)
    plan = Renewal(held, lost_margin)
    due = start + ttl / 3
    assume(due < plan.lost_at())
    now = start
    while True:
        step = plan.step(now, CALL_TIMEOUT)
        if isinstance(step, Renew):
            break
        assert isinstance(step, Sleep)
        assert 0 < step.seconds <= KEEPER_TICK  # never a long sleep: a suspend is noticed
        now += step.seconds
    assert due - 1e-6 <= now <= due + 1e-6 * max(1.0, due)
    # The renewal may take no longer than the time left before silence is loss.
    assert step.budget <= max(schedule.MIN_RENEW_BUDGET, plan.lost_at() - now)
    assert step.budget <= CALL_TIMEOUT


outcomes = st.lists(
    st.tuples(
        st.sampled_from(["ok", "ok", "unreachable", "gone", "refused"]),
        st.floats(min_value=0, max_value=1),  # share of the budget the call took
        st.floats(min_value=0, max_value=5),  # a suspend of the machine after it (seconds)
        st.booleans(),  # whether that suspend happens
    ),
    max_size=40,
)


@settings(max_examples=200)
@given(ttl=st.floats(min_value=0.3, max_value=120), lost_margin=margins, script=outcomes)
def test_a_lease_is_held_only_while_confirmed_and_loss_is_noticed_at_once(
    ttl: float, lost_margin: float | None, script: list[tuple[str, float, float, bool]]
) -> None:
    """Play a server and a clock: whatever happens, the keeper never believes in a lease
    past its confirmed time less the margin, and declares it lost within one tick."""
    held = lease(ttl)
    plan = Renewal(held, lost_margin)
    margin = schedule.margin(held, lost_margin)
    now = 0.0
    answers = iter(script)
    last_failure: float | None = None
    for _ in range(100_000):
        step = plan.step(now, CALL_TIMEOUT)
        if now >= held.confirmed_until - margin:
            assert isinstance(step, Lost), "silence past the deadline must be loss"
        if isinstance(step, Lost):
            assert now >= plan.lost_at()
            assert step.reason.startswith("no renewal confirmed for ")
            return
        if isinstance(step, Sleep):
            # Loss is never slept through: a sleep ends at the deadline at the latest.
            assert now + step.seconds <= plan.lost_at() + 1e-9
            now += step.seconds
            continue
        assert isinstance(step, Renew)
        if last_failure is not None:
            # A failed renewal is retried min(1, ttl/10) later, not sooner.
            assert now >= last_failure + min(1.0, ttl / 10) - 1e-9
        answer, share, pause, suspended = next(answers, ("unreachable", 1.0, 0.0, False))
        sent, now = now, now + share * step.budget
        if answer == "ok":
            held.renewed_at = sent  # the server restarted the TTL no earlier than sending
            plan.renewed()
            last_failure = None
        elif answer == "unreachable":
            plan.failed(ServerUnavailable("cannot reach"), now)
            last_failure = now
        else:
            error = LockLost("gone") if answer == "gone" else LockRefused("not yours", 403)
            lost = plan.refused(error)
            assert lost.reason == ("gone" if answer == "gone" else "renewal refused: not yours")
            return
        if suspended:
            now += pause
    pytest.fail("the schedule never ended")


def test_a_lease_without_expiry_is_never_lost_by_silence() -> None:
    held = lease(0)
    plan = Renewal(held)
    assert plan.lost_at() == math.inf
    assert plan.expired(1e9) is None
    step = plan.step(1e9, CALL_TIMEOUT)
    assert isinstance(step, Renew)  # only checked for GONE (every NO_EXPIRY_CHECK)


@given(ttl=ttls, lost_margin=margins, late=st.floats(min_value=0, max_value=1e4))
def test_expired_has_one_wording(ttl: float, lost_margin: float | None, late: float) -> None:
    held = lease(ttl)
    plan = Renewal(held, lost_margin)
    lost = plan.expired(plan.lost_at() + late)
    assert lost is not None and lost.reason.startswith("no renewal confirmed for ")
    plan.failed(ServerUnavailable("refused"), 0.0)
    again = plan.expired(plan.lost_at() + late)
    assert again is not None and "server unreachable: refused" in again.reason


# -- waiting for a lock, and asking again ------------------------------------------------------


events = st.lists(
    st.tuples(
        st.sampled_from(["lost", "unreachable", "no", "yes"]),
        st.floats(min_value=0, max_value=30),  # seconds the call took
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300)
@given(
    timeout=st.one_of(st.none(), st.floats(min_value=0, max_value=600)),
    wait=st.booleans(),
    script=events,
)
def test_asking_again_keeps_to_the_deadline_and_the_requeue_limit(
    timeout: float | None, wait: bool, script: list[tuple[str, float]]
) -> None:
    now = 1000.0
    plan = Acquisition("p", "me", timeout, None, wait, CALL_TIMEOUT, now)
    deadline = None if timeout is None else now + timeout
    lost_since: float | None = None
    untimed_pauses: list[float] = []
    for kind, took in script:
        request = plan.request(now)
        assert request.verb == ("wait" if wait else "get")
        if wait and deadline is not None:
            left = max(0.0, deadline - now)
            assert float(request.params["timeout"] or "nan") == pytest.approx(left)
            assert request.budget == pytest.approx(left + CALL_TIMEOUT)
        if wait and deadline is None:
            assert request.budget is None and "timeout" not in {
                k for k, v in request.params.items() if v is not None
            }
        now += took
        try:
            if kind in ("lost", "unreachable"):
                exc = ConnectionLost("gone") if kind == "lost" else ServerUnavailable("refused")
                again = plan.unreachable(exc, now)
                if lost_since is None:
                    assert kind == "lost", "a server not reached at first is an error at once"
                    lost_since = now
                assert now - lost_since <= REQUEUE_FOR
                assert deadline is None or now + again.pause < deadline
                assert 0 < again.pause <= REWAIT_PAUSE_MAX
            else:
                word = "YES" if kind == "yes" else "NO"
                answer = plan.answered(200, word, {}, None, now)
                lost_since = None
                if answer is None:
                    assert kind == "yes"
                    return
                assert wait, "a /get/ answered NO is busy, not asked again"
                if deadline is None:
                    untimed_pauses.append(answer.pause)
                else:
                    assert answer.pause == 0 and deadline - now >= schedule.MIN_REWAIT
        except LockTimeout:
            assert kind == "no" or deadline is not None
            if kind == "no":
                assert not wait or (deadline is not None and deadline - now < schedule.MIN_REWAIT)
            return
        except ServerUnavailable:
            assert kind in ("lost", "unreachable")
            first = lost_since is None
            assert (
                not wait
                or (first and kind == "unreachable")
                or (lost_since is not None and now - lost_since > REQUEUE_FOR)
                or deadline is not None  # the next try would come too late
            )
            return
    # Untimed NOs back off: doubling, never above the maximum, never a hot loop.
    for first, second in itertools.pairwise(untimed_pauses):
        assert second == min(REWAIT_PAUSE_MAX, first * 2)


def test_a_long_wait_is_pinned_by_a_renewal() -> None:
    plan = Acquisition("p", "me", None, 30, True, CALL_TIMEOUT, 0.0)
    plan.request(0.0)
    headers = {"x-distributex-fence": "7", "x-distributex-lease": "abc", "x-distributex-ttl": "30"}
    granted = plan.lease(headers)
    assert (granted.fence, granted.token, granted.ttl, granted.renewed_at) == (7, "abc", 30, 0)
    assert not plan.needs_pin(granted, 2.9)  # within a tenth of the TTL: the grant is tight
    assert plan.needs_pin(granted, 3.1)


# -- reading answers ---------------------------------------------------------------------------


def test_answers() -> None:
    assert check_answer("get", 200, "YES", {}) == "YES"
    assert check_answer("get", 200, "NO\n", {}) == "NO"
    assert check_answer("release", 200, "OK", {}) == "OK"
    assert check_answer("renew", 410, "GONE", {}) == "GONE"
    with pytest.raises(LockRefused) as refused:
        check_answer("get", 404, "INVALID", {"x-distributex-reason": "unknown pool 'x'"})
    assert (refused.value.status, refused.value.reason) == (404, "unknown pool 'x'")
    with pytest.raises(ServerUnavailable, match="cannot answer now"):
        check_answer("get", 503, "UNAVAILABLE", {"x-distributex-reason": "backend down"})
    with pytest.raises(ServerUnavailable, match="not a distributex server"):
        check_answer("get", 200, "<html>", {})


@pytest.mark.parametrize(
    ("reason", "sent", "named"),
    [
        ("a client certificate is required (mutual TLS)", Sent(True, False), "--cert and --key"),
        ("authentication required: send 'Authorization: Bearer TOKEN'", Sent(False, True),
         "DISTRIBUTEX_TOKEN or --token-file"),
        ("token not recognised", Sent(True, True), "not one the server knows"),
    ],
)  # fmt: skip
def test_a_401_names_the_missing_credential(reason: str, sent: Sent, named: str) -> None:
    with pytest.raises(AuthenticationFailed) as failed:
        check_answer("get", 401, "INVALID", {"x-distributex-reason": reason}, sent)
    assert named in str(failed.value) and "\n" not in str(failed.value)


def test_a_0_7_grant_has_no_lease() -> None:
    """0.7 answers a bare YES: no fence, token or TTL; released by host, never renewed."""
    plan = Acquisition("p", "me", None, None, True, CALL_TIMEOUT, 0.0)
    plan.request(0.0)
    assert plan.answered(200, "YES", {}, None, 0.5) is None
    granted = plan.lease({})
    assert (granted.fence, granted.token, granted.ttl) == (None, None, None)
    assert granted.confirmed_until == math.inf
    assert core.release_request(granted, 5).params == {"host": "me", "pool": "p"}
    with pytest.raises(ValueError, match=r"0\.7 server"):
        core.renew_request(granted, None, 5)


@given(token=st.text(max_size=20))
def test_lease_headers_are_checked(token: str) -> None:
    headers = {"x-distributex-fence": "3", "x-distributex-lease": token, "x-distributex-ttl": "9"}
    printable = len(token) > 0 and all("!" <= ch <= "~" for ch in token)
    if printable or token == "":
        assert grant_fields(headers)[1] == (token or None)
    else:
        with pytest.raises(ServerUnavailable, match="malformed lease headers"):
            grant_fields(headers)


def test_requests_carry_the_token_and_never_an_empty_parameter() -> None:
    assert core.headers("s3cr3t")["Authorization"] == "Bearer s3cr3t"
    assert "Authorization" not in core.headers(None)
    request = core.release_host_request(None, "p", 5)
    assert request.query() == "pool=p" and request.path == "/release/"
