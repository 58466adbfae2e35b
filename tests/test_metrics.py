"""Prometheus metrics at /metrics on the control port, scraped from a real proxy."""

from __future__ import annotations

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for

pytestmark = pytest.mark.integration


def scrape(p) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{p.control_url}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_decisions_stages_and_policy_status(proctor_factory, upstream, idp):
    p = proctor_factory()
    reader = idp.token("m-bot", groups=["readers"])
    proxies = {"http": p.proxy_url_with("m-bot", reader)}
    for _ in range(3):
        assert requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10).status_code == 200
    assert requests.delete(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10).status_code == 403
    assert requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": p.proxy_url}, timeout=10).status_code == 407

    m = scrape(p)
    assert value(m, "proctor_decisions_total", action="test.item.read", decision="allow", kind="allowed",
                 enforcement="enforce") == 3
    assert value(m, "proctor_decisions_total", action="test.item.delete", decision="deny", kind="policy",
                 enforcement="enforce") == 1
    assert value(m, "proctor_decisions_total", action="none", decision="deny", kind="authentication",
                 enforcement="enforce") == 1
    assert value(m, "proctor_upstream_responses_total", status_class="2xx") == 3
    for stage in ("authenticate", "classify", "authorize", "decision"):
        assert value(m, "proctor_stage_duration_seconds_count", stage=stage) >= 4
    assert value(m, "proctor_request_duration_seconds_count", decision="allow", enforcement="enforce") == 3
    assert value(m, "proctor_policy_reload_ok") == 1
    revision = httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["active_revision"]
    assert value(m, "proctor_policy_info", revision=revision) == 1
    assert value(m, "proctor_decision_records_total", result="written") >= 5

    # a rejected reload shows up
    (p.policies_dir / "bad.cedar").write_text("permit (")
    wait_for(lambda: value(scrape(p), "proctor_policy_reload_ok") == 0, timeout=10, what="rejected reload in metrics")
    assert value(scrape(p), "proctor_policy_reloads_total", result="rejected") >= 1
