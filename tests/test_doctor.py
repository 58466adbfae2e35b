"""`proctor doctor` run as an agent would run it: a subprocess with the agent's environment,
against a real proxy (conftest `proctor`) and the recording upstream; Node.js with and without
the preload docs/agents.md gives (the client matrix's `npm ci` of tests/node); and transparent
mode proven in network namespaces (tests/support/transparent_netns.py): the same command finds
interception active for the redirected uid and a bypass for the exempt one."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from conftest import DATA, wait_for
from proxy.doctor import (
    FAIL, NODE_RECIPE, OK, SET_PROXY_FIX, SKIP, TOKEN_FIX, WARN, _scrub, check_proxy_vars, entry_covers, node_preloads,
)
from support.transparent_netns import AGENT_UID, FORWARD_PORT, HTTP_PORT, HTTPS_PORT, PROXY_UID, Netns, python_for, \
    why_no_netns
from test_client_matrix import node_preload  # noqa: F401 - the fixture: tests/node's packages, npm ci'd once

CLEARED = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "curl_ca_bundle", "ssl_cert_file",
           "requests_ca_bundle", "node_extra_ca_certs", "node_options", "ssl_cert_dir", "path"}
NODE = shutil.which("node")
NO_NODE_PATH = "/nonexistent"  # a PATH without node: the Node checks are skipped (a note)


def run_doctor(proctor, env: dict[str, str], *args: str) -> tuple[int, dict]:
    base = {k: v for k, v in os.environ.items() if k.lower() not in CLEARED}
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "doctor", "-c", str(proctor.config_path), "--json", *args],
        capture_output=True, text=True, env={**base, "PATH": NO_NODE_PATH, **env}, cwd=str(proctor.dir), timeout=90,
    )
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


def good_env(proctor, token: str) -> dict[str, str]:
    url = proctor.proxy_url_with("reader-bot", token)
    ca = str(proctor.ca_pem)
    return {"http_proxy": url, "HTTP_PROXY": url, "https_proxy": url, "HTTPS_PROXY": url,
            "CURL_CA_BUNDLE": ca, "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca, "NODE_EXTRA_CA_CERTS": ca}


def of(report: dict, check: str, status: str | None = None) -> list[dict]:
    return [f for f in report["findings"] if f["check"] == check and (status is None or f["status"] == status)]


def decision_in(message: str) -> str:
    return re.search(r"X-Proctor-Decision-Id: ([0-9a-f-]+)", message).group(1)


def test_all_good_environment_exits_0_and_sees_the_decision(proctor, reader_token):
    code, report = run_doctor(proctor, good_env(proctor, reader_token))
    assert code == 0, report
    assert report["ok"] is True
    [trip] = of(report, "roundtrip", OK)
    decision_id = trip["message"].split("X-Proctor-Decision-Id: ")[1].split(" ")[0]
    assert proctor.decision(decision_id)["decision_id"] == decision_id  # Proctor recorded that very request
    assert len(of(report, "ca", OK)) == 4
    assert reader_token not in json.dumps(report)  # the token is shown only as present
    assert any("<token hidden>" in f["message"] for f in of(report, "proxy"))
    # forward mode on a host: the straight GET reached the upstream itself (no interception),
    # which clients that ignore the variables would do too: a warning, not a failure
    [direct] = of(report, "transparent", WARN)
    assert direct["message"].startswith("no transparent interception: clients that ignore the proxy variables")
    assert "without X-Proctor-Decision-Id" in direct["message"]
    [node] = of(report, "node")
    assert node["status"] == SKIP and "node is not on PATH" in node["message"]


def test_the_straight_probe_sends_no_credential_and_the_proxied_one_is_stripped(proctor, reader_token, upstream):
    """Never a token to a host that is not Proctor: the probe straight to the host carries none,
    and the one through Proctor arrives without the proxy credential."""
    path = f"/items/doctor-{uuid.uuid4().hex[:8]}"
    code, report = run_doctor(proctor, good_env(proctor, reader_token), "--url", f"http://127.0.0.1:{upstream.port}{path}")
    assert code == 0, report
    got = [e for e in upstream.received() if e["path"] == path]
    assert [e["method"] for e in got] == ["GET", "GET"]  # one straight, one through Proctor; no retries
    names = [{k.lower() for k, _ in e["headers"]} for e in got]
    assert all(not ({"authorization", "proxy-authorization", "cookie"} & n) for n in names), got
    assert reader_token not in json.dumps(got)
    [trip] = of(report, "roundtrip", OK)
    assert proctor.decision(decision_in(trip["message"]))["agent"] == "reader-bot"


def test_no_proxy_covering_a_connector_host_exits_1_with_the_entry_and_fix(proctor, reader_token):
    env = {**good_env(proctor, reader_token), "NO_PROXY": "example.org,127.0.0.1"}
    code, report = run_doctor(proctor, env)
    assert code == 1
    [bad] = of(report, "no_proxy", FAIL)
    assert "'127.0.0.1'" in bad["message"] and "testsvc" in bad["message"]
    assert bad["fix"] == "export NO_PROXY=example.org"


def test_upper_case_http_proxy_only_is_flagged_for_curl(proctor, reader_token):
    env = {"HTTP_PROXY": proctor.proxy_url_with("reader-bot", reader_token),
           "HTTPS_PROXY": proctor.proxy_url_with("reader-bot", reader_token)}
    code, report = run_doctor(proctor, env)
    assert code == 1
    curl = [f for f in of(report, "proxy", FAIL) if "curl" in f["message"]]
    assert curl and curl[0]["fix"] == "export http_proxy=$HTTP_PROXY"


def test_ca_variable_with_another_pem_is_a_finding(proctor, reader_token, pki):
    env = {**good_env(proctor, reader_token), "SSL_CERT_FILE": str(pki.ca_pem)}  # a CA, but not Proctor's
    code, report = run_doctor(proctor, env)
    assert code == 1
    [bad] = of(report, "ca", FAIL)
    assert bad["message"].startswith(f"SSL_CERT_FILE={pki.ca_pem} does not contain Proctor's CA")
    assert "proctor ca export" in bad["fix"]


def test_an_unset_ca_variable_fails_where_its_client_runs(proctor, reader_token):
    """A new user who leaves out one CA variable of docs/agents.md's export block: that client's
    https:// calls through Proctor fail, so doctor fails with the export that fixes it. The
    variable of a client not installed here (node, curl not on PATH) is a warning."""
    env = {k: v for k, v in good_env(proctor, reader_token).items() if k != "SSL_CERT_FILE"}
    code, report = run_doctor(proctor, env)
    assert code == 1
    [bad] = of(report, "ca", FAIL)
    assert bad["message"].startswith("SSL_CERT_FILE is not set: Python ssl, httpx, aiohttp (OpenSSL) will not trust")
    assert bad["fix"] == "proctor ca export ca.pem (where `proctor run` runs, or with its -c), then export SSL_CERT_FILE=$PWD/ca.pem"
    curl = shutil.which("curl")
    assert curl is not None
    env = {k: v for k, v in good_env(proctor, reader_token).items() if k != "CURL_CA_BUNDLE"}
    code, report = run_doctor(proctor, {**env, "PATH": os.path.dirname(curl)}, "--no-node")
    assert code == 1
    [bad] = of(report, "ca", FAIL)
    assert bad["message"].startswith("CURL_CA_BUNDLE is not set: curl will not trust Proctor's CA")
    assert bad["fix"] == "proctor ca export ca.pem (where `proctor run` runs, or with its -c), then export CURL_CA_BUNDLE=$PWD/ca.pem"
    env = {k: v for k, v in good_env(proctor, reader_token).items() if k != "NODE_EXTRA_CA_CERTS"}
    code, report = run_doctor(proctor, env)  # PATH without node
    assert code == 0, report
    [note] = of(report, "ca", WARN)
    assert note["message"] == ("NODE_EXTRA_CA_CERTS is not set (node is not on PATH here; set it where the agent "
                               "runs Node)")


def test_lower_case_only_proxy_variables_are_flagged_for_node(proctor, reader_token):
    url = proctor.proxy_url_with("reader-bot", reader_token)
    env = {k: v for k, v in good_env(proctor, reader_token).items() if k not in ("HTTP_PROXY", "HTTPS_PROXY")}
    code, report = run_doctor(proctor, {**env, "http_proxy": url, "https_proxy": url})
    assert code == 0, report  # curl, Python and undici read the lower-case names: only Node's global-agent does not
    warns = of(report, "proxy", WARN)
    assert [f["fix"] for f in warns] == ["export HTTP_PROXY=$http_proxy", "export HTTPS_PROXY=$https_proxy"]
    assert all("global-agent" in f["message"] for f in warns)


def test_the_fix_for_missing_proxy_variables_runs_as_written():
    """Copy-pasted into a shell, the fix sets all four variables (one `export A=x B=$A` would
    leave B empty: the shell expands $A before export runs)."""
    script = SET_PROXY_FIX.replace("<agent-id>:<jwt>", "bot:tok") + '; echo "$HTTP_PROXY|$https_proxy|$http_proxy"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={}, timeout=10)
    assert out.stdout.strip() == "|".join(["http://bot:tok@127.0.0.1:8080"] * 3)
    token_script = TOKEN_FIX.partition(": ")[2].replace("TOKEN=$(proctor token issue --agent <agent-id>) (the dev "
                                                         "issuer; in production a token from your IdP), then ",
                                                         "TOKEN=tok; ").replace("<agent-id>", "bot")
    out = subprocess.run(["bash", "-c", token_script + '; echo "$HTTPS_PROXY|$http_proxy"'], capture_output=True,
                         text=True, env={}, timeout=10)
    assert out.stdout.strip() == "http://bot:tok@127.0.0.1:8080|http://bot:tok@127.0.0.1:8080"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_credentials_proctor_refuses_fail_with_its_reason(proctor, idp, upstream, upstream_tls, scheme):
    """A proxy URL without a token, with an expired one, or with another agent's name: Proctor
    answers 407 (over https:// to the CONNECT, which the client only reports as an error).
    That is not a working path: every request is refused, so doctor fails and says why."""
    url = (f"http://127.0.0.1:{upstream.port}/items/1" if scheme == "http"
           else f"https://localhost:{upstream_tls.port}/items/1")
    expired = idp.token("reader-bot", groups=["readers"], ttl=-600)
    cases = [("http://127.0.0.1:{port}", "no agent credential"),
             (f"http://reader-bot:{expired}@127.0.0.1:{{port}}", "expired"),
             (f"http://someone-else:{idp.token('reader-bot')}@127.0.0.1:{{port}}", "must equal the agent id")]
    for proxy, why in cases:
        proxy = proxy.format(port=proctor.port)
        env = {**good_env(proctor, "x"), **{v: proxy for v in ("http_proxy", "HTTP_PROXY", "https_proxy",
                                                                "HTTPS_PROXY")}}
        code, report = run_doctor(proctor, env, "--url", url)
        assert code == 1, report
        [trip] = of(report, "roundtrip", FAIL)
        assert "407 with X-Proctor-Decision-Id" in trip["message"], trip
        assert "Proctor refused the proxy credentials" in trip["message"] and why in trip["message"], trip
        assert ("answered the CONNECT" in trip["message"]) is (scheme == "https")
        assert "[REDACTED]" not in trip["message"]  # the detail's advice survives redaction
        assert trip["fix"] == TOKEN_FIX and "proctor token issue --agent <agent-id>" in trip["fix"]
        assert proctor.decision(decision_in(trip["message"]))["status"] == 407
        assert expired not in json.dumps(report)


def test_proctor_not_running_says_to_start_it(proctor, reader_token):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://reader-bot:{reader_token}@127.0.0.1:{port}"
    env = {**good_env(proctor, reader_token), **{v: dead for v in ("http_proxy", "HTTP_PROXY", "https_proxy",
                                                                  "HTTPS_PROXY")}}
    code, report = run_doctor(proctor, env)
    assert code == 1
    [trip] = of(report, "roundtrip", FAIL)
    assert f"failed: nothing listens at 127.0.0.1:{port}" in trip["message"]
    assert trip["fix"].startswith("start Proctor there (proctor run -c <its config>")
    assert reader_token not in json.dumps(report)


def test_a_tunnel_proctor_refuses_still_proves_the_path(proctor, reader_token):
    """--url a host no connector covers: Proctor refuses the CONNECT (403 egress); that answer
    comes from Proctor, so the path is proven, and the finding says what to try instead."""
    code, report = run_doctor(proctor, good_env(proctor, reader_token), "--url", "https://nothing.invalid/ok")
    assert code == 0, report
    [trip] = of(report, "roundtrip", OK)
    assert "Proctor refused the tunnel (answered the CONNECT 403 with X-Proctor-Decision-Id" in trip["message"]
    assert "egress-default-deny" in trip["message"] and "no connector covers nothing.invalid: give --url" in trip["message"]
    assert proctor.decision(decision_in(trip["message"]))["agent"] == "reader-bot"


def test_a_ca_that_cannot_be_compared_says_why(proctor, reader_token, tmp_path):
    """Proctor's CA not readable where doctor runs: the finding's fix says what to do there
    (not 'pass -c' when -c was passed). In a transparent pod the agent's uid cannot read
    Proctor's state at all: then the reason is the file's error."""
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(f"state_dir: {tmp_path / 'state'}\n")  # Proctor never started there: no CA yet
    base = {k: v for k, v in os.environ.items() if k.lower() not in CLEARED}
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "doctor", "-c", str(fresh), "--json", "--no-node"],
                         capture_output=True, text=True, env={**base, **good_env(proctor, reader_token)},
                         cwd=str(tmp_path), timeout=90)
    report = json.loads(out.stdout)
    notes = of(report, "ca", WARN)
    assert len(notes) == 4, report  # each variable is set, to a PEM doctor cannot compare
    assert all(n["message"].endswith("Proctor's CA unknown here, not compared") for n in notes)
    assert notes[0]["fix"].startswith(f"no Proctor CA in {tmp_path / 'state' / 'ca'} yet (Proctor creates it when it "
                                      "first starts there)")
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "doctor", "--json", "--no-node"],
                         capture_output=True, text=True, env={**base, **good_env(proctor, reader_token)},
                         cwd=str(tmp_path), timeout=90)  # no -c, and no ./.proctor here
    [first, *_] = of(json.loads(out.stdout), "ca", WARN)
    assert "pass -c with the proxy's config, in the directory it runs from, to compare" in first["fix"]


def test_a_missing_config_file_says_what_to_pass(proctor, tmp_path):
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "doctor", "-c", str(tmp_path / "proctor.yaml")],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert out.returncode == 1
    assert "config file not found" in out.stderr and "leave out -c for the embedded default" in out.stderr


def test_no_proxy_variables_and_no_redirect_is_a_bypass(proctor, upstream):
    """Nothing routes this environment to Proctor: the straight GET reaches the upstream."""
    code, report = run_doctor(proctor, {})
    assert code == 1
    [bypass] = of(report, "transparent", FAIL)
    assert bypass["message"].startswith(f"traffic reaches 127.0.0.1:{upstream.port} around Proctor: no proxy variables "
                                        "and no transparent interception")
    assert "docs/agents.md" in bypass["fix"] and "docs/transparent.md" in bypass["fix"]
    assert of(report, "proxy", FAIL) and not of(report, "roundtrip")  # no proxy to go through


def test_transparent_flag_makes_missing_interception_a_failure(proctor, reader_token):
    code, report = run_doctor(proctor, good_env(proctor, reader_token), "--transparent")
    assert code == 1
    [missing] = of(report, "transparent", FAIL)
    assert missing["message"].startswith("no transparent interception (--transparent)")
    assert of(report, "roundtrip", OK)  # the proxy path itself works


def test_an_answer_from_proctors_own_listener_is_not_interception(proctor):
    """A decision id from Proctor's gateway asking for credentials (401) proves nothing about
    the network: only a redirected request is answered without credentials."""
    code, report = run_doctor(proctor, {}, "--url", f"{proctor.gateway_url}/svc/items/1")
    assert code == 1
    [warn] = of(report, "transparent", WARN)
    assert "asking for credentials" in warn["message"] and "active" not in warn["message"]
    assert of(report, "proxy", FAIL)


def test_a_proxy_that_is_not_proctor_is_a_bypass(proctor, reader_token, upstream):
    # The echo server answers absolute-form requests itself: a 200 with no decision id.
    env = {**good_env(proctor, reader_token), "http_proxy": f"http://127.0.0.1:{upstream.port}"}
    code, report = run_doctor(proctor, env, "--url", f"http://127.0.0.1:{upstream.port}/items/1")
    assert code == 1
    [trip] = of(report, "roundtrip", FAIL)
    assert "without X-Proctor-Decision-Id" in trip["message"]


def test_text_output_prints_each_fix(proctor):
    base = {k: v for k, v in os.environ.items() if k.lower() not in CLEARED}
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "doctor", "-c", str(proctor.config_path)],
                         capture_output=True, text=True, env={**base, "NO_PROXY": "*"}, cwd=str(proctor.dir),
                         timeout=60)
    assert out.returncode == 1
    assert "[FAIL] no_proxy: NO_PROXY entry '*' covers" in out.stdout
    assert "fix: unset NO_PROXY" in out.stdout


@pytest.mark.parametrize(("entry", "host", "covers"), [
    ("*", "api.openai.com", True),
    ("api.openai.com", "api.openai.com", True),
    ("openai.com", "api.openai.com", True),
    (".openai.com", "api.openai.com", True),
    ("*.openai.com", "api.openai.com", True),
    ("notopenai.com", "api.openai.com", False),
    ("example.com", "crm.example.com", True),
    ("service-now.com", "*.service-now.com", True),
    ("acme.service-now.com", "*.service-now.com", True),
    ("now.com", "*.service-now.com", False),
    ("127.0.0.1", "127.0.0.1:9101", True),
    ("127.0.0.0/8", "127.0.0.1:9101", True),
    ("10.0.0.0/8", "127.0.0.1:9101", False),
    ("127.0.0.1:9101", "127.0.0.1:9101", True),
    ("127.0.0.1:9999", "127.0.0.1:9101", False),
    ("localhost", "127.0.0.1:9101", False),  # clients match names, not what they resolve to
    ("localhost", "localhost:9104", True),
    ("api.openai.com:443", "api.openai.com", True),
    ("api.openai.com:8443", "api.openai.com", False),
    ("::1", "[::1]:8080", True),
])
def test_no_proxy_matching(entry: str, host: str, covers: bool):
    assert entry_covers(entry, host) is covers


def test_mismatched_cases_and_missing_credentials():
    findings = check_proxy_vars({"https_proxy": "http://127.0.0.1:8080", "HTTPS_PROXY": "http://127.0.0.1:9090",
                                 "http_proxy": "http://a:secret@127.0.0.1:8080"})
    assert any(f.status == FAIL and "differ" in f.message for f in findings)
    assert any(f.status != OK and "no credentials" in f.message for f in findings)
    assert not any("secret" in f.message for f in findings)


def test_node_preload_parsing_and_scrubbing():
    assert node_preloads('--require /opt/p.cjs --max-old-space-size=64 -r ./x.cjs --import=file:///y.mjs') == [
        "/opt/p.cjs", "./x.cjs", "file:///y.mjs"]
    assert node_preloads('--require "/opt/with space/p.cjs"') == ["/opt/with space/p.cjs"]
    assert node_preloads("--max-old-space-size=64") == []
    env = {"HTTPS_PROXY": "http://a:s3cr%2Ft@127.0.0.1:8080"}
    assert _scrub("proxy said s3cr/t and s3cr%2Ft", env) == "proxy said <token hidden> and <token hidden>"


# ------------------------------------------------------------------ Node.js
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (the Node checks need it)")


@needs_node
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_node_with_the_preload_goes_through_proctor(proctor, reader_token, node_preload, upstream, upstream_tls,  # noqa: F811
                                                   scheme):
    env = {**good_env(proctor, reader_token), "PATH": os.environ["PATH"],
           "NODE_OPTIONS": f"--require {node_preload}"}
    url = (f"http://127.0.0.1:{upstream.port}/items/node-doc" if scheme == "http"
           else f"https://localhost:{upstream_tls.port}/items/node-doc")
    code, report = run_doctor(proctor, env, "--url", url)
    assert code == 0, report
    [preload, live] = of(report, "node", OK)
    assert preload["message"].startswith(f"NODE_OPTIONS preloads {node_preload}")
    assert "through the proxy variables" in live["message"]
    rec = proctor.decision(decision_in(live["message"]))
    assert (rec["agent"], rec["decision"], rec["path"]) == ("reader-bot", "allow", "/items/node-doc")


@needs_node
def test_node_without_the_preload_is_a_bypass_with_the_recipe(proctor, reader_token, upstream):
    """With `--node` (the agent runs Node) the bypass is a failure; with node merely on PATH and
    nothing saying the agent runs it (no preload), the same finding is a warning: a Python or curl
    agent configured as documented passes."""
    path = f"/items/node-bare-{uuid.uuid4().hex[:8]}"
    env = {**good_env(proctor, reader_token), "PATH": os.environ["PATH"]}
    url = f"http://127.0.0.1:{upstream.port}{path}"
    code, report = run_doctor(proctor, env, "--url", url, "--node", shutil.which("node"))
    assert code == 1, report
    [warn] = of(report, "node", WARN)
    assert warn["message"].startswith("NODE_OPTIONS is not set: Node's fetch ignores HTTP(S)_PROXY without it")
    assert warn["fix"] == NODE_RECIPE and '--require /opt/proctor-node/proctor-proxy.cjs' in warn["fix"]
    [bypass] = of(report, "node", FAIL)
    assert "Node's fetch reached" in bypass["message"] and "around Proctor" in bypass["message"]
    assert bypass["fix"] == NODE_RECIPE
    assert [f for f in report["findings"] if f["status"] == FAIL] == [bypass]  # everything else is fine
    got = [e for e in upstream.received() if e["path"] == path]
    assert len(got) == 3  # doctor's straight GET, its GET through Proctor, and Node's straight one
    assert reader_token not in json.dumps(got)

    code, report = run_doctor(proctor, env, "--url", url)  # node only found on PATH
    assert code == 0, report
    assert not of(report, "node", FAIL)
    live = [f for f in of(report, "node", WARN) if "Node's fetch reached" in f["message"]]
    assert len(live) == 1 and "if this agent runs Node, that is a bypass" in live[0]["message"]
    assert live[0]["fix"] == NODE_RECIPE


@needs_node
def test_node_preload_that_does_not_exist_is_a_failure(proctor, reader_token):
    env = {**good_env(proctor, reader_token), "PATH": os.environ["PATH"],
           "NODE_OPTIONS": "--require /nonexistent/proctor-proxy.cjs"}
    code, report = run_doctor(proctor, env)
    assert code == 1
    missing, live = of(report, "node", FAIL)
    assert "does not exist here: every node process fails to start" in missing["message"]
    assert live["message"].startswith("Node's fetch GET") and "before fetching" in live["message"]
    assert reader_token not in json.dumps(report)


@needs_node
def test_node_through_the_preload_to_a_refused_tunnel_is_proctors_answer(proctor, reader_token, node_preload):  # noqa: F811
    """undici reports a refused CONNECT only as `Proxy response (403) !== 200`: the same refusal
    Proctor gave doctor's own CONNECT, so Node went through Proctor (not the recipe's fault)."""
    env = {**good_env(proctor, reader_token), "PATH": os.environ["PATH"], "NODE_OPTIONS": f"--require {node_preload}"}
    code, report = run_doctor(proctor, env, "--url", "https://nothing.invalid/ok")
    assert code == 0, report
    live = [f for f in of(report, "node", OK) if "fetch GET" in f["message"]]
    assert len(live) == 1 and "through the proxy variables; Proctor refused the tunnel with 403" in live[0]["message"]


@needs_node
def test_node_without_the_preload_that_fails_says_it_went_straight(proctor, reader_token):
    env = {**good_env(proctor, reader_token), "PATH": os.environ["PATH"]}
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report = run_doctor(proctor, env, "--url", f"http://127.0.0.1:{port}/nothing", "--node", shutil.which("node"))
    assert code == 1
    [failed] = [f for f in of(report, "node", FAIL) if "fetch" in f["message"]]
    assert "ECONNREFUSED" in failed["message"]
    assert failed["message"].endswith("without a preload in NODE_OPTIONS, Node's fetch ignores the proxy variables and "
                                      f"went straight to 127.0.0.1:{port}")
    assert failed["fix"] == NODE_RECIPE


def test_node_explicit_path_must_be_executable(proctor, reader_token, tmp_path):
    not_node = tmp_path / "node"
    not_node.write_text("")
    code, report = run_doctor(proctor, good_env(proctor, reader_token), "--node", str(not_node))
    assert code == 1
    [bad] = of(report, "node", FAIL)
    assert bad["message"] == f"--node {not_node} is not an executable file"
    code, report = run_doctor(proctor, good_env(proctor, reader_token), "--no-node")
    assert code == 0 and not of(report, "node")


# ------------------------------------------------------------------ transparent mode, in network namespaces
NO_NETNS = why_no_netns()
WORKLOAD = "support-agent"


@pytest.fixture(scope="module")
def pod(idp):
    if NO_NETNS is not None:
        pytest.skip(NO_NETNS)
    ns = Netns("iptables")
    try:
        ns.build(idp, idp.token(WORKLOAD, groups=["readers", "writers"], ttl=3600), policies=DATA / "policies")
        yield ns
    finally:
        ns.close()


def ca_env(pod: Netns) -> dict[str, str]:
    ca = str(pod.proctor_ca)
    return {v: ca for v in ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")}


def doctor_in(pod: Netns, env: dict[str, str] | None = None, *args: str, uid: int = AGENT_UID) -> tuple[int, dict]:
    """`proctor doctor` in the agent's pod, as `uid`, with the agent's clean environment and the
    sidecar's config (readable: its connectors name the hosts; its state, CA key and token are not)."""
    if env is None:  # the agent's environment as docs/agents.md sets it: every client trusts Proctor's CA
        env = ca_env(pod)
    done = pod.as_agent([*python_for(uid), "-m", "proxy.cli", "doctor", "-c", str(pod.pdir / "proctor.yaml"),
                         "--json", *args], env, uid=uid, timeout=120)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.integration
