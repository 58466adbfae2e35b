"""`proctor policy explain`: the derivation and the per-policy verdicts, from a curl line or a JSON file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import DATA, connector_manifest


@pytest.fixture
def cfg(tmp_path):
    shutil.copytree(DATA / "policies", tmp_path / "policies")
    (tmp_path / "connectors").mkdir()
    (tmp_path / "connectors" / "testsvc.yaml").write_text(yaml.safe_dump(connector_manifest(9000, 9443)))
    f = tmp_path / "proctor.yaml"
    f.write_text("policies: {dir: policies}\nconnectors_dir: connectors\n")
    return f


def explain(cfg, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "explain", "-c", str(cfg), *args], capture_output=True, text=True, timeout=60
    )


def test_allowed_read_from_a_curl_line(cfg):
    out = explain(cfg, "--agent", "bot", "--json", "--", "curl", "-s", "http://127.0.0.1:9000/items/42")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["decision"] == "allow" and doc["reasons"] == ["agents-read-items"]
    assert doc["classification"]["action"] == "test.item.read"
    assert doc["classification"]["resource"] == 'Item::"42"'
    assert {p["policy_id"]: p["applies"] for p in doc["policies"]}["agents-read-items"] is True
    assert doc["context"]["path"] == "/items/42"


def test_body_forbid_from_a_request_file(cfg, tmp_path):
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"method": "POST", "url": "http://127.0.0.1:9000/items", "body": {"amount": 5000}}))
    out = explain(cfg, "--agent", "w", "--claim", 'groups=["writers"]', "--request", str(req))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "DENY: forbidden by no-big-orders" in text
    # both the permit and the forbid apply; the forbid wins
    assert any("writers-create-items" in line and "applies" in line and "does not" not in line for line in text.splitlines())
    assert "(groups: writers)" in text


def test_evaluation_error_is_shown(cfg):
    out = explain(cfg, "--agent", "bot", "--json", "--", "curl", "http://127.0.0.1:9000/boom")
    doc = json.loads(out.stdout)
    assert doc["decision"] == "deny" and doc["errors"]
    verdicts = {p["policy_id"]: p for p in doc["policies"]}
    assert verdicts["boom-overflow"]["error"] and verdicts["permit-boom"]["applies"]


def test_refused_before_policy(cfg):
    out = explain(cfg, "--agent", "bot", "--", "curl", "https://elsewhere.example/x")
    assert out.returncode == 0
    assert "DENY before any policy: 403 egress-default-deny" in out.stdout
    out = explain(cfg, "--agent", "bot", "--", "curl", "http://127.0.0.1:9000/items/../admin")
    assert "400 request path refused" in out.stdout


@pytest.mark.parametrize("args", [["--", "curl", "-X", "GET"], ["--", "curl", "ftp://x/y"], []], ids=["no-url", "not-http", "nothing"])
def test_unusable_input_exits_2(cfg, args):
    out = explain(cfg, "--agent", "bot", *args)
    assert out.returncode == 2 and out.stderr.startswith("error:")
