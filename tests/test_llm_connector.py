"""The bundled LLM connector (connectors/llm.yaml) with the official OpenAI Python SDK.

A real `proctor run` with the bundled connector, schema and policies/llm.cedar (plus one
approval policy), in front of the OpenAI-compatible stub (proxy/demo/mock_llm.py). The SDK
is configured the way an agent owner would: environment variables and a proxy (forward
mode), or a base URL and the agent's JWT as the API key (gateway mode, both engines).

What it shows: allowed calls reach the stub with the provider key Proctor injects (the
agent never sends it); refusals are OpenAI error objects, so the SDK raises the matching
exception (PermissionDeniedError, RateLimitError, AuthenticationError, BadRequestError,
InternalServerError) whose message carries the reason and the decision id; streaming
passes through; chat, responses, embeddings and models are classified with the model in
the decision record.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from aiohttp import web

from conftest import GATEWAY_ENGINES, Proctor, free_port, port_open, wait_for
from proxy.config import load_config
from proxy.demo import mock_llm
from proxy.identity.dev_issuer import DevIssuer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DECISION_HEADER = "X-Proctor-Decision-Id"
PROVIDER_KEY = "sk-test-provider-" + uuid.uuid4().hex  # what Proctor holds and injects
AGENT_SIDE_KEY = "sk-agent-side-not-a-key"  # what an agent's SDK is given in forward mode

# Held for an approver: any chat call on gpt-4o (the bundled policies allow it to llm-users).
HOLD_POLICY = """
@id("llm-gpt-4o-needs-approval")
@approval("llm-approvers")
forbid (
  principal,
  action == Action::"llm.chat.create",
  resource is LlmProvider
)
when { context.fields.model == "gpt-4o" }
unless
{
  context has approval &&
  context.approval.groups.contains("llm-approvers")
};
"""

AGENTS = {
    "assistant-bot": ["llm-users"],
    "research-bot": ["llm-users", "llm-power-users"],
    "sales-bot": ["sales"],
    "suspended-bot": ["llm-users"],
    "retry-bot": ["llm-users"],
}


class Stub:
    """The OpenAI-compatible stub on a free port, in a background event loop; `seen` is every
    request it received (method, path, Authorization, body)."""

    def __init__(self) -> None:
        self.app = mock_llm.build_app(PROVIDER_KEY)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(10)
        wait_for(lambda: port_open(self.port), what="LLM stub")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.runner = web.AppRunner(self.app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        started.set()
        self.loop.run_forever()

    @property
    def seen(self) -> list[dict]:
        return self.app[mock_llm.SEEN]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class Env:
    """A proctor with the bundled LLM connector (its stub port swapped in) and policies."""

    def __init__(self, base: Path, stub: Stub, engine: str = "mitmproxy", provider_key: str | None = PROVIDER_KEY):
        self.base, self.stub = base, stub
        conns = base / "connectors"
        conns.mkdir(parents=True)
        text = (ROOT / "connectors" / "llm.yaml").read_text()
        assert "127.0.0.1:9104" in text
        (conns / "llm.yaml").write_text(text.replace(":9104", f":{stub.port}"))
        pol = base / "policies"
        pol.mkdir()
        for name in ("schema.cedarschema", "llm.cedar"):
            (pol / name).write_text((ROOT / "policies" / name).read_text())
        (pol / "hold.cedar").write_text(HOLD_POLICY)
        self.port, self.control_port, self.gateway_port = free_port(), free_port(), free_port()
        self.config_path = base / "proctor.yaml"
        self.config_path.write_text(yaml.safe_dump({
            "state_dir": "state",
            "listen": {"host": "127.0.0.1", "port": self.port},
            "control": {"listen": {"host": "127.0.0.1", "port": self.control_port}},
            "gateway": {"enabled": True, "engine": engine, "listen": {"host": "127.0.0.1", "port": self.gateway_port},
                        "routes": [{"prefix": "/openai", "upstream": f"http://127.0.0.1:{stub.port}"}]},
            "connectors_dir": "connectors",
            "policies": {"dir": "policies"},
            "approvals": {"mode": "async", "retry_after_seconds": 1},
        }))
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        if provider_key is not None:
            env["OPENAI_API_KEY"] = provider_key
        self.log_path = base / "proctor.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_path), "--log-level", "info"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=str(base),
            env=dict(env, PYTHONUNBUFFERED="1"),
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"proctor exited with {proc.returncode}:\n{self.log_path.read_text()}")
            try:
                return httpx.get(f"http://127.0.0.1:{self.control_port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="proctor readiness")
        self.p = Proctor(dir=base, config_path=self.config_path, port=self.port, control_port=self.control_port,
                         gateway_port=self.gateway_port, proc=proc, log_path=self.log_path,
                         ca_pem=base / "state" / "ca" / "mitmproxy-ca-cert.pem", policies_dir=pol)
        config = load_config(self.config_path)
        issuer = DevIssuer(config.dev_issuer_dir, config.dev_issuer)
        self.tokens = {agent: issuer.issue(agent, {"groups": groups}) for agent, groups in AGENTS.items()}
        self.approver = issuer.issue("alice", {config.approvals.approver_groups_claim: ["llm-approvers"]},
                                     audience=config.approvals.approver_audience)
        self.admin = issuer.issue("olga", {config.approvals.approver_groups_claim: ["proctor-admins"]},
                                  audience=config.approvals.approver_audience)

    # -- SDK clients ---------------------------------------------------------------
    def forward_client(self, agent: str, **kw) -> openai.OpenAI:
        """Forward mode: the stub's own URL, through Proctor as the HTTP proxy."""
        http = httpx.Client(proxy=self.p.proxy_url_with(agent, self.tokens[agent]), trust_env=False)
        return openai.OpenAI(base_url=self.stub.base_url, api_key=AGENT_SIDE_KEY, http_client=http, **kw)

    def gateway_client(self, agent: str, api_key: str | None = None, **kw) -> openai.OpenAI:
        """Gateway mode: the base URL is Proctor's; the API key is the agent's JWT."""
        http = httpx.Client(trust_env=False)
        return openai.OpenAI(base_url=f"{self.p.gateway_url}/openai/v1", api_key=api_key or self.tokens[agent],
                             http_client=http, **kw)

    def record(self, decision_id: str) -> dict:
        wait_for(lambda: any(d.get("decision_id") == decision_id and "type" not in d for d in self.p.decisions()),
                 timeout=5, what="decision record")
        return self.p.decision(decision_id)

    def stop(self) -> None:
        self.p.stop()


