"""The client matrix: every client docs/agents.md names, configured only as it says.

One real `proctor run` (the session `proctor` fixture) in front of real loopback
upstreams, plain HTTP and HTTPS (a test CA). Each client runs as its own process
with an environment that holds nothing but what docs/agents.md tells agent owners
to export: HTTPS_PROXY/HTTP_PROXY/https_proxy/http_proxy with the agent id and JWT,
SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS, CURL_CA_BUNDLE (and for
Node the NODE_OPTIONS preload the docs give). For each client, on an http:// and an
https:// URL:

- an allowed call: 2xx from the upstream with X-Proctor-Decision-Id, recorded for
  the client's own agent id;
- a denied call: 403 problem+json with decision_id, action, resource and reasons,
  and the upstream never saw it.

And the two documented traps: aiohttp without trust_env, and Node's fetch without
the preload, go straight to the upstream (a denied DELETE arrives there). The
official OpenAI SDK is covered by the same two calls here (environment alone, to
the OpenAI-compatible stub) and in depth in tests/test_llm_connector.py; the official
MCP SDK in tests/test_mcp_sdk.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, SUPPORT, wait_for

pytestmark = pytest.mark.integration

NODE_DIR = ROOT / "tests" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")

# Everything that could route or trust on the agent's behalf, in either case: the test's
# own environment must not leak into the agents'.
_AGENT_ENV_DROP = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir",
                   "requests_ca_bundle", "curl_ca_bundle", "node_extra_ca_certs", "node_options", "node_path",
                   "node_use_env_proxy", "openai_api_key", "openai_base_url"}


def agent_env(proxy_url: str, ca: Path, **extra: str) -> dict[str, str]:
    """The environment docs/agents.md ("Forward mode") has an agent owner export, and nothing else."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _AGENT_ENV_DROP and not k.startswith("GLOBAL_AGENT")}
    env.update(
        HTTPS_PROXY=proxy_url, HTTP_PROXY=proxy_url, https_proxy=proxy_url, http_proxy=proxy_url,
        SSL_CERT_FILE=str(ca), REQUESTS_CA_BUNDLE=str(ca), NODE_EXTRA_CA_CERTS=str(ca), CURL_CA_BUNDLE=str(ca),
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------- Node packages


@pytest.fixture(scope="session")
def node_preload() -> Path:
    """tests/node's pinned packages installed with `npm ci` into a cache directory (once per
    lock file), with the preload docs/agents.md gives next to them, as the docs say to."""
    if NODE is None or NPM is None:
        pytest.skip("node/npm are not installed: the Node rows of the client matrix need Node.js 20 and npm")
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proctor-tests"
    target = cache / f"node-{hashlib.sha256(lock + (NODE_DIR / 'package.json').read_bytes()).hexdigest()[:16]}"
    if not (target / "node_modules" / ".package-lock.json").exists():
        staging = cache / f"staging-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / name, staging / name)
        out = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=staging,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"npm ci failed:\n{out.stdout}\n{out.stderr}"
        try:
            staging.rename(target)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    preload = target / "proctor-proxy.cjs"
    shutil.copy(NODE_DIR / "proctor-proxy.cjs", preload)  # the current recipe, next to its packages
    return preload


# ------------------------------------------------------------------------------- clients

PYTHON_CLIENTS = ("requests", "httpx", "httpx-async", "aiohttp-trust-env", "urllib")
CLIENTS = ("curl", *PYTHON_CLIENTS, "node-fetch", "node-http")


def _curl(env: dict[str, str], calls: list[tuple[str, str]]) -> list[dict]:
    out = []
    for method, url in calls:
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-X", method, "-o", "-", url,
             "-w", "\n%{http_code}\n%header{x-proctor-decision-id}\n%header{content-type}"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        if r.returncode != 0:
            out.append({"error": r.stderr})
            continue
        body, status, decision_id, content_type = r.stdout.rsplit("\n", 3)
        out.append({"status": int(status), "decision_id": decision_id or None, "content_type": content_type or None,
                    "body": body})
    return out


def run_client(client: str, env: dict[str, str], calls: list[tuple[str, str]]) -> list[dict]:
    """Run one unmodified client as its own process; one result per call."""
    if client == "curl":
        return _curl(env, calls)
    if client.startswith("node-"):
        script = NODE_DIR / ("fetch-client.mjs" if client == "node-fetch" else "http-client.cjs")
        cmd = [NODE or "node", str(script), json.dumps(calls)]
    else:
        cmd = [sys.executable, str(SUPPORT / "matrix_clients.py"), client, json.dumps(calls)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(NODE_DIR.parent))
    assert out.returncode == 0, f"{client} failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- assertions


def _all_paths(*upstreams) -> list[str]:
    return [e["path"] for up in upstreams for e in up.received()]


def _record(proctor, decision_id: str) -> dict:
    wait_for(lambda: any(d.get("decision_id") == decision_id and "type" not in d for d in proctor.decisions()),
             timeout=10, what=f"decision {decision_id} in the record")
    return proctor.decision(decision_id)


def assert_allowed(proctor, res: dict, path: str, agent: str, upstream) -> None:
    assert "error" not in res, res
    assert res["status"] == 200, res
    assert res["decision_id"], "no X-Proctor-Decision-Id on an allowed call"
    assert json.loads(res["body"])["path"] == path  # the upstream's own answer
    assert path in _all_paths(upstream)
    rec = _record(proctor, res["decision_id"])
    assert (rec["agent"], rec["decision"], rec["action"]) == (agent, "allow", "test.item.read")


def assert_denied(proctor, res: dict, path: str, agent: str, *upstreams) -> None:
    assert "error" not in res, res
    assert res["status"] == 403, res
    assert res["content_type"] == "application/problem+json"
    problem = json.loads(res["body"])
    assert problem["decision_id"] == res["decision_id"]
    assert problem["reasons"] == ["no-item-deletes"]
    assert problem["action"] == "test.item.delete"
    assert problem["resource"] == f'Item::"{path.rsplit("/", 1)[1]}"'
    assert problem["agent"] == agent
    assert path not in _all_paths(*upstreams), "a denied call reached the upstream"
    rec = _record(proctor, res["decision_id"])
    assert (rec["agent"], rec["decision"], rec["status"]) == (agent, "deny", 403)


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("client", CLIENTS)
def test_client_allowed_and_denied_on_http_and_https(client, request, proctor, upstream, upstream_tls, idp):
    agent = f"matrix-{client}"
    token = idp.token(agent, groups=["readers"])
    extra = {}
    if client.startswith("node-"):
        extra["NODE_OPTIONS"] = f"--require {request.getfixturevalue('node_preload')}"
    env = agent_env(proctor.proxy_url_with(agent, token), proctor.ca_pem, **extra)
    tag = f"{client}-{uuid.uuid4().hex[:8]}"
    http_base, https_base = f"http://127.0.0.1:{upstream.port}", f"https://localhost:{upstream_tls.port}"
    paths = {k: f"/items/{tag}-{k}" for k in ("http-ok", "https-ok", "http-no", "https-no")}
    results = run_client(client, env, [
        ("GET", http_base + paths["http-ok"]),
        ("GET", https_base + paths["https-ok"]),
        ("DELETE", http_base + paths["http-no"]),
        ("DELETE", https_base + paths["https-no"]),
    ])
    assert len(results) == 4, results
    assert_allowed(proctor, results[0], paths["http-ok"], agent, upstream)
    assert_allowed(proctor, results[1], paths["https-ok"], agent, upstream_tls)
    assert_denied(proctor, results[2], paths["http-no"], agent, upstream, upstream_tls)
    assert_denied(proctor, results[3], paths["https-no"], agent, upstream, upstream_tls)


def test_aiohttp_without_trust_env_bypasses_proctor(proctor, upstream, upstream_tls, idp):
    """Why the docs say trust_env=True: by default aiohttp ignores the proxy variables, so a
    call Proctor would deny reaches the upstream, with no decision and nothing recorded."""
    agent = "matrix-aiohttp-default"
    env = agent_env(proctor.proxy_url_with(agent, idp.token(agent, groups=["readers"])), proctor.ca_pem)
    path = f"/items/bypass-{uuid.uuid4().hex[:8]}"
    before = len(proctor.decisions())
    [plain, tls] = run_client("aiohttp-default", env, [("DELETE", f"http://127.0.0.1:{upstream.port}{path}"),
                                                       ("DELETE", f"https://localhost:{upstream_tls.port}{path}")])
    assert plain["status"] == 200 and plain["decision_id"] is None  # the upstream's own answer
    assert any(e["method"] == "DELETE" and e["path"] == path for e in upstream.received())
    # https went around Proctor as well: here it fails only because the agent trusts
    # Proctor's CA alone (SSL_CERT_FILE), not the upstream's; with a public CA it would succeed
    assert "error" in tls and "certificate" in tls["error"].lower(), tls
    assert all(d.get("agent") != agent for d in proctor.decisions()[before:])


def test_node_fetch_without_the_preload_bypasses_proctor(node_preload, proctor, upstream, idp):
    """Node 20's fetch ignores HTTP(S)_PROXY: without the preload a denied DELETE reaches the upstream."""
    agent = "matrix-node-bare"
    env = agent_env(proctor.proxy_url_with(agent, idp.token(agent, groups=["readers"])), proctor.ca_pem)
    path = f"/items/bypass-{uuid.uuid4().hex[:8]}"
    [res] = run_client("node-fetch", env, [("DELETE", f"http://127.0.0.1:{upstream.port}{path}")])
    assert res["status"] == 200 and res["decision_id"] is None
    assert any(e["method"] == "DELETE" and e["path"] == path for e in upstream.received())


# --------------------------------------------------------------------- the OpenAI SDK

_OPENAI_SCRIPT = """
import json, openai
client = openai.OpenAI()  # base URL, key and proxy from the environment
out = {}
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "allowed through the matrix"}])
out["allowed"] = {"decision_id": raw.headers.get("x-proctor-decision-id"),
                  "content": raw.parse().choices[0].message.content}
try:
    client.chat.completions.create(model="o1-pro", messages=[{"role": "user", "content": "denied"}])
except openai.PermissionDeniedError as e:
    out["denied"] = {"status": e.status_code, "code": e.code, "body": e.body,
                     "decision_id": e.response.headers.get("x-proctor-decision-id")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from test_llm_connector import Env, Stub

    stub = Stub()
    env = Env(tmp_path_factory.mktemp("matrix-llm"), stub)
    yield env
    env.stop()
    stub.close()


def test_openai_sdk_allowed_and_denied_by_environment_alone(llm):
    """The official OpenAI SDK, `OpenAI()` with no arguments, to the OpenAI-compatible stub
    through the bundled llm connector (more in tests/test_llm_connector.py)."""
    from test_llm_connector import AGENT_SIDE_KEY, PROVIDER_KEY

    agent = "assistant-bot"  # llm-users: gpt-4o-mini yes, o1-pro no
    env = agent_env(llm.p.proxy_url_with(agent, llm.tokens[agent]), llm.p.ca_pem,
                    OPENAI_BASE_URL=llm.stub.base_url, OPENAI_API_KEY=AGENT_SIDE_KEY)
    before = len(llm.stub.seen)
    out = subprocess.run([sys.executable, "-c", _OPENAI_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["allowed"]["content"] == "Echo: allowed through the matrix"
    rec = llm.record(got["allowed"]["decision_id"])
    assert (rec["agent"], rec["decision"], rec["action"]) == (agent, "allow", "llm.chat.create")
    denied = got["denied"]
    proctor_fields = denied["body"]["proctor"]
    assert denied["status"] == 403 and denied["code"] == "policy"
    assert proctor_fields["reasons"] == ["llm-pro-models-for-power-users"]
    assert proctor_fields["decision_id"] == denied["decision_id"]
    assert "llm-pro-models-for-power-users" in denied["body"]["message"]
    # only the allowed call reached the provider, with the key Proctor holds
    assert [s["authorization"] for s in llm.stub.seen[before:]] == [f"Bearer {PROVIDER_KEY}"]
    assert llm.record(denied["decision_id"])["decision"] == "deny"
