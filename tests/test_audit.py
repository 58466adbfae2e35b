"""The OCSF audit trail end to end: events validated against the OCSF 1.3.0 schema,
the hash chain verified and tampering detected, redaction, fail-closed on a broken sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from proxy.audit.chain import Chain, verify
from proxy.audit.ocsf import OCSF_VERSION, to_ocsf
from proxy.audit.trail import Redactor

pytestmark = pytest.mark.integration

SECRET_CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def ocsf_validator():
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION)).get_class_schema("api_activity")
    return jsonschema.Draft202012Validator(schema)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.fixture
def audited(proctor_factory, idp, upstream):
    p = proctor_factory()
    reader = idp.token("reader-bot", groups=["readers"], team="ops")
    writer = idp.token("writer-bot", groups=["writers"])
    base = f"http://127.0.0.1:{upstream.port}"
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as c:
        assert c.get(f"{base}/items/1").status_code == 200
        assert c.delete(f"{base}/items/1").status_code == 403
    with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as c:
        ok = c.post(f"{base}/tenants/7/orders", json={"order": {"total": 12.5, "items": [{"sku": SECRET_CARD}]},
                                                      "password": "hunter2"})
        assert ok.status_code == 200, ok.text
        big = c.post(f"{base}/tenants/7/orders", json={"order": {"total": 5000}})
        assert big.status_code == 403
    with httpx.Client(proxy=p.proxy_url, timeout=10) as c:
        assert c.get(f"{base}/items/1").status_code == 407
    return p


def audit_events(p) -> list[dict]:
    path = p.dir / "state" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_events(p, n: int) -> list[dict]:
    import time

    deadline = time.time() + 5
    while time.time() < deadline:
        evs = audit_events(p)
        if len(evs) >= n:
            return evs
        time.sleep(0.05)
    raise AssertionError(f"expected {n} audit events, got {len(audit_events(p))}")


def test_every_decision_is_one_valid_ocsf_event(audited, ocsf_validator):
    events = wait_events(audited, 5)
    decisions = [r for r in audited.decisions() if "type" not in r]
    assert len(events) == len(decisions) == 5
    for ev in events:
        errors = sorted(ocsf_validator.iter_errors(ev), key=lambda e: e.path)
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        assert ev["class_uid"] == 6003 and ev["metadata"]["version"] == OCSF_VERSION
    by_id = {ev["api"]["request"]["uid"]: ev for ev in events}
    for rec in decisions:
        ev = by_id[rec["decision_id"]]
        assert ev["unmapped"]["proctor"]["decision"] == rec["decision"]
        assert ev["api"]["operation"] == (rec["action"] or "http.request")
        if rec["decision"] == "allow":
            assert ev["status_id"] == 1 and ev["actor"]["authorizations"][0]["decision"] == "allow"
        if rec.get("reasons"):
            assert [a["policy"]["uid"] for a in ev["actor"]["authorizations"]] == rec["reasons"]
    delete = next(ev for ev in events if ev["api"]["operation"] == "test.item.delete")
    assert delete["activity_id"] == 4 and delete["status_id"] == 2 and delete["api"]["response"]["code"] == 403
    read = next(ev for ev in events if ev["api"]["operation"] == "test.item.read")
    assert read["actor"]["user"]["uid"] == "reader-bot"
    assert {"name": "readers"} in read["actor"]["user"]["groups"]
    assert read["src_endpoint"]["ip"] == "127.0.0.1" and read["dst_endpoint"]["port"]
    assert read["unmapped"]["proctor"]["policy_revision"]


def test_a_decision_without_a_policy_revision_is_still_a_valid_event(audited, ocsf_validator):
    """A record from before policy revisions (or one written by hand, as `proctor audit` may be
    fed) has no policy_revision: OCSF's policy.version is a string, so it is left out, not null."""
    for rec in [r for r in audited.decisions() if "type" not in r and r.get("policy_decision")]:
        rec = {k: v for k, v in rec.items() if k != "policy_revision"}
        ev = to_ocsf(rec)
        Chain().link(ev)
        errors = list(ocsf_validator.iter_errors(ev))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        assert all("version" not in a["policy"] for a in ev["actor"]["authorizations"]), ev["actor"]