@pytest.fixture(scope="module")
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, stub):
    e = Env(tmp_path_factory.mktemp("llm"), stub)
    yield e
    e.stop()


@pytest.fixture(scope="module", params=GATEWAY_ENGINES)
def gw(request, tmp_path_factory, stub):
    """The gateway listener, served by each engine."""
    if request.param == "mitmproxy":
        yield request.getfixturevalue("env")
        return
    e = Env(tmp_path_factory.mktemp(f"llm-{request.param}"), stub, engine=request.param)
    yield e
    e.stop()


def hello(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def fields_of(record: dict) -> dict:
    return record["cedar"]["context"].get("fields", {})


# --------------------------------------------------------------------- allowed


def test_an_unmodified_sdk_script_configured_by_environment_alone(env, stub):
    """`OpenAI()` with no arguments: base URL, key and proxy come from the environment."""
    script = (
        "from openai import OpenAI\n"
        "c = OpenAI()\n"
        "r = c.chat.completions.with_raw_response.create(model='gpt-4o-mini', "
        "messages=[{'role': 'user', 'content': 'hello from the environment'}])\n"
        "print(r.headers['x-proctor-decision-id'])\n"
        "print(r.parse().choices[0].message.content)\n"
    )
    agent_env = {k: v for k, v in os.environ.items()
                 if k.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy") and not k.startswith("OPENAI_")}
    agent_env.update(HTTP_PROXY=env.p.proxy_url_with("assistant-bot", env.tokens["assistant-bot"]),
                     OPENAI_BASE_URL=stub.base_url, OPENAI_API_KEY=AGENT_SIDE_KEY)
    before = len(stub.seen)
    out = subprocess.run([sys.executable, "-c", script], env=agent_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    decision_id, answer = out.stdout.split()[0], " ".join(out.stdout.split()[1:])
    assert answer == "Echo: hello from the environment"
    # the stub got the provider key Proctor injected, never the agent's key or token
    got = stub.seen[before:]
    assert [s["authorization"] for s in got] == [f"Bearer {PROVIDER_KEY}"]
    rec = env.record(decision_id)
    assert rec["decision"] == "allow" and rec["action"] == "llm.chat.create"
    assert rec["resource"] == 'LlmProvider::"openai"' and rec["connector"] == "llm"
    assert fields_of(rec) == {"model": "gpt-4o-mini"}
    assert rec["reasons"] == ["llm-users-call-models"]


def test_chat_completion_through_the_forward_proxy(env, stub):
    client = env.forward_client("assistant-bot")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=hello("What is Proctor?"), max_tokens=64, temperature=0.2)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: What is Proctor?"
    assert completion.choices[0].finish_reason == "stop"
    # system 3+4, user 3+4, reply overhead 3; "Echo: What is Proctor?" is 6 tokens
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        17, 6, 23)
    assert stub.seen[-1]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert AGENT_SIDE_KEY not in json.dumps(stub.seen[-1])
    rec = env.record(raw.headers[DECISION_HEADER])
    assert rec["status"] == 200 and rec["risk"] == "medium"
    assert fields_of(rec) == {"model": "gpt-4o-mini", "max_tokens": 64,
                              "temperature": {"__extn": {"fn": "decimal", "arg": "0.2"}}}


def test_streaming_passes_through_with_the_usage_chunk(env, gw, stub):
    for client in (env.forward_client("assistant-bot"), gw.gateway_client("assistant-bot")):
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=hello("stream these four words"),
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Echo: stream these four words"
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5  # a word at a time
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert (usage.completion_tokens, usage.total_tokens) == (6, usage.prompt_tokens + 6)
        sent = stub.seen[-1]
        assert sent["authorization"] == f"Bearer {PROVIDER_KEY}" and sent["body"]["stream"] is True


def test_responses_embeddings_and_models_are_classified(env, stub):
    client = env.forward_client("assistant-bot")
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Summarise the week",
                                                    instructions="Be brief.", max_output_tokens=100)
    response = raw.parse()
    assert response.output_text == "Echo: Summarise the week"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (12, 5)  # instructions count too
    rec = env.record(raw.headers[DECISION_HEADER])
    assert (rec["action"], rec["resource"]) == ("llm.response.create", 'LlmProvider::"openai"')
    assert fields_of(rec) == {"model": "gpt-4o", "max_output_tokens": 100}

    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["alpha", "beta gamma"])
    embeddings = raw.parse()  # the SDK asks for base64 and decodes it
    assert [len(e.embedding) for e in embeddings.data] == [8, 8]
    assert embeddings.usage.prompt_tokens == 3
    rec = env.record(raw.headers[DECISION_HEADER])
    assert (rec["action"], rec["risk"]) == ("llm.embedding.create", "low")
    assert fields_of(rec) == {"model": "text-embedding-3-small"}

    raw = client.models.with_raw_response.list()
    assert "gpt-4o-mini" in [m.id for m in raw.parse()]
    assert env.record(raw.headers[DECISION_HEADER])["action"] == "llm.model.list"
    raw = client.models.with_raw_response.retrieve("gpt-4o")
    assert raw.parse().id == "gpt-4o"
    rec = env.record(raw.headers[DECISION_HEADER])
    assert rec["action"] == "llm.model.read" and rec["cedar"]["context"]["params"] == {"model": "gpt-4o"}


