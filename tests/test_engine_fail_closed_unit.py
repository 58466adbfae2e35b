"""Adapter-level: an exception inside a gating hook refuses the flow (mitmproxy would otherwise continue it)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import tflow

from proxy.engine.mitm import ProctorAddon


class _Recorder:
    def __init__(self):
        self.records = []

    def write(self, rec):
        self.records.append(rec)


class _ExplodingPipeline:
    classifier = None

    async def decide(self, req):
        raise AssertionError("decide must not be reached")

    async def admit_tunnel(self, req):
        raise RuntimeError("simulated bug in admission")


@pytest.fixture
def addon(monkeypatch):
    a = ProctorAddon(_ExplodingPipeline(), _Recorder(), router=None)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug in the adapter")

    monkeypatch.setattr(a, "_agent_request", boom)
    return a


def test_request_hook_exception_refuses_with_503(addon):
    flow = tflow.tflow()
    asyncio.run(addon.request(flow))
    assert flow.response is not None and flow.response.status_code == 503
    body = json.loads(flow.response.content)
    assert body["decision_id"] and body["title"] == "Proctor could not decide"
    assert addon.recorder.records[-1]["status"] == 503
    assert addon.recorder.records[-1]["decision"] == "deny"


def test_connect_hook_exception_refuses_and_binds_nothing(addon):
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    asyncio.run(addon.http_connect(flow))
    assert flow.response.status_code == 503
    assert flow.client_conn not in addon.tunnel_identity


def test_next_layer_exception_closes_and_records(addon, monkeypatch):
    from mitmproxy.proxy import layer
    from mitmproxy.test import tflow as tf

    from proxy.engine.mitm import _RefuseConnection

    class Ctx:
        layers = []
        client = tf.tclient_conn()

    nl = layer.NextLayer.__new__(layer.NextLayer)
    nl.context = Ctx()
    nl.layer = object()  # NextLayer chose something; our check then blows up
    monkeypatch.setattr(addon, "_next_layer", lambda _nl: (_ for _ in ()).throw(RuntimeError("simulated")))
    monkeypatch.setattr(_RefuseConnection, "__init__", lambda self, ctx, reply: None)
    addon.next_layer(nl)
    assert isinstance(nl.layer, _RefuseConnection)
    assert addon.recorder.records[-1]["error"] == "internal error in next_layer"


def test_a_tracing_failure_never_changes_the_decision():
    from proxy.core.model import Decision
    from proxy.core.pipeline import new_outcome

    class _AllowingPipeline:
        classifier = None

        async def decide(self, req):
            outcome = new_outcome()
            outcome.decision = Decision.ALLOW
            return outcome

    class _BrokenTracing:
        enabled = True

        def start_request(self, *args, **kwargs):
            raise RuntimeError("exporter exploded")

    a = ProctorAddon(_AllowingPipeline(), _Recorder(), router=None, tracing=_BrokenTracing())
    flow = tflow.tflow()
    asyncio.run(a.request(flow))
    assert flow.response is None  # still allowed and forwarded, not a 503