def test_chain_verifies_and_each_kind_of_tampering_is_located(audited, tmp_path):
    wait_events(audited, 5)
    path = audited.dir / "state" / "audit.jsonl"
    key = ["--key-file", str(audited.dir / "state" / "audit-chain.key")]  # generated on first start (0600)
    out = run_cli("audit", "verify", *key, str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: 5 events, sequence 1..5, keyed (HMAC-SHA256)" in out.stdout
    lines = path.read_text().splitlines(keepends=True)

    def check(name: str, new_lines: list[str]) -> str:
        f = tmp_path / name
        f.write_text("".join(new_lines))
        r = run_cli("audit", "verify", *key, str(f))
        assert r.returncode == 1, r.stdout
        return r.stdout

    modified = json.loads(lines[2])
    modified["message"] = "nothing to see here"
    out = check("modified.jsonl", lines[:2] + [json.dumps(modified) + "\n"] + lines[3:])
    assert "modified.jsonl:3 (sequence 3): modified" in out
    out = check("deleted.jsonl", lines[:1] + lines[2:])
    assert "deleted.jsonl:2 (sequence 3): 1 event(s) missing" in out
    out = check("reordered.jsonl", [lines[0], lines[2], lines[1]] + lines[3:])
    assert "reordered.jsonl:2 (sequence 3)" in out and "reordered.jsonl:3 (sequence 2): out of order" in out


def test_secrets_never_reach_the_record_or_the_audit_trail(audited):
    wait_events(audited, 5)
    state = audited.dir / "state"
    for name in ("audit.jsonl", "decisions.jsonl"):
        text = (state / name).read_text()
        assert SECRET_CARD not in text and "4111111111111111" not in text, name
        assert "hunter2" not in text, name
    text = (state / "audit.jsonl").read_text()
    assert "[redacted]" in text  # the card number was a declared body field: masked, not dropped silently

    assert "eyJ" not in text  # no JWT (the agents' tokens), anywhere


def test_chain_continues_across_a_restart(proctor_factory, idp, upstream):
    p = proctor_factory()
    token = idp.token("reader-bot", groups=["readers"])
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", token), timeout=10) as c:
        c.get(f"http://127.0.0.1:{upstream.port}/items/1")
    wait_events(p, 1)
    p.stop()
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)], cwd=str(p.dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        import time

        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if httpx.get(f"{p.control_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(proxy=p.proxy_url_with("reader-bot", token), timeout=10) as c:
            c.get(f"http://127.0.0.1:{upstream.port}/items/2")
        events = wait_events(p, 2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert [e["metadata"]["sequence"] for e in events] == [1, 2]
    from proxy.audit.keys import read_key_file

    assert verify([p.dir / "state" / "audit.jsonl"], [read_key_file(p.dir / "state" / "audit-chain.key")]).ok


def test_unwritable_file_sink_turns_unhealthy_the_gate_refuses_writes_and_the_gap_is_declared(tmp_path):
    import asyncio
    import time

    from proxy.audit.trail import AuditTrail, FileSink

    d = tmp_path / "audit"
    target = d / "audit.jsonl"
    sink = FileSink(target, 0, 0, 0, False, "fail_closed")
    trail = AuditTrail([sink], Redactor([], []), Chain(), frozenset({"POST"}), 1.0)
    trail.emit({"decision_id": "d1", "time": "2026-11-21T10:00:00Z", "decision": "allow", "method": "GET"})
    assert sink.healthy
    # the directory goes away under the writer (a file where it was: every open fails)
    os.close(sink._fd)
    sink._fd = None
    d.rename(tmp_path / "away")
    d.write_text("")
    trail.emit({"decision_id": "d2", "time": "2026-11-21T10:00:01Z", "decision": "allow", "method": "GET"})
    assert not sink.healthy and sink.stats["failed"] == 1
    assert asyncio.run(trail.admit("GET")) is None  # reads still flow (fail_closed_methods: writes)
    refusal = asyncio.run(trail.admit("POST"))
    assert refusal is not None and refusal.status == 503 and refusal.reasons == ["audit-unavailable"]
    d.unlink()
    (tmp_path / "away").rename(d)
    deadline = time.monotonic() + 5
    while not sink.healthy:  # recovers by itself (probing with backoff), writing the gap marker first
        assert time.monotonic() < deadline, "the file sink did not recover"
        time.sleep(0.02)
    assert asyncio.run(trail.admit("POST")) is None
    trail.emit({"decision_id": "d3", "time": "2026-11-21T10:00:02Z", "decision": "allow", "method": "GET"})
    events = [json.loads(line) for line in target.read_text().splitlines()]
    assert [e["metadata"]["sequence"] for e in events] == [1, 3, 4]
    gap = events[1]["unmapped"]["proctor"]
    assert (gap["record"], gap["event"], gap["from"], gap["to"], gap["decisions"]) == ("audit", "gap", 2, 2, {"allow": 1})
    report = verify([target])
    assert report.ok, report.problems
    assert any("1 event(s) (sequence 2..2) were not written to this file" in n for n in report.notes)


def test_state_change_events_are_valid_ocsf(ocsf_validator):
    for rec in (
        {"type": "approval", "event": "approved", "time": "2026-11-21T10:00:00.000Z", "approval_id": "apr_x",
         "decision_id": "d", "agent": "bot", "action": "erp.purchase_order.create", "resource": 'PurchaseOrder::"new"',
         "state": "approved", "groups": {"mgr": 1}, "by": "alice", "reason": "ok"},
        {"type": "suspension", "event": "suspended", "time": "2026-11-21T10:00:00.000Z", "kind": "agent",
         "target": "bot", "by": "olga", "reason": "loop"},
        {"type": "policy", "event": "rollback", "time": "2026-11-21T10:00:00.000Z", "from_revision": "a",
         "to_revision": "b", "by": "olga", "reason": "bad change", "files_changed": ["x.cedar"]},
    ):
        ev = to_ocsf(rec)
        Chain().link(ev)
        errors = list(ocsf_validator.iter_errors(ev))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_redactor_masks_keys_and_patterns():
    r = Redactor(["password", "Authorization"], [r"\b(?:\d[ -]?){12,18}\d\b"])
    doc = {"a": {"PASSWORD": "x", "n": ["card 4111-1111-1111-1111 ok", 5]}, "authorization": "Bearer x"}
    assert r(doc) == {"a": {"PASSWORD": "[redacted]", "n": ["card [redacted] ok", 5]}, "authorization": "[redacted]"}
