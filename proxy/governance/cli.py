"""`proctor agents list|show|register|suspend|resume|suspensions`: the
agent registry and the kill switch, through the control API (operator token:
an approver-audience token in the `control.admin_group` group)."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import click

from ..approvals.cli import _age, _client, _conn, _connection_options, _fail, _print_json, _safe, _table


def _quote(value: str) -> str:
    value = value.strip()
    if not value:
        _fail("an id is required")
    return urllib.parse.quote(value, safe="")


@click.group()
def agents() -> None:
    """The agent registry and the kill switch (suspend/resume an agent, a connector or an action).

    Needs an operator token (approver audience, group `proctor-admins` by default):
    --token / $PROCTOR_TOKEN, or with the dev issuer `--as olga --group proctor-admins`."""


@agents.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@_connection_options
def list_cmd(as_json: bool, **kw) -> None:
    """Every agent seen or registered, with its status and request counts."""
    client = _client(_conn(kw))
    doc = client.call("GET", "/v1/agents")
    if as_json:
        _print_json(doc)
        return
    rows = [
        [
            _safe(a["id"]), a["status"].upper() if a["status"] != "active" else "active", _safe(a.get("owner") or "-"),
            _safe(a.get("team") or "-"), str(a["requests"]), str(a["allowed"]), str(a["denied"]),
            (_age(a.get("last_seen")) + " ago") if a.get("last_seen") else "never",
        ]
        for a in doc["agents"]
    ]
    if not rows:
        click.echo("no agents seen or registered yet")
        return
    _table(rows, ["agent", "status", "owner", "team", "requests", "allowed", "denied", "last seen"],
           [28, 10, 16, 14, 8, 8, 8, 14])
    for a in doc["agents"]:
        s = a.get("suspension")
        if s:
            click.echo(f"  {_safe(a['id'])}: suspended since {s['since']} by {_safe(s['by'])}: {_safe(s['reason'])}")


@agents.command("show")
@click.argument("agent_id", metavar="AGENT")
@_connection_options
def show_cmd(agent_id: str, **kw) -> None:
    """One agent's registry entry (JSON)."""
    _print_json(_client(_conn(kw)).call("GET", f"/v1/agents/{_quote(agent_id)}"))


@agents.command("register")
@click.argument("agent_id", metavar="AGENT")
@click.option("--owner", default="", help="Who answers for this agent.")
@click.option("--team", default="")
@click.option("--description", default="")
@_connection_options
def register_cmd(agent_id: str, owner: str, team: str, description: str, **kw) -> None:
    """Pre-register an agent (owner, team, description)."""
    doc = _client(_conn(kw)).call("POST", "/v1/agents", {"id": agent_id, "owner": owner, "team": team,
                                                          "description": description})
    click.echo(f"registered {_safe(doc['id'])}")


def _target(agent_id: str | None, connector: str | None, action: str | None) -> tuple[str, str]:
    given = [(k, v) for k, v in (("agent", agent_id), ("connector", connector), ("action", action)) if v]
    if len(given) != 1:
        _fail("name exactly one of: an AGENT, --connector NAME or --action ACTION")
    return given[0]


@agents.command("suspend")
@click.argument("agent_id", metavar="[AGENT]", required=False)
@click.option("--connector", default=None, help="Suspend every request to this connector instead.")
@click.option("--action", default=None, help="Suspend this Cedar action instead (e.g. erp.purchase_order.approve).")
@click.option("--reason", default=None, help="Why (mandatory; recorded and shown to the refused agent).")
@_connection_options
def suspend_cmd(agent_id: str | None, connector: str | None, action: str | None, reason: str | None, **kw) -> None:
    """Kill switch: refuse the next request of an agent, to a connector, or for an action
    (including requests waiting for approval). Takes effect within a second."""
    kind, target = _target(agent_id, connector, action)
    if not reason or not reason.strip():
        _fail("--reason is required")
    client = _client(_conn(kw))
    s = client.call("POST", "/v1/suspensions", {"kind": kind, "target": target, "reason": reason})
    click.echo(f"suspended {kind} {_safe(s['target'])} since {s['since']} by {_safe(s['by'])}")


