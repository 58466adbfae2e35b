"""`proctor claims list|take|release|transfer`: claims on resources, through the control API
(operator token: an approver-audience token in the `control.admin_group` group)."""

from __future__ import annotations

import urllib.parse

import click

from ..approvals.cli import _client, _conn, _connection_options, _fail, _print_json, _safe, _table


@click.group()
def claims() -> None:
    """Claims agents hold on resources (who holds what, since when, until when); force-release.

    Needs an operator token (approver audience, group `proctor-admins` by default):
    --token / $PROCTOR_TOKEN, or with the dev issuer `--as olga --group proctor-admins`."""


@claims.command("list")
@click.option("--connector", default=None, help="Only this connector's claims.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@_connection_options
def list_cmd(connector: str | None, as_json: bool, **kw) -> None:
    """Every live claim."""
    query = "?" + urllib.parse.urlencode({"connector": connector}) if connector else ""
    doc = _client(_conn(kw)).call("GET", "/v1/claims" + query)
    if as_json:
        _print_json(doc)
        return
    rows = [[_safe(c["id"]), _safe(c["connector"]), _safe(c["resource"]), _safe(c["holder"]), c["mode"],
             c["since"], c["expires_at"], str(c["fence"])] for c in doc["claims"]]
    if not rows:
        click.echo("no claims held")
        return
    _table(rows, ["claim", "connector", "resource", "holder", "mode", "since", "until", "fence"],
           [26, 12, 30, 20, 9, 20, 20, 5])


@claims.command("release")
@click.argument("claim_id", metavar="CLAIM")
@click.option("--reason", default=None, help="Why (recorded with the claim event).")
@_connection_options
def release_cmd(claim_id: str, reason: str | None, **kw) -> None:
    """Force-release one claim (e.g. held by a suspended or stuck agent)."""
    claim_id = claim_id.strip()
    if not claim_id:
        _fail("a claim id is required")
    doc = _client(_conn(kw)).call("POST", f"/v1/claims/{urllib.parse.quote(claim_id, safe='')}/release",
                                  {"reason": reason} if reason else None)
    c = doc["released"]
    click.echo(f"released {_safe(c['id'])} on {_safe(c['resource'])} (held by {_safe(c['holder'])})")


@claims.command("transfer")
@click.argument("claim_id", metavar="CLAIM")
@click.option("--to", "to", required=True, help="The agent that takes the claim over.")
@click.option("--to-group", "to_groups", multiple=True, help="A group of the new holder (repeatable).")
@click.option("--reason", default=None, help="Why (recorded with the claim event).")
@_connection_options
def transfer_cmd(claim_id: str, to: str, to_groups: tuple[str, ...], reason: str | None, **kw) -> None:
    """Move one claim to another agent: a new tenure (fence bumped); the old holder's writes get 409."""
    claim_id, to = claim_id.strip(), to.strip()
    if not claim_id or not to:
        _fail("a claim id and --to are required")
    body: dict = {"to": to, "groups": list(to_groups)}
    if reason:
        body["reason"] = reason
    doc = _client(_conn(kw)).call("POST", f"/v1/claims/{urllib.parse.quote(claim_id, safe='')}/transfer", body)
    old, new = doc["transferred"], doc["claim"]
    click.echo(f"transferred {_safe(old['id'])} on {_safe(old['resource'])} from {_safe(old['holder'])} "
               f"to {_safe(new['holder'])} (claim {_safe(new['id'])}, fence {new['fence']})")


@claims.command("take")
@click.option("--connector", required=True, help="The connector whose route declares the claim.")
@click.option("--type", "rtype", required=True, help="The resource's Cedar type, e.g. Incident.")
@click.option("--id", "rid", required=True, help="The resource id, e.g. the incident's sys_id.")
@click.option("--holder", required=True, help="The agent that holds the claim.")
@click.option("--holder-group", "holder_groups", multiple=True, help="A group of the holder (repeatable).")
@click.option("--mode", type=click.Choice(["exclusive", "shared"]), default=None, help="Default: the route's.")
@click.option("--ttl", "ttl", type=click.IntRange(1, 7 * 24 * 3600), default=None,
              help="Seconds; default: the route's ttl_seconds.")
@click.option("--reason", default=None, help="Why (recorded with the claim event).")
@_connection_options
def take_cmd(connector: str, rtype: str, rid: str, holder: str, holder_groups: tuple[str, ...], mode: str | None,
             ttl: int | None, reason: str | None, **kw) -> None:
    """Claim a resource for an agent (routes declared `acquire: api`: a dispatcher assigns work).

    Exit status 1 with the holder named when another agent holds it."""
    body: dict = {"connector": connector, "resource": {"type": rtype, "id": rid}, "holder": holder,
                  "groups": list(holder_groups)}
    for key, value in (("mode", mode), ("ttl_seconds", ttl), ("reason", reason)):
        if value is not None:
            body[key] = value
    doc = _client(_conn(kw)).call("POST", "/v1/claims", body)
    c = doc["claim"]
    click.echo(f"{'renewed' if doc['renewed'] else 'claimed'} {_safe(c['id'])} on {_safe(c['resource'])} "
               f"for {_safe(c['holder'])} until {c['expires_at']} (fence {c['fence']})")