def test_transparent_interception_is_active_for_the_redirected_agent(pod: Netns):
    pod.clear_logs()
    code, report = doctor_in(pod)
    assert code == 0, report
    [active] = of(report, "transparent", OK)
    assert active["message"].startswith(f"transparent interception: active (GET http://erp.test:{HTTP_PORT}/ "
                                        "without a proxy answered 403 with X-Proctor-Decision-Id")
    assert f"the sidecar's workload identity (agent {WORKLOAD})" in active["message"]
    rec = pod.decision(decision_in(active["message"]))
    assert (rec["agent"], rec["mode"]) == (WORKLOAD, "transparent")
    [proxy] = of(report, "proxy")
    assert proxy["status"] == OK and "none is needed" in proxy["message"]
    [node] = of(report, "node", OK)  # Node's own fetch, no preload, no variable: intercepted too
    assert "intercepted by the transparent redirect" in node["message"]
    assert pod.decision(decision_in(node["message"]))["mode"] == "transparent"
    assert pod.received("erp-http") == []  # GET / maps to no operation: refused, nothing forwarded


@pytest.mark.integration
def test_the_exempt_uid_is_not_redirected_and_doctor_says_bypass(pod: Netns):
    """The same command in the same namespace, as the uid the rules exempt (Proctor's own):
    no decision id, so a bypass, with both fixes."""
    pod.clear_logs()
    code, report = doctor_in(pod, None, "--no-node", uid=PROXY_UID)
    assert code == 1
    [bypass] = of(report, "transparent", FAIL)
    assert bypass["message"].startswith(f"traffic reaches erp.test:{HTTP_PORT} around Proctor: no proxy variables and "
                                        "no transparent interception")
    [got] = pod.received("erp-http")
    assert got["path"] == "/" and not ({k.lower() for k, _ in got["headers"]} & {"authorization", "x-erp-key"})


