"""The lock events' counts as Prometheus reads them (the exposition text, parsed)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from distributex import metrics
from distributex.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = m.render([]).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def bucket(found: dict, pool: str, le: str) -> float:
    return found[("distributex_wait_seconds_bucket", (("le", le), ("pool", pool)))]


def test_a_wait_on_a_bound_counts_in_that_bucket_and_above() -> None:
    m = Metrics()
    m.granted("p", 0.005)  # exactly a bound: le="0.005" counts it (Prometheus: <=)
    m.granted("p", 7200.0)  # past the largest bound: +Inf only
    found = samples(m)
    assert bucket(found, "p", "0.001") == 0
    assert bucket(found, "p", "0.005") == 1
    assert bucket(found, "p", "3600.0") == 1
    assert bucket(found, "p", "+Inf") == 2
    assert found[("distributex_wait_seconds_count", (("pool", "p"),))] == 2
    assert found[("distributex_wait_seconds_sum", (("pool", "p"),))] == 7200.005


def test_every_counter_of_a_pool_shows_once_the_pool_has_an_event() -> None:
    m = Metrics()
    m.expired("q")
    m.released("q")
    m.released("q")
    m.request("wait", 499)
    m.refused(None, 400)
    found = samples(m)
    pool = (("pool", "q"),)
    assert found[("distributex_releases_total", pool)] == 2
    assert found[("distributex_expiries_total", pool)] == 1
    assert found[("distributex_grants_total", pool)] == 0
    assert found[("distributex_requests_total", (("status", "499"), ("verb", "wait")))] == 1
    assert found[("distributex_refusals_total", (("pool", ""), ("reason", "bad_request")))] == 1


def test_pools_past_the_label_cap_are_counted_together(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "MAX_POOL_LABELS", 2)
    m = Metrics(["listed"])
    for pool in ("a", "b", "c", "d", "listed"):
        m.granted(pool, 0.0)
    found = samples(m)
    assert found[("distributex_grants_total", (("pool", "_other"),))] == 2  # c and d
    assert found[("distributex_grants_total", (("pool", "listed"),))] == 1
