"""Adapter-level: an exception inside a gating hook refuses the flow (mitmproxy would otherwise continue it).

The chains here are real `Chain`s of small fake stages; the record stage is the
real one, writing to an in-memory recorder.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import tflow

from proxy.config import RequestLimits
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import Exchange
from proxy.engine.mitm import ProctorAddon
from proxy.record.stage import RecordDecision


class _Recorder:
    def __init__(self):
        self.records = []

    def write(self, rec):
        self.records.append(rec.to_dict())  # the typed record as its line says it


class _Allow(Stage):
    name = "allow"

    def on_request(self, ex: Exchange) -> None:
        pass


class _Explode(Stage):
    name = "explode"

    def on_request(self, ex: Exchange) -> None:
        raise RuntimeError("simulated bug in admission")


def _addon(request_stages=(), tunnel_stages=()):
    recorder = _Recorder()
    record = RecordDecision(recorder)
    a = ProctorAddon(Chain([record, *request_stages]), Chain([record, *tunnel_stages]), router=None,
                     limits=RequestLimits())
    return a, recorder


@pytest.fixture
def addon(monkeypatch):
    a, recorder = _addon([_Allow()], [_Explode()])

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug in the adapter")

    monkeypatch.setattr(a, "_agent_request", boom)
    a.recorder = recorder
    return a


def test_request_hook_exception_refuses_with_503(addon):
    flow = tflow.tflow()
    asyncio.run(addon.request(flow))
    assert flow.response is not None and flow.response.status_code == 503
    body = json.loads(flow.response.content)
    assert body["decision_id"] and body["title"] == "Proctor could not decide"
    assert addon.recorder.records[-1]["status"] == 503
    assert addon.recorder.records[-1]["decision"] == "deny"
    assert addon.recorder.records[-1]["error"] == "internal error in request"


def test_connect_admission_exception_refuses_and_binds_nothing(addon):
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    asyncio.run(addon.http_connect(flow))
    assert flow.response.status_code == 503
    assert flow.client_conn not in addon.tunnel_identity
    assert addon.recorder.records[-1]["status"] == 503


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


def test_a_stage_exception_refuses_the_flow_with_503_and_records_it():
    a, recorder = _addon([_Explode()])
    flow = tflow.tflow()
    asyncio.run(a.request(flow))
    assert flow.response is not None and flow.response.status_code == 503
    assert recorder.records[-1]["decision"] == "deny" and recorder.records[-1]["status"] == 503
    assert any("simulated bug" in e for e in recorder.records[-1]["errors"])


def test_a_tracing_failure_never_changes_the_decision():
    from proxy.observability.stages import Trace

    class _BrokenTracing:
        enabled = True

        def start_request(self, *args, **kwargs):
            raise RuntimeError("exporter exploded")

    a, recorder = _addon([Trace(_BrokenTracing()), _Allow()])
    flow = tflow.tflow()
    asyncio.run(a.request(flow))
    assert flow.response is None  # still allowed and forwarded, not a 503


def test_a_local_reply_is_sent_instead_of_forwarding_and_recorded_once():
    from proxy.core.exchange import LocalReply

    class Replay(Stage):
        name = "replay"

        def on_request(self, ex: Exchange) -> None:
            ex.reply_locally(LocalReply(201, {"Content-Type": "application/json", "Idempotent-Replayed": "true"},
                                        b'{"id":"7"}', "idempotent-replay"))

    a, recorder = _addon([Replay()])
    flow = tflow.tflow()
    asyncio.run(a.request(flow))
    assert flow.response is not None and flow.response.status_code == 201
    assert flow.response.content == b'{"id":"7"}' and flow.response.headers["Idempotent-Replayed"] == "true"
    assert flow.response.headers["X-Proctor-Decision-Id"] == recorder.records[-1]["decision_id"]
    asyncio.run(a.response(flow))  # mitmproxy still calls the response hook: nothing more is recorded
    assert len(recorder.records) == 1 and recorder.records[0]["decision"] == "allow"
    assert recorder.records[0]["status"] == 201 and recorder.records[0]["upstream_status"] is None
