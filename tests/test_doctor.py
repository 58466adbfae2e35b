"""`proctor doctor` run as an agent would run it: a subprocess with the agent's environment,
against a real proxy (conftest `proctor`) and the recording upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proxy.doctor import FAIL, OK, check_proxy_vars, entry_covers

CLEARED = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "curl_ca_bundle", "ssl_cert_file",
           "requests_ca_bundle", "node_extra_ca_certs"}


def run_doctor(proctor, env: dict[str, str], *args: str) -> tuple[int, dict]:
    base = {k: v for k, v in os.environ.items() if k.lower() not in CLEARED}
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "doctor", "-c", str(proctor.config_path), "--json", *args],
        capture_output=True, text=True, env={**base, **env}, cwd=str(proctor.dir), timeout=60,
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


def test_no_proxy_variables_exits_1(proctor):
    code, report = run_doctor(proctor, {})
    assert code == 1
    assert of(report, "proxy", FAIL) and of(report, "roundtrip", FAIL)


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
