"""`proctor approvals list|show|approve|deny` against a real Proctor process.

The hold policy lives here (HOLD_CEDAR), written next to a copy of
tests/data/policies whose OrderContext gains `approval?: Approval` (the
hand-written OrderContext wins over the generated one). Orders for tenant 4242
are held for group `grp`; no other test uses that tenant.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import requests
import yaml
from click.testing import CliRunner

from conftest import DATA, Proctor, free_port, start_proctor

from proxy.approvals import cli as approvals_cli

pytestmark = pytest.mark.integration

AGENT = "writer-bot"
TENANT = 4242
HOLD_CEDAR = """
@id("tenant-4242-orders-need-grp")
@approval("grp")
forbid (principal, action == Action::"test.order.create", resource)
when { context.params.tenant == 4242 }
unless { context has approval && context.approval.groups.contains("grp") };
"""
APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)
CLI = [sys.executable, "-c", "from proxy.approvals.cli import approvals; approvals()"]


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def held(tmp_path_factory, idp, pki, upstream, upstream_tls):
    pol = tmp_path_factory.mktemp("cli-policies") / "policies"
    shutil.copytree(DATA / "policies", pol)
    schema = (pol / "schema.cedarschema").read_text()
    assert "params: { tenant: Long }," in schema and "type Approval" not in schema
    schema = schema.replace("type OrderBody", APPROVAL_TYPE + "type OrderBody", 1)
    schema = schema.replace("params: { tenant: Long },", "params: { tenant: Long },\n  approval?: Approval,", 1)
    (pol / "schema.cedarschema").write_text(schema)
    (pol / "approval.cedar").write_text(HOLD_CEDAR)
    p = start_proctor(
        tmp_path_factory.mktemp("cli-proctor"), idp, pki, upstream, upstream_tls,
        {"approvals": {"mode": "async", "expire_after_seconds": 300}}, policies_src=pol,
    )
    yield p
    p.stop()


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and k not in ("PROCTOR_TOKEN", "PROCTOR_CONTROL_URL")}
    env.update(extra)
    return env


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60, env=env or _env(),
                          stdin=subprocess.DEVNULL)


def as_(p: Proctor, who: str, *groups: str) -> list[str]:
    out = ["-c", str(p.config_path), "--as", who]
    for g in groups:
        out += ["--group", g]
    return out


def order(p: Proctor, upstream, token: str, marker: str) -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{upstream.port}/tenants/{TENANT}/orders",
        json={"order": {"total": "12.50", "items": [{"sku": "A"}]}, "marker": marker},
        proxies={"http": p.proxy_url_with(AGENT, token)},
        timeout=15,
    )


def forwarded(upstream, marker: str) -> int:
    return sum(1 for e in upstream.received() if marker in json.dumps(e))


def hold(p: Proctor, upstream, token: str) -> tuple[str, str]:
    marker = uuid.uuid4().hex
    r = order(p, upstream, token, marker)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["approval_state"] == "pending" and body["reasons"] == ["tenant-4242-orders-need-grp"]
    return body["approval_id"], marker


# --------------------------------------------------------------------------- tests
def test_list_show_approve_then_the_retry_goes_through(held, upstream, idp):
    token = idp.token(AGENT, groups=["writers"], ttl=600)
    aid, marker = hold(held, upstream, token)
    assert forwarded(upstream, marker) == 0

    r = cli("list", *as_(held, "alice", "grp"))
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "AGENT", "ACTION", "RESOURCE", "GROUPS", "AGE"]
    row = next(line for line in rows if line.startswith(aid))
    assert row.split()[1:6] == ["pending", AGENT, "test.order.create", 'Order::"new"', "grp"]

    r = cli("list", "--json", "--agent", AGENT, *as_(held, "alice", "grp"))
    assert r.returncode == 0, r.stderr
    listed = {a["id"]: a for a in json.loads(r.stdout)["approvals"]}
    assert listed[aid]["state"] == "pending" and listed[aid]["groups"] == {"grp": 1}
    r = cli("list", "--json", "--action", "test.nothing", *as_(held, "alice", "grp"))
    assert json.loads(r.stdout)["approvals"] == []

    r = cli("show", aid, *as_(held, "alice", "grp"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"Approval {aid}  [pending]" in out
    assert f"POST http://127.0.0.1:{upstream.port}/tenants/{TENANT}/orders" in out
    assert "content-type: application/json" in out and marker in out  # headers and the body
    assert "total = 12.5" in out  # a Cedar decimal, shown as a number
    assert "params.tenant = 4242" in out
    assert "__extn" not in out and "__entity" not in out
    assert "- tenant-4242-orders-need-grp" in out
    assert "(none yet)" in out and "you decide yes" in " ".join(out.split())
    assert token not in out
    r = cli("show", aid, "--json", *as_(held, "alice", "grp"))
    assert json.loads(r.stdout)["derived"]["context"]["params"] == {"tenant": TENANT}

    # Refusals by the API: exit 1 with its title and detail.
    r = cli("approve", aid, "--reason", "mine", *as_(held, "bob", "other"))
    assert r.returncode == 1
    assert "403 Cannot approve" in r.stderr and "bob is not in an approving group" in r.stderr and "grp" in r.stderr
    r = cli("approve", aid, "--reason", "I approve myself", *as_(held, AGENT, "grp"))
    assert r.returncode == 1 and "nobody approves their own request" in r.stderr
    r = cli("show", "apr_doesnotexist", *as_(held, "alice", "grp"))
    assert r.returncode == 1 and "404 No such approval" in r.stderr
    r = cli("show", "../../healthz", *as_(held, "alice", "grp"))  # the id is one path segment
    assert r.returncode == 1 and "404" in r.stderr

    # A reason is mandatory: without one (and no terminal to ask on) nothing is sent.
    r = cli("approve", aid, *as_(held, "alice", "grp"))
    assert r.returncode == 2 and "reason is required" in r.stderr
    r = cli("approve", aid, "--reason", "   ", *as_(held, "alice", "grp"))
    assert r.returncode == 2

    r = cli("approve", aid, "--reason", "within budget", *as_(held, "alice", "grp"))
    assert r.returncode == 0, r.stderr
    assert f"{aid} is now approved" in r.stdout

    r = cli("approve", aid, "--reason", "again", *as_(held, "carol", "grp"))
    assert r.returncode == 1 and "409" in r.stderr and "already approved" in r.stderr

    retry = order(held, upstream, token, marker)
    assert retry.status_code == 200, retry.text
    assert forwarded(upstream, marker) == 1

    r = cli("show", aid, *as_(held, "alice", "grp"))
    assert "[forwarded]" in r.stdout and "alice [grp] approve: within budget" in r.stdout
    assert "by alice" in r.stdout
    r = cli("list", "--state", "forwarded", "--json", *as_(held, "alice", "grp"))
    assert aid in {a["id"] for a in json.loads(r.stdout)["approvals"]}


def test_deny_with_a_token_from_the_environment(held, upstream, idp):
    token = idp.token(AGENT, groups=["writers"], ttl=600)
    aid, marker = hold(held, upstream, token)
    issued = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "token", "issue", "-c", str(held.config_path), "--approver", "dave",
         "--group", "grp"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    env = _env(PROCTOR_TOKEN=issued, PROCTOR_CONTROL_URL=held.control_url + "/")
    r = cli("deny", aid, "--reason", "not this tenant", env=env)
    assert r.returncode == 0, r.stderr
    assert f"{aid} is now denied" in r.stdout and issued not in r.stdout + r.stderr

    retry = order(held, upstream, token, marker)
    assert retry.status_code == 403 and "denied this request: not this tenant" in retry.text
    assert forwarded(upstream, marker) == 0

    r = cli("list", "--state", "denied", env=env)
    assert r.returncode == 0 and any(line.startswith(aid) and " denied " in line for line in r.stdout.splitlines())
    r = cli("deny", aid, "--reason", "again", "--json", env=env)
    assert r.returncode == 1 and "already denied" in r.stderr


def test_connection_refused_exits_2_without_the_token():
    port = free_port()
    secret = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LXRva2Vu.c2ln"
    r = cli("list", "--url", f"http://127.0.0.1:{port}", "--token", secret)
    assert r.returncode == 2
    assert f"http://127.0.0.1:{port}/v1/approvals" in r.stderr and "cannot reach" in r.stderr
    assert secret not in r.stdout + r.stderr
    r = cli("approve", "apr_x", "--reason", "ok", env=_env(PROCTOR_TOKEN=secret, PROCTOR_CONTROL_URL=f"http://127.0.0.1:{port}"))
    assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr and secret not in r.stdout + r.stderr


def test_usage_errors_exit_2(tmp_path):
    r = cli("list", "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "no approver token" in r.stderr
    r = cli("list", "--url", "ftp://example", "--token", "t")
    assert r.returncode == 2 and "--url" in r.stderr
    r = cli("list", "--group", "grp", "--url", "http://127.0.0.1:9", "--token", "t")
    assert r.returncode == 2 and "--group goes with --as" in r.stderr
    r = cli("list", "--state", "nonsense", "--token", "t")
    assert r.returncode == 2
    r = cli("list", "-c", str(tmp_path / "missing.yaml"), "--token", "t")
    assert r.returncode == 2 and "config file not found" in r.stderr

    cfg = tmp_path / "nodev.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "dev_issuer": {"enabled": False},
                                   "control": {"listen": {"host": "0.0.0.0", "port": 1}}}))
    r = cli("list", "-c", str(cfg), "--as", "alice", "--group", "grp")
    assert r.returncode == 2 and "dev issuer" in r.stderr and "disabled" in r.stderr
    # the URL comes from the config's control listen address (an unspecified host means loopback)
    r = cli("list", "-c", str(cfg), "--token", "t")
    assert r.returncode == 2 and "http://127.0.0.1:1/v1/approvals" in r.stderr


def test_reason_is_prompted_for_on_a_terminal(monkeypatch):
    monkeypatch.setattr(approvals_cli, "_interactive", lambda: True)
    port = free_port()
    result = CliRunner().invoke(
        approvals_cli.approvals, ["deny", "apr_x", "--url", f"http://127.0.0.1:{port}", "--token", "t"],
        input="too risky\n",
    )
    assert "Reason:" in result.output
    assert result.exit_code == 2 and f"127.0.0.1:{port}" in result.output  # asked, then tried to send it


def test_rendering_is_plain_and_terminal_safe():
    assert approvals_cli.cedar_value({"__extn": {"fn": "decimal", "arg": "1250.5"}}) == "1250.5"
    assert approvals_cli.cedar_value({"__entity": {"type": "Supplier", "id": "S-1"}}) == 'Supplier::"S-1"'
    assert approvals_cli.cedar_value(["a", {"__extn": {"fn": "ip", "arg": "10.0.0.1"}}]) == '["a", 10.0.0.1]'
    assert approvals_cli._flatten({"fields": {"total": {"__extn": {"fn": "decimal", "arg": "2.5"}}, "n": 3}}) == [
        ("fields.total", "2.5"), ("fields.n", "3")]
    # An agent's request cannot drive the approver's terminal.
    assert approvals_cli._safe("ok\x1b[2J\u202eevil") == "ok\\x1b[2J\\u202eevil"
    assert approvals_cli._safe("a\nb", multiline=True) == "a\nb" and approvals_cli._safe("a\nb") == "a\\x0ab"