@pytest.mark.integration
def test_https_interception_with_and_without_trusting_proctors_ca(pod: Netns):
    url = f"https://erp.test:{HTTPS_PORT}/items/1"
    code, report = doctor_in(pod, {}, "--url", url)
    assert code == 1
    [untrusted] = of(report, "transparent", FAIL)
    assert "presented a certificate issued by O=Proctor,CN=Proctor Interception CA" in untrusted["message"]
    assert "does not trust Proctor's CA" in untrusted["message"] and "SSL_CERT_FILE" in untrusted["fix"]
    assert of(report, "proxy", OK)  # interception is proven, by the certificate
    code, report = doctor_in(pod, ca_env(pod), "--url", url)
    assert code == 0, report
    [active] = of(report, "transparent", OK)
    assert "answered 200 with X-Proctor-Decision-Id" in active["message"]
    assert pod.decision(decision_in(active["message"]))["agent"] == WORKLOAD


@pytest.mark.integration
def test_proxy_variables_in_the_pod_name_both_paths(pod: Netns, idp):
    token = idp.token("forward-bot", groups=["readers"], ttl=3600)
    proxy = f"http://forward-bot:{token}@127.0.0.1:{FORWARD_PORT}"  # the sidecar's forward listener (loopback)
    pod.netsetup("--protect-port", "none")  # (by default the rules refuse the agent that port)
    try:
        code, report = doctor_in(pod, {**ca_env(pod), **{v: proxy for v in ("http_proxy", "HTTP_PROXY", "https_proxy",
                                                                            "HTTPS_PROXY")}})
    finally:
        pod.netsetup()
    assert code == 0, report
    [trip] = of(report, "roundtrip", OK)
    assert "decided as agent forward-bot" in trip["message"]
    [paths] = of(report, "transparent", WARN)
    assert "two paths: clients that read http_proxy go to Proctor's forward listener" in paths["message"]
    assert "decided as agent forward-bot" in paths["message"] and f"(agent {WORKLOAD})" in paths["message"]
    assert paths["fix"].startswith("unset http_proxy HTTP_PROXY")
    live = [f for f in of(report, "node", OK) if "fetch" in f["message"]]
    assert len(live) == 1 and f"as the workload identity {WORKLOAD}: it ignored the proxy variables" in live[0]["message"]
    assert token not in json.dumps(report)


