"""OpenTelemetry: spans with decision attributes, and the agent's trace joined to the upstream's."""

from __future__ import annotations

import re
import time

import pytest
import requests

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
OTEL_ENV = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "proctor-test", "OTEL_BSP_SCHEDULE_DELAY": "100"}


def test_trace_joins_agent_and_upstream(proctor_factory, upstream, reader_token):
    p = proctor_factory(env=OTEL_ENV)
    upstream.clear()
    proxies = {"http": p.proxy_url_with("reader-bot", reader_token)}
    r = requests.get(
        f"http://127.0.0.1:{upstream.port}/items/1",
        headers={"traceparent": f"00-{TRACE_ID}-{AGENT_SPAN}-01", "baggage": "tenant=acme"},
        proxies=proxies,
        timeout=10,
    )
    assert r.status_code == 200
    h = upstream.headers_of(upstream.last())
    version, trace_id, parent, flags = h["traceparent"].split("-")
    assert trace_id == TRACE_ID  # the upstream continues the agent's trace ...
    assert parent != AGENT_SPAN  # ... as a child of Proctor's client span
    assert "tenant=acme" in h["baggage"]

    denied = requests.delete(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10)
    assert denied.status_code == 403

    def spans_exported() -> str:
        return p.log()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and denied.headers["x-proctor-decision-id"] not in spans_exported():
        time.sleep(0.1)
    log = spans_exported()
    decision_id = r.headers["x-proctor-decision-id"]
    assert f'"proctor.decision_id": "{decision_id}"' in log
    assert f'"trace_id": "0x{TRACE_ID}"' in log
    for name in ("proctor.authenticate", "proctor.classify", "proctor.authorize"):
        assert f'"name": "{name}"' in log
    assert '"proctor.decision": "deny"' in log and '"no-item-deletes"' in log
    assert '"gen_ai.agent.id": "reader-bot"' in log
    assert '"service.name": "proctor-test"' in log
    # no credential or query in any span
    assert reader_token not in log and reader_token.split(".")[2] not in log


def test_tracing_off_by_default_leaves_trace_headers_alone(proctor, upstream, reader_token):
    upstream.clear()
    tp = f"00-{TRACE_ID}-{AGENT_SPAN}-01"
    r = requests.get(
        f"http://127.0.0.1:{upstream.port}/items/1",
        headers={"traceparent": tp},
        proxies={"http": proctor.proxy_url_with("reader-bot", reader_token)},
        timeout=10,
    )
    assert r.status_code == 200
    assert upstream.headers_of(upstream.last())["traceparent"] == tp
    assert not re.search(r'"trace_id": "0x', proctor.log())
