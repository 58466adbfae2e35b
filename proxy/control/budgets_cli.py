"""`proctor budgets list|show`: declared budgets and their ledgers, through the control API
(an operator token: approver audience, group `control.admin_group`; docs/limits.md, "Seeing budgets").

Exit status: 0 done; 1 the API refused (its problem title and detail are printed); 2 usage,
configuration or connection error.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import click

from ..approvals.cli import _client, _conn, _connection_options, _print_json, _relative, _safe, _table

FILTERS = ("agent", "group", "connector", "action", "resource", "workflow")


def _filter_options(f: Any) -> Any:
    for dim in reversed(FILTERS):
        # --group is taken by the connection options (the groups of an --as token), so the
        # group filter is --ledger-group; two options of one name would leave one unreachable.
        flag = "--ledger-group" if dim == "group" else f"--{dim}"
        f = click.option(flag, dim, default=None, metavar="VALUE",
                         help=f"Only ledgers with this {dim} (budgets keyed on {dim}; others are shown whole).")(f)
    f = click.option("--window", default=None, metavar="WINDOW",
                     help="current (default), previous, or a window id such as month:2026-11@Europe/Berlin.")(f)
    f = click.option("--limit", type=click.IntRange(1, 1000), default=None,
                     help="Ledgers per budget (default 100).")(f)
    return click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")(f)


def _query(params: dict[str, Any]) -> str:
    given = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urllib.parse.urlencode(given) if given else ""


def key_text(key: dict[str, Any]) -> str:
    """agent=bot-a, param:tenant=sha256:..., `(shared)` for a budget keyed on nothing."""
    if not key:
        return "(shared)"
    return ", ".join(f"{dim}={'(none)' if v is None else v}" for dim, v in key.items())


def percent(fraction: str) -> str:
    try:
        value = float(fraction) * 100
    except ValueError:
        return "?"
    return f"{value:.1f}%" if value < 1000 else f"{value:.0f}%"


def exhaustion(ledger: dict[str, Any]) -> str:
    p = ledger.get("projection")
    if not p:
        return "-"
    if p["exhausted"]:
        return "exhausted"
    return _relative(p["exhaustion_at"]) if p["exhaustion_at"] else "not this window"


def _money(amount: str, b: dict[str, Any]) -> str:
    return f"{amount} {b['currency']}".strip()


@click.group()
def budgets() -> None:
    """Budgets: spend per calendar window, per key, with projections (operators).

    Needs an operator token (approver audience, group `proctor-admins` by default):
    --token / $PROCTOR_TOKEN, or with the dev issuer `--as olga --group proctor-admins`."""


@budgets.command("list")
@click.option("--name", default=None, help="Only this budget.")
@_filter_options
@_connection_options
def list_cmd(name: str | None, as_json: bool, **kw: Any) -> None:
    """Every budget's ledgers in the current window: spent of the limit, reserved, when the window
    ends and when the budget runs out at the rate so far."""
    conn = _conn(kw)
    doc = _client(conn).call("GET", "/v1/budgets" + _query({"name": name, **kw}))
    if as_json:
        _print_json(doc)
        return
    if not doc["budgets"]:
        click.echo("no budgets are declared (budgets: in proctor.yaml)")
        return
    if not doc["ledger_available"]:
        click.echo("warning: the ledger did not answer; ledgers are not shown", err=True)
    rows = []
    for b in doc["budgets"]:
        ends = _relative(b["window"]["end"])
        if not b["ledgers"]:
            rows.append([b["name"], "no spend", f"0/{_money(b['limit'], b)}", "0.0%", "0", ends, "-"])
        for ledger in b["ledgers"]:
            rows.append([b["name"], key_text(ledger["key"]), f"{ledger['spent']}/{_money(b['limit'], b)}",
                         percent(ledger["used_fraction"]), ledger["reserved"], ends, exhaustion(ledger)])
        if b["ledgers_truncated"]:
            rows.append([b["name"], f"(more than {len(b['ledgers'])}: --limit)", "", "", "", "", ""])
    _table(rows, ["budget", "key", "spent/limit", "%", "reserved", "ends", "exhaustion"],
           [24, 40, 30, 7, 14, 36, 36])


@budgets.command("show")
@click.argument("name", metavar="NAME")
@_filter_options
@_connection_options
def show_cmd(name: str, as_json: bool, **kw: Any) -> None:
    """One budget: its declaration, its ledgers (fleet-wide) with their projection, and how much
    of the burn-down this replica's decision records show."""
    name = name.strip()
    conn = _conn(kw)
    doc = _client(conn).call("GET", "/v1/budgets/" + urllib.parse.quote(name, safe="") + _query(kw))
    if as_json:
        _print_json(doc)
        return
    b = doc["budget"]
    w = b["window"]
    m = b["match"]
    match = "; ".join(f"{k} {', '.join(m[k])}" for k in ("connectors", "actions", "methods") if m[k]) or "every request"
    cost = b["cost"]
    cost_text = {"static": f"{cost['static']} per call", "field": f"the request value {cost['field']}",
                 "response": f"the answer's {cost['response']} (reserving {cost['estimate']})",
                 "llm": f"LLM tokens priced with llm_prices (reserving {cost['estimate'] or 'the table estimate'})",
                 "route": "each route's cost:, else 1 per call"}.get(cost["kind"], cost["kind"])
    fields = [
        ("budget", f"{b['name']}  ({b['where']})"),
        ("match", match),
        ("key", ", ".join(b["key"]) or "(one ledger, shared)"),
        ("limit", f"{_money(b['limit'], b)} per {b['period']}, {b['timezone']}"),
        ("cost", cost_text),
        ("on exceed", b["on_exceed"] + (f"; soft threshold {percent(b['soft_threshold'])}" if b["soft_threshold"]
                                         else "") + ("; shadow (never enforced)" if b["shadow"] else "")
         + f"; ledger unreachable: {b['on_unavailable']}"),
        ("window", f"{w['id']}  {w['start']} .. {w['end']}" + ("  (current)" if w["current"] else "")),
    ]
    for label, value in fields:
        click.echo(f"{label:<11}{_safe(value)}")
    click.echo("")
    if not doc["ledger_available"]:
        click.echo("warning: the ledger did not answer; ledgers are not shown", err=True)
    if not b["ledgers"]:
        click.echo("no spend in this window")
        return
    click.echo(f"ledgers (fleet-wide, {doc['backend']}), most used first; spent {b['spent_total']} in all:")
    rows = []
    for ledger in b["ledgers"]:
        p = ledger.get("projection") or {}
        rows.append([key_text(ledger["key"]), ledger["spent"], ledger["reserved"], ledger["remaining"],
                     percent(ledger["used_fraction"]), p.get("rate_per_hour", "-"), p.get("at_window_end", "-"),
                     exhaustion(ledger)])
    _table(rows, ["key", "spent", "reserved", "remaining", "%", "rate/h", "at window end", "exhaustion"],
           [40, 16, 14, 16, 7, 12, 16, 36])
    if b["ledgers_truncated"]:
        click.echo(f"(more ledgers than {len(b['ledgers'])}: --limit)")
    src = doc["burn_down"]
    click.echo("")
    click.echo("burn-down from this replica's decision records"
               + (" (complete)" if src["complete"] else f" (since {src['since'] or 'unknown'}: read back partly)") + ":")
    for ledger in b["ledgers"]:
        series = ledger.get("burn_down") or []
        booked = series[-1]["spent"] if series else "0"
        click.echo(f"  {_safe(key_text(ledger['key']))}: {booked} booked here, {max(len(series) - 2, 0)} points")