@pytest.mark.integration
def test_proxy_variables_to_another_proxy_are_redirected_and_refused(pod: Netns, idp):
    token = idp.token("forward-bot", groups=["readers"], ttl=3600)
    proxy = f"http://forward-bot:{token}@10.88.0.3:3128"  # any other proxy: the network sends it to Proctor
    code, report = doctor_in(pod, {v: proxy for v in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")},
                             "--no-node")
    assert code == 1
    [refused] = of(report, "roundtrip", FAIL)
    assert "transparent-proxy-credentials" in refused["message"] and refused["fix"].startswith("unset http_proxy")
    [paths] = of(report, "transparent", WARN)
    assert "which the network redirects to the transparent listener: refused 400" in paths["message"]
    assert token not in json.dumps(report)


@pytest.mark.integration
def test_an_unusable_workload_identity_is_a_failure(pod: Netns, idp):
    good = idp.token(WORKLOAD, groups=["readers", "writers"], ttl=3600)
    pod.write_token("not-a-jwt")
    try:
        wait_for(lambda: pod.control("/readyz")[0] == 503, timeout=10, what="the sidecar noticing the bad token")
        code, report = doctor_in(pod, None, "--no-node")
        assert code == 1
        [down] = of(report, "transparent", FAIL)
        assert "but the sidecar's workload identity is unavailable: every request is refused 503" in down["message"]
        assert "token_file" in down["fix"]
    finally:
        pod.write_token(good)
        wait_for(lambda: pod.control("/readyz")[0] == 200, timeout=10, what="the sidecar back with its token")


@pytest.mark.parametrize("bad", ["ftp://127.0.0.1/x", "http:///nohost", "127.0.0.1:8080/x", "http://h:99999/"])
def test_a_url_that_is_not_http_is_refused_before_any_probe(proctor, bad):
    code, report = run_doctor(proctor, {}, "--url", bad)
    assert code == 1
    assert report["findings"] == [{"check": "roundtrip", "status": FAIL,
                                   "message": f"--url {bad!r} is not an http:// or https:// URL with a host",
                                   "fix": "give --url a connector URL, e.g. https://erp.example.com/ping"}]


def test_which_variables_the_node_recipes_global_agent_reads():
    """global-agent 4.x reads HTTP_PROXY/HTTPS_PROXY only: never ALL_PROXY, and for https:// it
    falls back to HTTP_PROXY. The lower-case-only warning follows exactly that (unit)."""
    from proxy.doctor import check_proxy_vars

    url = "http://bot:tok@127.0.0.1:8080"

    def warned(env: dict[str, str]) -> list[str]:
        return [f.fix for f in check_proxy_vars(env) if f.status == WARN and "global-agent" in f.message]

    assert warned({"http_proxy": url, "https_proxy": url, "ALL_PROXY": url}) == [
        "export HTTP_PROXY=$http_proxy", "export HTTPS_PROXY=$https_proxy"]
    assert warned({"http_proxy": url, "https_proxy": url, "HTTP_PROXY": url}) == []
    assert warned({"https_proxy": url, "HTTPS_PROXY": url, "http_proxy": url}) == ["export HTTP_PROXY=$http_proxy"]
    assert warned({k: url for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}) == []
