"""One identity cannot take every pool; no secret in the access log; honest log lines."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until
from tests.pki import Pki, make_pki
from tests.test_auth import ADMIN_TOKEN as ADMIN
from tests.test_auth import DB1_TOKEN, TOKENS, WEB1_TOKEN, call, reason, tls_keys, wait_for_log

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_one_identity_gets_its_share_of_max_pools_only(server_factory) -> None:
    server = server_factory("max_pools: 10\nmax_pools_per_identity: 3\nautocreate: true\n" + TOKENS)
    for i in range(3):
        assert call(server, f"/get/?pool=a{i}", DB1_TOKEN).body == "YES"
    for verb in ("get", "wait"):
        answer = call(server, f"/{verb}/?pool=a3&timeout=0", DB1_TOKEN)
        assert (answer.status, answer.body) == (429, "INVALID"), verb
        assert "max_pools_per_identity" in reason(answer)
        assert "'db1'" in reason(answer)
    # Another identity still makes pools, and may join db1's.
    assert call(server, "/get/?pool=b0", ADMIN).body == "YES"
    assert call(server, "/get/?pool=a0", ADMIN).body == "NO"
    # A pool db1 no longer uses is out of its count.
    assert call(server, "/release/?pool=a0", DB1_TOKEN).body == "OK"
    assert call(server, "/release/?pool=a0", ADMIN).body == "OK"
    assert call(server, "/get/?pool=a3", DB1_TOKEN).body == "YES"


def test_the_access_log_has_no_lease_or_bearer_token(server_factory) -> None:
    server = server_factory(
        TOKENS + "pools:\n  - name: pool1\n  - name: shared\n", args=["--access-log"]
    )
    got = call(server, "/get/?pool=pool1&ttl=30", WEB1_TOKEN)
    lease = got.headers["X-Distributex-Lease"]
    assert call(server, f"/renew/?pool=pool1&lease={lease}", WEB1_TOKEN).body == "OK"
    assert call(server, f"/release/?pool=pool1&lease={lease}", WEB1_TOKEN).body == "OK"
    # A client that puts its token in the URL by mistake.
    assert call(server, f"/get/?pool=pool1&token={WEB1_TOKEN}").status == 401
    log = wait_for_log(server, "token=<redacted>")
    assert log.count("lease=<redacted>") == 2, log
    assert lease not in log and WEB1_TOKEN not in log


def test_the_start_up_line_says_when_no_pool_can_be_served(server_factory) -> None:
    server = server_factory("autocreate: false\n")
    log = wait_for_log(server, " serving ")
    assert "pools made on first use" not in log
    assert "no pools (none listed, autocreate off)" in log
    assert "every lock request answers 404" in log
    assert server.call("/get/?host=a&pool=p").status == 404


def test_a_refusal_names_the_client_certificate(server_factory, pki: Pki) -> None:
    server = server_factory(
        tls_keys(pki, client_ca=True) + TOKENS + "pools:\n  - name: pool1\n  - name: shared\n"
    )
    for token, status in ((None, 401), ("not-a-token", 401), (DB1_TOKEN, 403)):
        answer = call(server, "/get/?pool=pool1", token, tls=pki, cert="web1")
        assert answer.status == status, answer
    wait_until(
        lambda: server.log.read_text().count("identity='web1' via=certificate") == 3,
        what="three refusals naming the certificate",
    )
