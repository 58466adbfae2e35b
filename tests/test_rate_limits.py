"""Rate limits through real proxies (docs/limits.md): N concurrent requests against a limit of M
let exactly M through on SQLite, on PostgreSQL shared by two proxy processes and on Redis shared
by two proxies; the 429 (problem+json, Retry-After, RateLimit fields) and the RateLimit fields on
2xx and on policy refusals; denied calls count; a real client honouring Retry-After gets through;
shadow limits forward and record; fail open and fail closed with the Redis counters down;
context.usage seen by Cedar; the control API and the metrics; the official OpenAI SDK raising
RateLimitError on the bundled LLM connector."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import requests
import yaml
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from conftest import DATA, GATEWAY_ENGINES, ROOT, Proctor, _start_upstream, free_port, start_proctor, wait_for
from test_limits_backends import REDIS_SKIP, REDIS_URL, SKIP_REDIS, _redis_cleanup
from test_llm_connector import PROVIDER_KEY, Stub
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = pytest.mark.integration

READS = {"actions": ["test.item.read"]}


def limits(*items: dict) -> dict:
    return {"rate_limits": list(items)}


def get(p: Proctor, token: str, path: str = "/svc/items/1", **kw) -> httpx.Response:
    return httpx.get(f"{p.gateway_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw)


def concurrently(calls: list) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: c(), calls))


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def metric(p: Proctor, name: str, **labels: str) -> float:
    text = httpx.get(f"{p.control_url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    raise AssertionError(f"{name}{{{want}}} not exported")


def records(p: Proctor, ids: list[str]) -> list[dict]:
    wait_for(lambda: all(any(d.get("decision_id") == i for d in p.decisions()) for i in ids), timeout=10,
             what="decision records")
    return [p.decision(i) for i in ids]


# ------------------------------------------------------------------ SQLite, one proxy
def test_exactly_m_of_n_pass_and_every_answer_says_so(proctor_factory, idp, upstream) -> None:
    p = proctor_factory(limits(
        {"name": "item-reads", "limit": 7, "period": "1h", "match": READS},
        {"name": "item-deletes", "limit": 2, "period": "1h", "match": {"actions": ["test.item.delete"]}},
    ))
    token = idp.token("loop-bot")
    upstream.clear()
    answers = concurrently([lambda: get(p, token) for _ in range(30)])
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 7 + [429] * 23
    assert len([e for e in upstream.received() if e["path"] == "/items/1"]) == 7
    ok = next(a for a in answers if a.status_code == 200)
    assert ok.headers["RateLimit-Policy"] == '"item-reads";q=7;w=3600'
    assert re.fullmatch(r'"item-reads";r=[0-6];t=\d+', ok.headers["RateLimit"])
    throttled = next(a for a in answers if a.status_code == 429)
    assert throttled.headers["Content-Type"] == "application/problem+json"
    retry = int(throttled.headers["Retry-After"])
    assert 500 <= retry <= 515  # one of 7 per hour comes back every 514.3 s
    assert re.fullmatch(r'"item-reads";r=0;t=\d+', throttled.headers["RateLimit"])
    assert throttled.headers["RateLimit-Policy"] == '"item-reads";q=7;w=3600'
    body = throttled.json()
    assert body["type"].endswith("/rate-limited") and body["status"] == 429
    assert body["reasons"] == ["rate-limit:item-reads"] and body["action"] == "test.item.read"
    assert body["rate_limit"]["name"] == "item-reads" and body["rate_limit"]["key"] == {"agent": "loop-bot"}
    assert body["rate_limit"]["retry_after"] == retry and f"Retry after {retry} seconds" in body["detail"]
    # another agent has its own counter
    assert get(p, idp.token("calm-bot")).status_code == 200
    # the records: 23 throttles with the refusal kind and the limit; the allowed ones with what is left
    recs = records(p, [a.headers["X-Proctor-Decision-Id"] for a in answers])
    refused = [r for r in recs if r["status"] == 429]
    assert len(refused) == 23 and all(r["refusal"]["kind"] == "rate-limited" and r["decision"] == "deny"
                                      and r["rate_limit"]["outcome"] == "throttled" for r in refused)
    allowed = [r for r in recs if r["status"] == 200]
    assert sorted(r["rate_limit"]["remaining"] for r in allowed) == list(range(7))
    assert len({r["rate_limit"]["key"] for r in recs}) == 1 and "loop-bot" not in recs[0]["rate_limit"]["key"]
    # denied calls count too: a loop of forbidden deletes is throttled after the limit, and every
    # refusal carries the fields
    denied = [httpx.delete(f"{p.gateway_url}/svc/items/9", headers={"Authorization": f"Bearer {token}"}, timeout=10)
              for _ in range(3)]
    assert [d.status_code for d in denied] == [403, 403, 429]
    assert denied[0].headers["RateLimit"].startswith('"item-deletes";r=1;t=')
    assert denied[1].json()["reasons"] == ["no-item-deletes"] and denied[1].headers["RateLimit-Policy"].startswith(
        '"item-deletes";q=2')
    # metrics (limit names only, never keys) and the control API
    assert metric(p, "proctor_rate_limited_total", limit="item-reads", outcome="allowed") == 8
    assert metric(p, "proctor_rate_limited_total", limit="item-reads", outcome="throttled") == 23
    assert metric(p, "proctor_rate_limited_total", limit="item-deletes", outcome="throttled") == 1
    assert metric(p, "proctor_rate_limited_total", limit="item-reads", outcome="unavailable") == 0
    assert metric(p, "proctor_decisions_total", action="test.item.read", decision="deny", kind="rate-limited",
                  enforcement="enforce") == 23
    api = httpx.get(f"{p.control_url}/v1/rate-limits", params={"agent": "loop-bot"},
                    headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=10)
    assert api.status_code == 200, api.text
    doc = api.json()
    assert doc["backend"] == "sqlite" and doc["counters_available"]
    reads = next(x for x in doc["limits"] if x["name"] == "item-reads")
    assert reads["counts"] == {"allowed": 8, "throttled": 23, "shadow_throttled": 0, "unavailable": 0}
    assert reads["source"] == "config" and reads["match"]["actions"] == ["test.item.read"] and reads["key"] == ["agent"]
    assert reads["state"]["key"] == {"agent": "loop-bot"} and reads["state"]["remaining"] == 0
    assert 500 <= reads["state"]["refill_after"] <= 515
    # reading the state spends nothing
    assert httpx.get(f"{p.control_url}/v1/rate-limits", params={"agent": "calm-bot"},
                     headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=10).json()["limits"][0][
        "state"]["remaining"] == 6
    assert httpx.get(f"{p.control_url}/v1/rate-limits", timeout=10).status_code == 401
    agent_try = httpx.get(f"{p.control_url}/v1/rate-limits", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert agent_try.status_code == 401


def test_a_client_honouring_retry_after_gets_through(proctor_factory, idp) -> None:
    p = proctor_factory(limits({"name": "slow", "limit": 1, "period": 2, "match": READS}))
    token = idp.token("patient-bot")
    s = requests.Session()
    s.trust_env = False
    s.mount("http://", HTTPAdapter(max_retries=Retry(total=3, status_forcelist=[429], allowed_methods=["GET"],
                                                     respect_retry_after_header=True, backoff_factor=0)))
    first = s.get(f"{p.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert first.status_code == 200
    started = time.monotonic()
    second = s.get(f"{p.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    waited = time.monotonic() - started
    assert second.status_code == 200 and 1.0 <= waited < 10, waited  # told to wait 2 s, then admitted
    recs = p.decisions()
    assert [r["status"] for r in recs if r.get("action") == "test.item.read"] == [200, 429, 200]


@pytest.mark.parametrize("engine", GATEWAY_ENGINES)
def test_both_gateway_engines_send_the_fields(proctor_factory, idp, engine) -> None:
    p = proctor_factory({"gateway": {"engine": engine},
                         **limits({"name": "pair", "limit": 2, "period": "1h", "burst": 1, "match": READS})})
    token = idp.token(f"engine-{engine}")
    ok, throttled = get(p, token), get(p, token)
    assert ok.status_code == 200 and ok.headers["RateLimit-Policy"] == '"pair";q=2;w=3600;proctor-burst=1'
    assert ok.headers["RateLimit"] == '"pair";r=0;t=1800'
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "1800"
    assert throttled.headers["RateLimit"] == '"pair";r=0;t=1800'


def test_the_generated_schema_declares_usage(proctor_factory) -> None:
    extra = {"name": "extra", "hosts": ["extra.internal"], "routes": [
        {"method": "GET", "path": "/things/{id}", "action": "extra.thing.read", "resource": {"type": "Thing", "id": "{id}"}},
        {"method": "POST", "path": "/things", "action": "extra.thing.create", "resource": {"type": "Thing", "id": "new"},
         "body": {"name": {"path": "name", "type": "string"}}},
        {"method": "*", "path": "/any", "action": "extra.thing.any", "resource": {"type": "Thing", "id": "any"}}]}
    p = proctor_factory(limits({"name": "things", "limit": 2, "period": "1h", "match": {"actions": ["extra.thing.*"],
                                                                                           "methods": ["POST"]}}),
                        extra_connectors=[extra])
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "connector", "schema", "-c", str(p.config_path)],
                         capture_output=True, text=True, timeout=60, cwd=str(p.dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()

    def context_of(name: str) -> str:
        return next(line for line in lines if line.startswith(f"type {name} "))

    assert "usage: { name: String, limit: Long, period: Long, remaining: Long" in context_of("ExtraThingCreateContext")
    assert "usage?: {" in context_of("ExtraThingAnyContext")  # a `*` route: only its POSTs are limited
    assert "usage" not in context_of("ExtraThingReadContext")  # GETs are not limited


def test_shadow_limits_forward_and_record(proctor_factory, idp, upstream) -> None:
    p = proctor_factory(limits({"name": "trial", "limit": 1, "period": "1h", "shadow": True, "match": READS}))
    token = idp.token("shadowed-bot")
    upstream.clear()
    answers = [get(p, token) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all("RateLimit" not in a.headers for a in answers)  # nothing enforced, nothing advertised
    assert len(upstream.received()) == 3
    recs = records(p, [a.headers["X-Proctor-Decision-Id"] for a in answers])
    assert [r["rate_limit"]["outcome"] for r in recs] == ["allowed", "shadow_throttled", "shadow_throttled"]
    assert all(r["rate_limit"]["shadow"] and r["decision"] == "allow" for r in recs)
    assert metric(p, "proctor_rate_limited_total", limit="trial", outcome="shadow_throttled") == 2


USAGE_POLICY = """
@id("last-read-needs-a-person")
forbid (principal, action == Action::"test.item.read", resource)
when { context.usage.remaining == 0 && context.usage.name == "reads" && !context.usage.throttled };
"""


def test_policies_see_context_usage(proctor_factory, idp, tmp_path) -> None:
    pol = tmp_path / "policies-usage"
    shutil.copytree(DATA / "policies", pol)
    # (an action declared in the schema file by hand keeps its declaration: let this one be generated)
    schema = pol / "schema.cedarschema"
    schema.write_text("\n".join(line for line in schema.read_text().splitlines()
                                if not line.startswith('action "test.item.read"')))
    (pol / "usage.cedar").write_text(USAGE_POLICY)
    p = proctor_factory(limits({"name": "reads", "limit": 3, "period": "1h", "match": READS}), policies_src=pol)
    token = idp.token("usage-bot")
    answers = [get(p, token) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 403, 429]  # the policy refuses the last one first
    assert answers[2].json()["reasons"] == ["last-read-needs-a-person"]
    rec = records(p, [answers[0].headers["X-Proctor-Decision-Id"]])[0]
    assert rec["cedar"]["context"]["usage"] == {"name": "reads", "limit": 3, "period": 3600, "remaining": 2,
                                                "reset_after": 1200, "throttled": False, "shadow": False,
                                                "known": True}


def test_invalid_declarations_refuse_to_start(tmp_path, idp, pki, upstream, upstream_tls) -> None:
    for bad, message in [
        ({"name": "x", "limit": 1, "period": 1, "match": {"connectors": ["tickting"]}},
         "rate_limits[0] (x): match.connectors names 'tickting'"),
        ({"name": "x", "limit": 1, "period": "1 fortnight"}, "rate_limits.0.period"),
        ({"name": "x", "limit": 1, "period": 1, "key": ["field:nope"], "match": READS},
         "key field:nope: none of the routes it matches declares that value"),
    ]:
        with pytest.raises(RuntimeError) as e:
            start_proctor(tmp_path / uuid.uuid4().hex[:8], idp, pki, upstream, upstream_tls, limits(bad))
        assert message in str(e.value), str(e.value)


def test_a_route_limit_in_a_manifest(proctor_factory, idp, tmp_path) -> None:
    up = _start_upstream(tmp_path, None)  # a second upstream, for a connector of its own
    try:
        svc = {"name": "limited", "hosts": [f"127.0.0.1:{up.port}"], "routes": [
            {"method": "GET", "path": "/items/{id}", "action": "test.item.read",
             "resource": {"type": "Item", "id": "{id}"},
             "rate_limit": {"name": "per-item", "key": ["param:id"], "limit": 1, "period": "1h"}}]}
        p = proctor_factory({"gateway": {"routes": [{"prefix": "/limited", "upstream": f"http://127.0.0.1:{up.port}"}]}},
                            extra_connectors=[svc])

        def read(agent: str, item: int) -> httpx.Response:
            return get(p, idp.token(agent), f"/limited/items/{item}")

        first = read("a", 7)
        assert first.status_code == 200 and first.headers["RateLimit-Policy"] == '"per-item";q=1;w=3600'
        again = read("b", 7)  # one counter per item, whoever asks
        assert again.status_code == 429 and again.json()["rate_limit"]["key"]["param:id"].startswith("sha256:")
        assert "'7'" not in again.json()["detail"]
        assert read("b", 8).status_code == 200
        assert len(up.received()) == 2
    finally:
        up.proc.terminate()
        up.proc.wait(5)


# ------------------------------------------------------------------ two proxies: PostgreSQL, Redis
def _two_proxies_exact(procs: list[Proctor], idp, upstream, n: int = 40, m: int = 9) -> None:
    token = idp.token("fleet-bot")
    upstream.clear()
    answers = concurrently([(lambda i=i: get(procs[i % 2], token)) for i in range(n)])
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == m and statuses.count(429) == n - m, statuses
    assert len(upstream.received()) == m
    # both replicas throttled some, and both served some
    assert {i % 2 for i, s in enumerate(statuses) if s == 429} == {0, 1}
    for a in answers:
        assert a.headers["RateLimit-Policy"] == f'"fleet";q={m};w=3600'


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_two_proxies_on_postgresql_share_the_limit(tmp_path, idp, pki, upstream, upstream_tls) -> None:
    schema = "proctor_rl_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    env = {"PROCTOR_TEST_RL_STORE": f"{PG_DSN}{sep}schema={schema}"}
    procs: list[Proctor] = []
    try:
        for i in range(2):
            procs.append(start_proctor(tmp_path / f"pg{i}", idp, pki, upstream, upstream_tls, {
                **limits({"name": "fleet", "limit": 9, "period": "1h", "match": READS}),
                "store": {"url_env": "PROCTOR_TEST_RL_STORE"}}, env=env))
        _two_proxies_exact(procs, idp, upstream)
        doc = httpx.get(f"{procs[1].control_url}/v1/rate-limits", params={"agent": "fleet-bot"},
                        headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=10).json()
        assert doc["backend"] == "postgresql" and doc["limits"][0]["state"]["remaining"] == 0
    finally:
        for p in procs:
            p.stop()
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)
def test_two_proxies_on_redis_share_the_limit(tmp_path, idp, pki, upstream, upstream_tls) -> None:
    prefix = f"proctor-rl-{uuid.uuid4().hex[:10]}:"
    procs: list[Proctor] = []
    try:
        for i in range(2):
            procs.append(start_proctor(tmp_path / f"redis{i}", idp, pki, upstream, upstream_tls, {
                **limits({"name": "fleet", "limit": 9, "period": "1h", "match": READS}),
                "counters": {"backend": "redis", "redis_url_env": "PROCTOR_TEST_RL_REDIS", "prefix": prefix}},
                env={"PROCTOR_TEST_RL_REDIS": REDIS_URL}))
        _two_proxies_exact(procs, idp, upstream)
        doc = httpx.get(f"{procs[0].control_url}/v1/rate-limits", params={"agent": "fleet-bot"},
                        headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=10).json()
        assert doc["backend"] == "redis" and doc["limits"][0]["state"]["remaining"] == 0
    finally:
        for p in procs:
            p.stop()
        asyncio.run(_redis_cleanup(prefix))


def test_counters_down_fail_closed_or_open(proctor_factory, idp, writer_token, upstream) -> None:
    dead = free_port()  # nothing listens there
    p = proctor_factory({
        **limits({"name": "reads-open", "limit": 5, "period": 60, "match": READS, "on_unavailable": "open"},
                 {"name": "creates-closed", "limit": 5, "period": 60, "match": {"actions": ["test.item.create"]}}),
        "counters": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{dead}/0", "timeout_seconds": 0.5}})
    upstream.clear()
    read = get(p, writer_token)
    assert read.status_code == 200 and "RateLimit" not in read.headers  # passed unchecked
    create = httpx.post(f"{p.gateway_url}/svc/items", json={"name": "x"},
                        headers={"Authorization": f"Bearer {writer_token}"}, timeout=10)
    assert create.status_code == 503 and create.headers["Retry-After"] == "5"
    body = create.json()
    assert body["type"].endswith("/fail-closed") and body["reasons"] == ["rate-limit:creates-closed"]
    assert "redis" in body["detail"] and body["rate_limit"] == {"name": "creates-closed", "unavailable": True}
    assert [e["method"] for e in upstream.received()] == ["GET"]  # the create never left
    recs = records(p, [read.headers["X-Proctor-Decision-Id"], create.headers["X-Proctor-Decision-Id"]])
    assert recs[0]["rate_limit"]["outcome"] == "unavailable" and recs[0]["decision"] == "allow"
    assert recs[0]["cedar"]["context"]["usage"]["known"] is False
    assert recs[1]["rate_limit"]["outcome"] == "unavailable" and recs[1]["refusal"]["kind"] == "fail-closed"
    assert metric(p, "proctor_rate_limited_total", limit="reads-open", outcome="unavailable") == 1
    assert metric(p, "proctor_rate_limited_total", limit="creates-closed", outcome="unavailable") == 1
    assert "rate limit creates-closed: counters unavailable" in p.log()
    # the rest of Proctor stays ready; the API says the counters do not answer
    assert httpx.get(f"{p.control_url}/readyz", timeout=5).status_code == 200
    doc = httpx.get(f"{p.control_url}/v1/rate-limits", params={"agent": "writer-bot"},
                    headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=10).json()
    assert doc["counters_available"] is False and doc["backend"] == "redis"


# ------------------------------------------------------------------ the OpenAI SDK
@pytest.fixture(scope="module")
def stub():
    s = Stub()
    yield s
    s.close()


def test_the_openai_sdk_raises_rate_limit_error(tmp_path, idp, pki, upstream, upstream_tls, stub) -> None:
    pol = tmp_path / "llm-policies"
    pol.mkdir()
    for name in ("schema.cedarschema", "llm.cedar"):
        (pol / name).write_text((ROOT / "policies" / name).read_text())
    llm = yaml.safe_load((ROOT / "connectors" / "llm.yaml").read_text().replace(":9104", f":{stub.port}"))
    p = start_proctor(tmp_path / "p", idp, pki, upstream, upstream_tls, limits(
        {"name": "llm-chat", "key": ["agent", "field:model"], "limit": 2, "period": "1h",
         "match": {"connectors": ["llm"], "actions": ["llm.chat.*"]}},
        {"name": "llm-quick", "limit": 1, "period": 2, "match": {"actions": ["llm.embedding.create"]}},
    ), policies_src=pol, extra_connectors=[llm], env={"OPENAI_API_KEY": PROVIDER_KEY})
    try:
        token = idp.token("assistant-bot", groups=["llm-users"])

        def client(**kw) -> openai.OpenAI:
            http = httpx.Client(proxy=p.proxy_url_with("assistant-bot", token), trust_env=False)
            return openai.OpenAI(base_url=stub.base_url, api_key="sk-agent-side", http_client=http, **kw)

        c = client(max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
            assert raw.headers["ratelimit-policy"] == '"llm-chat";q=2;w=3600'
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        err = e.value
        assert err.status_code == 429 and err.code == "rate-limited" and err.type == "rate_limit_error"
        assert "rate limit 'llm-chat'" in err.message and "Retry after" in err.message
        assert 1700 <= int(err.response.headers["retry-after"]) <= 1800
        assert err.response.headers["ratelimit"].startswith('"llm-chat";r=0')
        proctor = err.body["proctor"] if isinstance(err.body, dict) and "proctor" in err.body else \
            json.loads(err.response.text)["error"]["proctor"]
        assert proctor["rate_limit"]["key"]["agent"] == "assistant-bot"
        # another model is another counter (key: agent and the model field)
        assert c.chat.completions.create(model="gpt-4o", messages=msgs).choices
        # the SDK's own retries honour Retry-After: a 1-per-2s limit is waited out
        patient = client(max_retries=3)
        patient.embeddings.create(model="text-embedding-3-small", input="one")
        started = time.monotonic()
        assert patient.embeddings.create(model="text-embedding-3-small", input="two").data
        assert time.monotonic() - started >= 1.0
    finally:
        p.stop()


@pytest.mark.parametrize("engine", GATEWAY_ENGINES)
def test_an_upstream_failure_on_a_limited_route_carries_the_fields(proctor_factory, idp, engine) -> None:
    """502 (nothing listens) on a limited route: the agent still learns what is left, on both engines,
    forward and gateway."""
    dead = free_port()
    svc = {"name": "gone", "hosts": [f"127.0.0.1:{dead}"], "routes": [
        {"method": "GET", "path": "/items/{id}", "action": "test.item.read", "resource": {"type": "Item", "id": "{id}"},
         "rate_limit": {"name": "gone-reads", "limit": 5, "period": "1h"}}]}
    p = proctor_factory({"gateway": {"engine": engine, "routes": [
        {"prefix": "/gone", "upstream": f"http://127.0.0.1:{dead}"}]}}, extra_connectors=[svc])
    token = idp.token(f"gone-{engine}")
    via_gateway = get(p, token, "/gone/items/1")
    assert via_gateway.status_code == 502, via_gateway.text
    assert via_gateway.headers["RateLimit-Policy"] == '"gone-reads";q=5;w=3600'
    assert via_gateway.headers["RateLimit"].startswith('"gone-reads";r=4;t=')
    if engine == "mitmproxy":  # (the forward listener is always mitmproxy)
        with httpx.Client(proxy=p.proxy_url_with(f"gone-{engine}", token), timeout=30) as c:
            forward = c.get(f"http://127.0.0.1:{dead}/items/1")
        assert forward.status_code == 502 and forward.headers["RateLimit"].startswith('"gone-reads";r=3;t=')