@agents.command("resume")
@click.argument("agent_id", metavar="[AGENT]", required=False)
@click.option("--connector", default=None)
@click.option("--action", default=None)
@click.option("--reason", default="", help="Why (recorded).")
@_connection_options
def resume_cmd(agent_id: str | None, connector: str | None, action: str | None, reason: str, **kw) -> None:
    """Lift a suspension."""
    kind, target = _target(agent_id, connector, action)
    client = _client(_conn(kw))
    path = f"/v1/suspensions/{kind}/{_quote(target)}"
    if reason:
        path += "?" + urllib.parse.urlencode({"reason": reason})
    client.call("DELETE", path)
    click.echo(f"resumed {kind} {_safe(target)}")


@agents.command("suspensions")
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def suspensions_cmd(as_json: bool, **kw) -> None:
    """Everything suspended right now."""
    doc = _client(_conn(kw)).call("GET", "/v1/suspensions")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    if not doc["suspensions"]:
        click.echo("nothing is suspended")
        return
    for s in doc["suspensions"]:
        click.echo(f"{s['kind']:<10} {_safe(s['target'])}  since {s['since']} by {_safe(s['by'])}: {_safe(s['reason'])}")


@click.command("revisions")
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def policy_revisions(as_json: bool, **kw) -> None:
    """The policy sets the running proxy has enforced (newest first; the last 20 are kept)."""
    doc = _client(_conn(kw)).call("GET", "/v1/policies/revisions")
    if as_json:
        _print_json(doc)
        return
    for r in doc["revisions"]:
        mark = "*" if r["active"] else " "
        click.echo(f"{mark} {r['revision']}  loaded {r['loaded_at']}  ({len(r['files'])} files)")


@click.command("push")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reason", default=None, help="Why (mandatory; recorded).")
@click.option("--schema", "schema_name", default="schema.cedarschema", show_default=True,
              help="The schema file's name in DIRECTORY.")
@_connection_options
def policy_push(directory: Path, reason: str | None, schema_name: str, **kw) -> None:
    """Push a policy directory to every replica: the running proxy validates it against its own
    connectors and stores it as the fleet's active revision; replicas with
    `policies.source: store` enforce it within one reload interval (operator token)."""
    if not reason or not reason.strip():
        _fail("--reason is required")
    files: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix == ".cedar" or path.name in (schema_name, "entities.json")):
            try:
                files[path.name] = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                _fail(f"cannot read {path}: {e}")
    if schema_name not in files:
        _fail(f"{directory} has no {schema_name}")
    if not any(n.endswith(".cedar") for n in files):
        _fail(f"{directory} has no *.cedar policy files")
    doc = _client(_conn(kw)).call("POST", "/v1/policies/push", {"files": files, "reason": reason})
    click.echo(f"pushed {len(files)} files: the fleet's active revision is now {doc['active_revision']}"
               + (f" (was {doc['previous_revision']})" if doc.get("previous_revision") else "")
               + f"; this replica enforces {doc['enforced_here']}")


@click.command("rollback")
@click.argument("revision")
@click.option("--reason", default=None, help="Why (mandatory; recorded).")
@_connection_options
def policy_rollback(revision: str, reason: str | None, **kw) -> None:
    """Restore an earlier policy revision: its files are written back into the policy
    directory and loaded (operator token)."""
    if not reason or not reason.strip():
        _fail("--reason is required")
    doc = _client(_conn(kw)).call("POST", "/v1/policies/rollback", {"revision": revision, "reason": reason})
    click.echo(f"rolled back {doc['previous_revision']} -> {doc['active_revision']}"
               + (f" ({', '.join(doc['files_changed'])})" if doc["files_changed"] else ""))