def test_gateway_mode_takes_the_agent_jwt_as_the_api_key(gw, stub):
    client = gw.gateway_client("assistant-bot")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=hello("via the gateway"))
    assert raw.parse().choices[0].message.content == "Echo: via the gateway"
    sent = stub.seen[-1]
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"  # the JWT was stripped, the key injected
    assert gw.tokens["assistant-bot"] not in json.dumps(sent)
    rec = gw.record(raw.headers[DECISION_HEADER])
    assert (rec["agent"], rec["mode"], rec["action"]) == ("assistant-bot", "reverse", "llm.chat.create")


# --------------------------------------------------------------------- refused


def assert_openai_refusal(e: openai.APIStatusError, status: int, code: str, type_: str) -> dict:
    """The SDK read an OpenAI error object: class by status, code/type from it, the reason and the
    decision id in its message; Proctor's problem fields in error.proctor."""
    assert e.status_code == status, e
    assert e.response.headers["content-type"].startswith("application/json")
    assert isinstance(e.body, dict), e.body
    assert (e.code, e.type, e.param) == (code, type_, None)
    proctor = e.body["proctor"]
    decision_id = e.response.headers[DECISION_HEADER]
    assert proctor["decision_id"] == decision_id
    assert e.body["message"].startswith(proctor["title"] + ": ")
    assert decision_id in e.body["message"] and decision_id in str(e)
    return proctor


