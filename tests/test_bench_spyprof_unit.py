"""bench/spyprof.py: py-spy samples are attributed to the right part of the request path.

The benchmark's "what dominates" tables (docs/performance.md) are only as good as
these rules, and the engines wrap each other's frames in ways that are easy to
misattribute (the aiohttp server sits below every handler frame; Proctor's
mitmproxy patches sit below most of mitmproxy's own work). Synthetic stacks in
py-spy's raw format, outermost frame first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import spyprof  # noqa: E402

LOOP = "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80)"
AIO_SERVER = f"{LOOP};RequestHandler.start (aiohttp/web_protocol.py:656);RequestHandler._handle_request (aiohttp/web_protocol.py:480)"
HANDLER = f"{AIO_SERVER};AiohttpGateway._handle (proxy/engine/aiohttp_gateway.py:420);AiohttpGateway._serve (proxy/engine/aiohttp_gateway.py:450)"


def _category(tmp_path: Path, stack: str, engine: str) -> str:
    raw = tmp_path / "raw.txt"
    raw.write_text(f"{stack} 7\n")
    shares = spyprof.categorise(raw, engine)["shares"]
    hit = [row["category"] for row in shares if row["share"] > 0]
    assert len(hit) == 1 and sum(row["share"] for row in shares) == pytest.approx(100.0)
    return hit[0]


@pytest.mark.parametrize("stack, expected", [
    # a stage under the adapter: the stage's
    (f"{HANDLER};Chain.request (proxy/core/chain.py:120);Authorize.on_request (proxy/policy/stage.py:60);"
     "PolicyStore.authorize (proxy/policy/engine.py:353);is_authorized_batch (cedarpy/__init__.py:324)",
     "Cedar evaluation"),
    (f"{HANDLER};Chain.response (proxy/core/chain.py:140);RecordDecision.on_response (proxy/record/stage.py:30);"
     "JSONEncoder.iterencode (json/encoder.py:258)", "Decision record"),
    # the adapter calling the upstream client: the client's
    (f"{HANDLER};AiohttpGateway._forward (proxy/engine/aiohttp_gateway.py:600);"
     "ClientSession._request (aiohttp/client.py:700);ClientRequest.send (aiohttp/client_reqrep.py:900)",
     "aiohttp client"),
    # the adapter building the answer object: aiohttp's answer writing
    (f"{HANDLER};AiohttpGateway._relay (proxy/engine/aiohttp_gateway.py:700);Response.__init__ (aiohttp/web_response.py:600)",
     "aiohttp server: building and writing"),
    # the adapter's own code (a library helper it calls stays the adapter's)
    (f"{HANDLER};AiohttpGateway._upstream_url (proxy/engine/aiohttp_gateway.py:590);URL.build (yarl/_url.py:300)",
     "Gateway adapter's own code"),
    (f"{HANDLER};AiohttpGateway._routed (proxy/engine/aiohttp_gateway.py:410);"
     "AiohttpGateway._agent_request (proxy/engine/aiohttp_gateway.py:390);_headers (proxy/engine/aiohttp_gateway.py:70)",
     "Request build in the engine adapter"),
    # aiohttp parsing under the adapter's data_received override: aiohttp's, not the adapter's
    (f"{LOOP};_SelectorSocketTransport._read_ready (asyncio/selector_events.py:990);"
     "_GatewayProtocol.data_received (proxy/engine/aiohttp_gateway.py:200);"
     "RequestHandler.data_received (aiohttp/web_protocol.py:400)", "aiohttp server: connection protocol"),
    (f"{LOOP};_SelectorSocketTransport.write (asyncio/selector_events.py:1057)", "asyncio event loop"),
])
def test_aiohttp_gateway_attribution(tmp_path: Path, stack: str, expected: str) -> None:
    assert _category(tmp_path, stack, "aiohttp").startswith(expected)


MITM_CONN = (f"{LOOP};_handle_connection_with_limits (proxy/engine/patches.py:90);"
             "ConnectionHandler.server_event (mitmproxy/proxy/server.py:400)")


@pytest.mark.parametrize("stack, expected", [
    # mitmproxy's own parsing below a patched method: mitmproxy's
    (f"{MITM_CONN};_bounded_read_headers (proxy/engine/patches.py:125);"
     "read_request_head (mitmproxy/net/http/http1/read.py:262);check_option_type (mitmproxy/utils/typecheck.py:27)",
     "mitmproxy HTTP/1 parsing"),
    (f"{MITM_CONN};Layer.handle_event (mitmproxy/proxy/layer.py:157)", "mitmproxy proxy layers"),
    # the patch's own code
    (f"{MITM_CONN};Layer.handle_event (mitmproxy/proxy/layer.py:157);_bounded_read_headers (proxy/engine/patches.py:130)",
     "Proctor's engine patches"),
    # the addon, and a mitmproxy helper it calls: the addon's
    (f"{LOOP};ProctorAddon.request (proxy/engine/mitm.py:220);ProctorAddon._request (proxy/engine/mitm.py:410);"
     "Request.authority (mitmproxy/http.py:600)", "Proctor's mitmproxy addon"),
    (f"{LOOP};ProctorAddon.request (proxy/engine/mitm.py:220);Chain.request (proxy/core/chain.py:120);"
     "Classify.on_request (proxy/connectors/stages.py:80)", "Classification"),
])
def test_mitmproxy_attribution(tmp_path: Path, stack: str, expected: str) -> None:
    assert _category(tmp_path, stack, "mitmproxy").startswith(expected)


def test_engine_categories_are_split_into_proctor_and_engine() -> None:
    for engine in ("mitmproxy", "aiohttp"):
        names = [name for name, _ in spyprof.categories(engine)]
        assert len(names) == len(set(names))
        assert spyprof.ADAPTER_CATEGORIES & set(names) <= spyprof.PROCTOR_CATEGORIES
        assert any(name not in spyprof.PROCTOR_CATEGORIES for name in names)  # the engine underneath
