"""The operator's kit in packaging/: Prometheus alert rules and a Grafana dashboard.

Tested with real parts: promtool checks the rules and runs their unit tests
(packaging/prometheus/distributex-alerts.test.yml, one or more per alert); a
real Prometheus (Debian's package, started here on loopback with a temporary
configuration and data folder) scrapes a running distributex server, loads the
rules and answers every query of the dashboard; and every metric the rules and
the dashboard name is one the server exports on /metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Server, free_port, wait_for_port, wait_until
from tests.test_http import q

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "distributex-alerts.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "distributex-alerts.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "distributex-dashboard.json"

# What each alert of the issue is for: the rule file must keep one of each.
ALERTS = {
    "DistributexLockHeldTooLong",  # a lock held far longer than its pool usually is
    "DistributexQueueGrowing",  # a queue that keeps growing
    "DistributexLeasesLost",  # leases lost
    "DistributexGrantsRefused",  # grants refused (INVALID, UNAVAILABLE)
    "DistributexRequestsRefused",  # refused before a verb ran (auth, limits)
    "DistributexBackendUnhealthy",  # the backend unhealthy
    "DistributexServerDown",  # a server down
}
# Metrics that are Prometheus's own, not the server's.
PROMETHEUS_OWN = {"up"}
CONFIG = """\
pools:
  - name: deploy
    expire: 300
"""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (scripts/test.sh installs Debian's prometheus)")
    return path


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    exprs += [
        v["query"]["query"] for v in doc["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers that are not functions or keywords."""
    template = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip())
    if template:  # Grafana's label_values(selector, label): the label is not a metric
        expr = template.group(1)
    bare = re.sub(r'"[^"]*"', "", expr)  # label values
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    words = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare)
    keywords = {"and", "or", "unless", "bool", "offset"}
    return {w for w in words if w not in keywords}


def exported(server: Server) -> set[str]:
    """Every series name /metrics can carry, from its TYPE lines (also before any sample)."""
    text = server.call("/metrics").body
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = name.removesuffix("_total")
        if kind == "counter":
            names |= {base + "_total"}
        elif kind == "histogram":
            names |= {base + "_bucket", base + "_sum", base + "_count"}
        else:
            names.add(name)
    return names


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_cover_every_alert() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case that expects the alert to fire
    }
    assert tested == ALERTS, f"alerts without a firing unit test: {ALERTS - tested}"
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_metric_name_reader_sees_every_name() -> None:
    # The reader the next test relies on: names in selectors, ranges and bare.
    expr = (
        'max by (pool) (min_over_time(distributex_holders{pool=~"a|b"}[1h])) > 0 and on (pool) '
        "sum by (pool) (increase(distributex_releases_total[1h])) + up == 0 and "
        "histogram_quantile(0.5, sum by (le) (rate(distributex_wait_seconds_bucket[5m])))"
    )
    assert metric_names('label_values(distributex_waiters{job="$job"}, pool)') == {
        "distributex_waiters"
    }
    assert metric_names(expr) == {
        "distributex_holders",
        "distributex_releases_total",
        "up",
        "distributex_wait_seconds_bucket",
    }


def test_rules_and_dashboard_use_only_metrics_the_server_exports(server_factory) -> None:
    server: Server = server_factory(CONFIG)
    names = exported(server)
    used: dict[str, set[str]] = {}
    for rule in rules():
        used[f"rule {rule['alert']}"] = metric_names(rule["expr"])
    for i, expr in enumerate(dashboard_exprs()):
        used[f"dashboard query {i}: {expr}"] = metric_names(expr)
    assert all(used.values()), {k: v for k, v in used.items() if not v}
    everything = set().union(*used.values())
    # The kit reads every lock metric the issue names.
    assert {
        "distributex_grants_total",
        "distributex_wait_seconds_bucket",
        "distributex_holders",
        "distributex_waiters",
        "distributex_refusals_total",
        "distributex_lost_leases_total",
        "distributex_backend_up",
    } <= everything
    unknown = {
        where: sorted(found - names - PROMETHEUS_OWN)
        for where, found in used.items()
        if found - names - PROMETHEUS_OWN
    }
    assert not unknown, f"metrics the server does not export: {unknown}"


class Prometheus:
    def __init__(self, tmp: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (scripts/test.sh installs Debian's package)")
        self.port = free_port()
        rules_copy = tmp / "distributex-alerts.yml"
        rules_copy.write_text(RULES.read_text())
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "rule_files:\n"
            f"  - {rules_copy}\n"
            "scrape_configs:\n"
            "  - job_name: distributex\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, self.proc, timeout=30)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"prometheus did not start: {self.log.read_text()}") from None
        # Its port opens before its storage is ready; the API answers 503 until then.
        wait_until(self.ready, timeout=60, what="Prometheus ready", every=0.2)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:  # HTTPError 503 included
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def test_real_prometheus_scrapes_a_server_and_answers(server_factory, tmp_path: Path) -> None:
    server: Server = server_factory(CONFIG)
    assert server.call(q("get", "alice", "deploy")).body == "YES"
    assert server.call(q("get", "bob", "deploy")).body == "NO"
    prometheus = Prometheus(tmp_path, server.port)
    try:

        def granted() -> bool:
            found = prometheus.query('distributex_grants_total{job="distributex",pool="deploy"}')
            return bool(found) and float(found[0]["value"][1]) == 1.0

        wait_until(granted, timeout=60, what="Prometheus scraped the grant", every=0.2)
        holders = prometheus.query('max by (pool) (distributex_holders{pool="deploy"})')
        assert float(holders[0]["value"][1]) == 1.0
        assert prometheus.query('up{job="distributex"}')[0]["value"][1] == "1"

        # Every dashboard query is valid PromQL there, with the variables filled in.
        for expr in dashboard_exprs():
            if expr.startswith("label_values("):
                continue  # Grafana's own template function, not PromQL
            filled = (
                expr.replace("$__rate_interval", "1m")
                .replace("$job", "distributex")
                .replace("$instance", ".*")
                .replace("$pool", ".*")
            )
            prometheus.query(filled)  # asserts status success

        # The rules load and evaluate without error; none fires on a healthy server.
        def evaluated() -> list[dict[str, Any]] | None:
            groups = prometheus.api("rules")["data"]["groups"]
            found = [rule for group in groups for rule in group["rules"]]
            # lastEvaluation is year 0001 until a rule was first evaluated.
            done = [r for r in found if not r.get("lastEvaluation", "0001").startswith("0001")]
            return found if len(done) == len(ALERTS) else None

        wait_until(evaluated, timeout=30, what="the rules evaluated", every=0.2)
        loaded = evaluated()
        assert loaded is not None
        assert {r["name"] for r in loaded} == ALERTS
        assert all(r["health"] == "ok" for r in loaded), loaded
        assert all(r["state"] == "inactive" for r in loaded), loaded
    finally:
        prometheus.stop()