def test_a_denied_model_raises_permission_denied_with_the_policy_and_decision(env, stub):
    client = env.forward_client("assistant-bot")
    before = len(stub.seen)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="o1-pro", messages=hello("expensive thoughts"))
    proctor = assert_openai_refusal(err.value, 403, "policy", "permission_error")
    assert "llm-pro-models-for-power-users" in err.value.body["message"]
    assert proctor["reasons"] == ["llm-pro-models-for-power-users"]
    assert (proctor["action"], proctor["resource"]) == ("llm.chat.create", 'LlmProvider::"openai"')
    assert len(stub.seen) == before  # nothing reached the provider
    rec = env.record(proctor["decision_id"])
    assert rec["decision"] == "deny" and fields_of(rec)["model"] == "o1-pro" and rec["status"] == 403
    # a power user may
    ok = env.forward_client("research-bot").chat.completions.create(model="o1-pro", messages=hello("deep"))
    assert ok.choices[0].message.content == "Echo: deep"


def test_an_agent_outside_llm_users_is_refused(gw):
    with pytest.raises(openai.PermissionDeniedError) as err:
        gw.gateway_client("sales-bot").embeddings.create(model="text-embedding-3-small", input="x")
    proctor = assert_openai_refusal(err.value, 403, "policy", "permission_error")
    assert "no policy permits this request" in err.value.body["message"]
    assert proctor["agent"] == "sales-bot" and proctor["action"] == "llm.embedding.create"


