"""Policy revisions and rollback, end to end: a real proxy, real requests, the control API and the CLI.

Every policy set the proxy loads (startup, file-watch reload, /v1/policies/reload)
is kept in the store; `proctor policy rollback REV --reason R` writes a kept
revision's files back into the policy directory and reloads. Operators are
approver-audience tokens whose `approval_groups` contain `proctor-admins`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import requests
from click.testing import CliRunner

from conftest import Proctor, start_proctor, wait_for

from proxy.cli import main as proctor_cli

pytestmark = pytest.mark.integration

ADMINS = "proctor-admins"
NO_READS = (
    '\n@id("no-item-reads")\nforbid (\n  principal,\n  action == Action::"test.item.read",\n  resource\n);\n'
)


# ------------------------------------------------------------------------ helpers
def write_atomically(path: Path, text: str) -> None:
    """Replace a policy file in one step, so the 0.2 s watcher never loads a half-written set."""
    fd, tmp = tempfile.mkstemp(dir=path.parent.parent, prefix=".edit-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def operator_token(idp, who: str = "olga", *groups: str) -> str:
    return idp.token(who, aud="proctor-approvers", approval_groups=list(groups or [ADMINS]), ttl=600)


def api(p: Proctor, method: str, path: str, token: str | None, **kw) -> httpx.Response:
    headers = dict(kw.pop("headers", {}) or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"{p.control_url}{path}", headers=headers, timeout=10, **kw)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        proctor_cli, list(args), catch_exceptions=False, env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None}
    )
    return result.exit_code, result.stdout, result.stderr


def as_admin(p: Proctor) -> list[str]:
    return ["-c", str(p.config_path), "--as", "olga", "--group", ADMINS]


def revisions(p: Proctor) -> dict:
    code, out, err = cli("policy", "revisions", "--json", *as_admin(p))
    assert code == 0, err
    return json.loads(out)


def active_revision(p: Proctor) -> str:
    return httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["active_revision"]


def read_item(p: Proctor, idp, upstream) -> requests.Response:
    tok = idp.token("rev-reader", groups=["readers"])
    return requests.get(
        f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": p.proxy_url_with("rev-reader", tok)}, timeout=10
    )


def wait_revision_change(p: Proctor, before: str) -> str:
    wait_for(lambda: active_revision(p) != before, timeout=10, what="policy reload")
    return active_revision(p)


def decision(p: Proctor, decision_id: str) -> dict:
    # (Proctor.decision assumes every line is a decision; rollback events are not)
    (rec,) = [d for d in p.decisions() if d.get("decision_id") == decision_id]
    return rec


def policy_events(p: Proctor) -> list[dict]:
    return [d for d in p.decisions() if d.get("type") == "policy"]


def restart(p: Proctor) -> Proctor:
    """Stop `p` and start `proctor run` again on the same config, state dir and policy dir."""
    p.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path), "--log-level", "info"],
        stdout=open(p.log_path, "a"), stderr=subprocess.STDOUT, cwd=str(p.dir), env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"proctor exited with {proc.returncode}:\n{p.log()}")
        try:
            return httpx.get(f"{p.control_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="proctor readiness after restart")
    return dataclasses.replace(p, proc=proc)


# ------------------------------------------------------------------------ the whole story
def test_edit_list_rollback_restart(proctor_factory, idp, upstream):
    p = proctor_factory(name="rev")
    items = p.policies_dir / "items.cedar"
    original = items.read_text()
    assert read_item(p, idp, upstream).status_code == 200
    rev1 = active_revision(p)

    # an edit takes effect through the file watcher: reads are now forbidden
    write_atomically(items, original + NO_READS)
    rev2 = wait_revision_change(p, rev1)
    denied = read_item(p, idp, upstream)
    assert denied.status_code == 403
    assert decision(p, denied.headers["x-proctor-decision-id"])["reasons"] == ["no-item-reads"]

    # both sets are kept; newest first, the active one marked
    doc = revisions(p)
    assert doc["active_revision"] == rev2
    assert [(r["revision"], r["active"]) for r in doc["revisions"]] == [(rev2, True), (rev1, False)]
    assert "items.cedar" in doc["revisions"][0]["files"] and "schema.cedarschema" in doc["revisions"][0]["files"]
    code, out, err = cli("policy", "revisions", *as_admin(p))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"* {rev2}  loaded ") and lines[1].startswith(f"  {rev1}  loaded ")

    # rollback: the old decision is back at once, the file content restored, the event recorded
    code, out, err = cli("policy", "rollback", rev1, "--reason", "reads broke the nightly job", *as_admin(p))
    assert code == 0, err
    assert out.strip() == f"rolled back {rev2} -> {rev1} (items.cedar)"
    assert active_revision(p) == rev1
    ok = read_item(p, idp, upstream)
    assert ok.status_code == 200
    rec = decision(p, ok.headers["x-proctor-decision-id"])
    assert rec["policy_revision"] == rev1 and rec["reasons"] == ["agents-read-items"]
    assert items.read_text() == original
    assert [f.name for f in p.policies_dir.iterdir() if f.name.startswith(".")] == []  # no temp files left
    (event,) = policy_events(p)
    assert event["event"] == "rollback" and event["by"] == "olga"
    assert event["from_revision"] == rev2 and event["to_revision"] == rev1
    assert event["reason"] == "reads broke the nightly job" and event["files_changed"] == ["items.cedar"]
    assert "decision_id" not in event and event["time"].endswith("Z")
    doc = revisions(p)
    assert doc["active_revision"] == rev1
    assert [(r["revision"], r["active"]) for r in doc["revisions"]] == [(rev1, True), (rev2, False)]

    # the watcher, seeing the restored file, loads nothing new
    time.sleep(0.6)  # a few watcher ticks
    assert active_revision(p) == rev1 and len(revisions(p)["revisions"]) == 2
    assert httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["reload"]["ok"] is True

    # a policy file the revision did not have is removed by a rollback
    extra = p.policies_dir / "zz-extra.cedar"
    write_atomically(extra, NO_READS.lstrip())
    rev3 = wait_revision_change(p, rev1)
    assert read_item(p, idp, upstream).status_code == 403
    r = api(p, "POST", "/v1/policies/rollback", operator_token(idp), json={"revision": rev1, "reason": "drop extra"})
    assert r.status_code == 200, r.text
    assert r.json() == {"active_revision": rev1, "previous_revision": rev3, "files_changed": ["-zz-extra.cedar"]}
    assert not extra.exists() and read_item(p, idp, upstream).status_code == 200
    assert [e["to_revision"] for e in policy_events(p)] == [rev1, rev1]

    # revisions survive a restart (same state dir), and an old one can still be restored
    p = restart(p)
    try:
        assert active_revision(p) == rev1
        doc = revisions(p)
        assert {r["revision"] for r in doc["revisions"]} == {rev1, rev2, rev3}
        assert doc["revisions"][0]["revision"] == rev1 and doc["revisions"][0]["active"]
        code, out, err = cli("policy", "rollback", rev2, "--reason", "back to the edit", *as_admin(p))
        assert code == 0, err
        assert read_item(p, idp, upstream).status_code == 403
        assert items.read_text() == original + NO_READS
    finally:
        p.stop()


# ------------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def rv(tmp_path_factory, idp, pki, upstream, upstream_tls) -> Proctor:
    """No file watching here (interval of an hour): sets are loaded with POST /v1/policies/reload."""
    p = start_proctor(
        tmp_path_factory.mktemp("rev-errors"), idp, pki, upstream, upstream_tls,
        {"policies": {"dir": "policies", "reload_interval_seconds": 3600}},
    )
    yield p
    p.stop()


def reload(p: Proctor) -> str:
    r = httpx.post(f"{p.control_url}/v1/policies/reload", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["active_revision"]


def test_list_needs_an_operator(rv, idp):
    assert api(rv, "GET", "/v1/policies/revisions", None).status_code == 401
    agent = idp.token("rev-agent", groups=[ADMINS])  # agent audience, not an approver token
    assert api(rv, "GET", "/v1/policies/revisions", agent).status_code == 401
    r = api(rv, "GET", "/v1/policies/revisions", operator_token(idp, "bob", "managers"))
    assert r.status_code == 403 and r.json()["title"] == "Not an operator"
    r = api(rv, "GET", "/v1/policies/revisions", operator_token(idp))
    assert r.status_code == 200
    doc = r.json()
    assert doc["active_revision"] == active_revision(rv)
    assert doc["revisions"][0]["revision"] == doc["active_revision"] and doc["revisions"][0]["active"] is True
    assert set(doc["revisions"][0]) == {"revision", "loaded_at", "active", "files"}

    code, _, err = cli("policy", "revisions", "-c", str(rv.config_path))
    assert code == 2 and "no approver token" in err
    code, _, err = cli("policy", "revisions", "-c", str(rv.config_path), "--as", "bob", "--group", "managers")
    assert code == 1 and "403 Not an operator" in err


@pytest.mark.parametrize(
    "body, status, title",
    [
        ({"revision": "ACTIVE"}, 400, "Reason required"),
        ({"revision": "ACTIVE", "reason": "   "}, 400, "Reason required"),
        ({"reason": "why"}, 400, "Revision required"),
        ({"revision": "0000000000000000", "reason": "why"}, 404, "No such revision"),
    ],
    ids=["no-reason", "blank-reason", "no-revision", "unknown-revision"],
)
def test_rollback_api_refusals(rv, idp, body, status, title):
    before = active_revision(rv)
    body = {k: (before if v == "ACTIVE" else v) for k, v in body.items()}
    r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp), json=body)
    assert r.status_code == status, r.text
    assert r.json()["title"] == title
    assert r.headers["content-type"].startswith("application/problem+json")
    assert active_revision(rv) == before and policy_events(rv) == []


def test_rollback_needs_an_operator(rv, idp):
    rev = active_revision(rv)
    body = {"revision": rev, "reason": "why"}
    assert api(rv, "POST", "/v1/policies/rollback", None, json=body).status_code == 401
    r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp, "bob", "managers"), json=body)
    assert r.status_code == 403 and r.json()["title"] == "Not an operator"
    r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp), content=json.dumps(body))
    assert r.status_code == 415
    r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp), json=body, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert policy_events(rv) == []

    code, _, err = cli("policy", "rollback", rev, "--reason", "why", "-c", str(rv.config_path), "--as", "bob",
                       "--group", "managers")
    assert code == 1 and "403 Not an operator" in err
    assert policy_events(rv) == []


def test_rollback_cli_refusals(rv):
    rev = active_revision(rv)
    for extra in ([], ["--reason", ""], ["--reason", "  "]):
        code, out, err = cli("policy", "rollback", rev, *extra, *as_admin(rv))
        assert code == 2 and "--reason is required" in err and out == ""
    code, out, err = cli("policy", "rollback", "0000000000000000", "--reason", "why", *as_admin(rv))
    assert code == 1 and "404 No such revision" in err
    assert active_revision(rv) == rev and policy_events(rv) == []


def _make_read_only(d: Path):
    """(undo) after making `d` unwritable; pytest.skip when that is impossible here."""
    if os.geteuid() != 0:
        d.chmod(0o555)
        return lambda: d.chmod(0o755)
    # root ignores permission bits; the immutable attribute still stops it (where chattr is allowed)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("running as root, where chmod 0555 does not stop writes, and chattr +i is unavailable")
    return lambda: subprocess.run([chattr, "-i", str(d)], check=True)


def test_rollback_into_read_only_dir_is_409_and_reloads_nothing(rv, idp, upstream):
    items = rv.policies_dir / "items.cedar"
    original = items.read_text()
    rev1 = active_revision(rv)
    write_atomically(items, original + NO_READS)
    rev2 = reload(rv)
    assert rev2 != rev1
    undo = _make_read_only(rv.policies_dir)
    try:
        status_before = httpx.get(f"{rv.control_url}/v1/policies", timeout=5).json()["reload"]
        r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp), json={"revision": rev1, "reason": "try"})
        assert r.status_code == 409, r.text
        assert r.json()["title"] == "Cannot write the policy directory" and "nothing was reloaded" in r.json()["detail"]
        status_after = httpx.get(f"{rv.control_url}/v1/policies", timeout=5).json()["reload"]
        assert status_after["reloads"] == status_before["reloads"]
        assert status_after["last_attempt_at"] == status_before["last_attempt_at"]
        assert active_revision(rv) == rev2
        assert items.read_text() == original + NO_READS
        assert read_item(rv, idp, upstream).status_code == 403  # still the edited set
        assert policy_events(rv) == []
    finally:
        undo()
        write_atomically(items, original)
        assert reload(rv) == rev1


def test_api_reload_saves_revisions_and_keeps_the_last_20(rv, idp):
    extra = rv.policies_dir / "zz-keep.cedar"
    loaded = []
    try:
        for n in range(21):
            write_atomically(extra, f"// load {n}\n" + NO_READS.lstrip())
            loaded.append(reload(rv))
        assert len(set(loaded)) == 21
        doc = revisions(rv)
        assert doc["active_revision"] == loaded[-1]
        assert [r["revision"] for r in doc["revisions"]] == loaded[:0:-1]  # newest first, the oldest dropped
        assert [r["active"] for r in doc["revisions"]] == [True] + [False] * 19
        r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp), json={"revision": loaded[0], "reason": "x"})
        assert r.status_code == 404
    finally:
        extra.unlink()
        reload(rv)


def test_rollback_removes_an_entities_file_the_revision_lacked(rv, idp):
    entities = rv.policies_dir / "entities.json"
    rev1 = active_revision(rv)
    assert not entities.exists()
    try:
        entities.write_text(json.dumps([{"uid": {"type": "AgentGroup", "id": "writers"}, "attrs": {}, "parents": []}]))
        rev2 = reload(rv)
        assert rev2 != rev1
        r = api(rv, "POST", "/v1/policies/rollback", operator_token(idp), json={"revision": rev1, "reason": "x"})
        assert r.status_code == 200, r.text
        assert not entities.exists() and active_revision(rv) == rev1
    finally:
        entities.unlink(missing_ok=True)
        reload(rv)