def test_a_hold_is_a_rate_limit_error_and_the_approved_retry_goes_through(env, stub):
    client = env.forward_client("assistant-bot", max_retries=0)
    question = hello("needs a human " + uuid.uuid4().hex[:8])
    before = len(stub.seen)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=question)
    e = err.value
    proctor = assert_openai_refusal(e, 429, "approval-pending", "approval_required")
    assert e.response.headers["retry-after"] == "1"
    assert proctor["status"] == 202 and proctor["reasons"] == ["llm-gpt-4o-needs-approval"]
    assert "needs approval by llm-approvers" in e.body["message"]
    assert len(stub.seen) == before
    assert env.record(proctor["decision_id"])["decision"] == "hold"
    r = httpx.post(f"{env.p.control_url}/v1/approvals/{proctor['approval_id']}/approve", json={"reason": "fine"},
                   headers={"Authorization": f"Bearer {env.approver}"}, timeout=10)
    assert r.status_code == 200, r.text
    # the same call again (what the SDK's own retry would send) is released
    answer = client.chat.completions.create(model="gpt-4o", messages=question)
    assert answer.choices[0].message.content == "Echo: " + question[-1]["content"]
    assert stub.seen[-1]["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_the_sdks_own_retries_go_through_once_approved(env, stub):
    """No handling in the agent: the SDK retries the 429 after Retry-After (1 s here) until a
    person approved, and the call returns the answer."""
    client = env.forward_client("retry-bot", max_retries=8)
    question = hello("approve me while I retry")
    result: dict = {}

    def ask() -> None:
        try:
            result["answer"] = client.chat.completions.create(model="gpt-4o", messages=question)
        except Exception as e:  # reported below
            result["error"] = e

    caller = threading.Thread(target=ask)
    caller.start()
    approver = {"Authorization": f"Bearer {env.approver}"}

    def pending() -> list[dict]:
        r = httpx.get(f"{env.p.control_url}/v1/approvals", params={"state": "pending", "agent": "retry-bot"},
                      headers=approver, timeout=10)
        return r.json()["approvals"]

    wait_for(lambda: pending(), timeout=10, what="the held call")
    (held,) = pending()
    wait_for(lambda: len([d for d in env.p.decisions() if d.get("agent") == "retry-bot"]) >= 2, timeout=10,
             what="the SDK's first retry")  # it retries the hold, and the retry matches the same approval
    assert pending() == [held]
    r = httpx.post(f"{env.p.control_url}/v1/approvals/{held['id']}/approve", json={"reason": "ok"}, headers=approver,
                   timeout=10)
    assert r.status_code == 200, r.text
    caller.join(30)
    assert "error" not in result, result
    assert result["answer"].choices[0].message.content == "Echo: approve me while I retry"
    held_calls = [d for d in env.p.decisions() if d.get("agent") == "retry-bot" and "type" not in d]
    assert [d["decision"] for d in held_calls][-1] == "allow"
    assert {d.get("approval_id") for d in held_calls} == {held["id"]}


def test_a_suspended_agent_sees_why_before_classification(env, stub):
    r = httpx.post(f"{env.p.control_url}/v1/suspensions", json={"kind": "agent", "target": "suspended-bot",
                   "reason": "runaway loop"}, headers={"Authorization": f"Bearer {env.admin}"}, timeout=10)
    assert r.status_code == 201, r.text
    client = env.forward_client("suspended-bot")
    for call in (lambda: client.chat.completions.create(model="gpt-4o-mini", messages=hello("hi")),
                 lambda: client.models.list()):
        wait_for(lambda call=call: _refused(call), timeout=5, what="the suspension to apply")
        with pytest.raises(openai.PermissionDeniedError) as err:
            call()
        proctor = assert_openai_refusal(err.value, 403, "suspended", "permission_error")
        assert "runaway loop" in err.value.body["message"]
        assert proctor["reasons"] == ["suspended:agent:suspended-bot"]


def _refused(call) -> bool:
    try:
        call()
    except openai.PermissionDeniedError:
        return True
    return False


@pytest.mark.parametrize("call", ["chat", "models"])  # a body (decided on the head) and none
def test_a_bad_agent_token_in_gateway_mode_is_an_authentication_error(gw, call):
    client = gw.gateway_client("assistant-bot", api_key="not-a-jwt", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        if call == "chat":
            client.chat.completions.create(model="gpt-4o-mini", messages=hello("hi"))
        else:
            client.models.list()
    assert_openai_refusal(err.value, 401, "authentication", "authentication_error")


def test_a_value_out_of_bounds_is_a_bad_request(env, stub):
    before = len(stub.seen)
    with pytest.raises(openai.BadRequestError) as err:
        env.forward_client("assistant-bot").chat.completions.create(
            model="gpt-4o-mini", messages=hello("hot"), temperature=2.5)
    assert_openai_refusal(err.value, 400, "request", "invalid_request_error")
    assert "temperature" in err.value.body["message"]
    assert len(stub.seen) == before


def test_an_unmapped_endpoint_on_the_provider_is_refused_in_its_shape(env, stub):
    before = len(stub.seen)
    with pytest.raises(openai.PermissionDeniedError) as err:
        env.forward_client("assistant-bot").files.list()
    proctor = assert_openai_refusal(err.value, 403, "egress", "permission_error")
    assert proctor["reasons"] == ["egress-default-deny"]
    assert len(stub.seen) == before


def test_without_the_provider_key_an_allowed_call_fails_closed(tmp_path, stub):
    e = Env(tmp_path / "nokey", stub, provider_key=None)
    try:
        before = len(stub.seen)
        with pytest.raises(openai.InternalServerError) as err:
            e.forward_client("assistant-bot", max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=hello("hi"))
        proctor = assert_openai_refusal(err.value, 503, "fail-closed", "server_error")
        assert proctor["reasons"] == ["upstream-credential-unavailable"]
        assert "OPENAI_API_KEY" in err.value.body["message"]
        assert len(stub.seen) == before
    finally:
        e.stop()
