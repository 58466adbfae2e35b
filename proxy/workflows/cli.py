"""`proctor workflows list|show|kpis|inbox|decide`: workflow definitions, instances, one instance's
history, the outcome KPIs, and the people's inbox of workflow exceptions with their decisions, through
the control API (an approver or operator token; docs/workflows.md).

Exit status: 0 done; 1 the API refused (its problem title and detail are printed); 2 usage,
configuration or connection error.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from typing import Any

import click

from ..approvals.cli import (
    _client,
    _conn,
    _connection_options,
    _fail,
    _interactive,
    _print_json,
    _safe,
    _table,
)

_RELATIVE_RE = re.compile(r"^([0-9]{1,6})([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def time_arg(value: str | None, now: float, option: str) -> str | None:
    """--since/--until: `7d`, `24h`, `30m`, `90s`, `2w` ago (relative to now), or passed on as given
    (ISO 8601 or epoch seconds; the API checks it and names the parameter when it is wrong)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        _fail(f"{option} is empty")
    m = _RELATIVE_RE.match(text)
    if m:
        return str(int(now) - int(m.group(1)) * _UNIT[m.group(2)])
    return text


def seconds(x: float | None) -> str:
    """A duration for people: 42s, 12m 5s, 3h 20m, 2d 4h (None: -)."""
    if x is None:
        return "-"
    s = int(round(x))
    if s < 60:
        return f"{x:.3g}s" if x < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m" if s % 3600 // 60 else f"{s // 3600}h"
    return f"{s // 86400}d {s % 86400 // 3600}h" if s % 86400 // 3600 else f"{s // 86400}d"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _short_time(iso: str | None) -> str:
    # 2027-01-15T08:00:00.000Z -> 2027-01-15 08:00:00
    return "-" if not iso else iso.replace("T", " ")[:19]


@click.group()
def workflows() -> None:
    """Workflows: definitions, instances, each instance's history and the outcome KPIs.

    Needs an approver or operator token: --token / $PROCTOR_TOKEN, or with the dev issuer
    `--as olga --group proctor-admins`."""


@workflows.command("list")
@click.option("--workflow", default=None, help="Only this workflow's instances.")
@click.option("--state", type=click.Choice(["running", "completed"]), default=None, help="Only instances in this state.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="At most this many instances (most recently moved first).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answers.")
@_connection_options
def list_cmd(workflow: str | None, state: str | None, limit: int, as_json: bool, **kw: Any) -> None:
    """The workflow definitions and their instances, most recently moved first."""
    client = _client(_conn(kw))
    defs = client.call("GET", "/v1/workflows")
    query = {k: v for k, v in (("workflow", workflow), ("state", state), ("limit", str(limit))) if v}
    found = client.call("GET", "/v1/workflows/instances?" + urllib.parse.urlencode(query))
    if as_json:
        _print_json({"workflows": defs["workflows"], "instances": found["instances"]})
        return
    if not defs["workflows"]:
        click.echo("no workflows defined")
    else:
        rows = [[w["name"], " > ".join(s["name"] for s in w["steps"]), seconds(w["sla_seconds"]) if
                 w["sla_seconds"] else "-", str(w["instances"].get("running", 0)),
                 str(w["instances"].get("completed", 0))] for w in defs["workflows"]]
        _table(rows, ["workflow", "steps", "sla", "running", "completed"], [24, 60, 8, 8, 9])
    click.echo("")
    if not found["instances"]:
        click.echo("no instances")
        return
    rows = [[i["id"], i["workflow"], i["state"], _short_time(i["started_at"]), _short_time(i["updated_at"]),
             ", ".join(i["completed"]) or "-", ", ".join(i["next"]) or "-", f'{i["cost"]} {i["currency"]}'.strip()]
            for i in found["instances"]]
    _table(rows, ["instance", "workflow", "state", "started", "last moved", "done", "next", "cost"],
           [26, 20, 9, 19, 19, 40, 24, 14])


@workflows.command("show")
@click.argument("instance_id", metavar="INSTANCE")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@_connection_options
def show_cmd(instance_id: str, as_json: bool, **kw: Any) -> None:
    """One instance: its state, every step call (who, outcome, time, wait, cost) and its business objects."""
    instance_id = instance_id.strip()
    if not instance_id:
        _fail("an instance id is required")
    doc = _client(_conn(kw)).call("GET", "/v1/workflows/instances/" + urllib.parse.quote(instance_id, safe=""))
    if as_json:
        _print_json(doc)
        return
    click.echo(f"{_safe(doc['id'])}  {_safe(doc['workflow'])}  {doc['state']}")
    click.echo(f"  started    {_short_time(doc['started_at'])}")
    click.echo(f"  completed  {_short_time(doc['completed_at'])}")
    click.echo(f"  done       {_safe(', '.join(doc['completed'])) or '-'}")
    click.echo(f"  next       {_safe(', '.join(doc['next'])) or '-'}")
    click.echo(f"  cost       {_safe(doc['cost'])} {_safe(doc['currency'])}".rstrip())
    click.echo("")
    rows = [[_short_time(e["time"]), e["step"], e["outcome"], str(e["status"]) if e["status"] is not None else "-",
             e["agent"], ms(e["duration_ms"]), seconds(e["approval_wait_ms"] / 1000)
             if e["approval_wait_ms"] is not None else "-", "yes" if e["human"] else "", e["cost"],
             e["decision_id"]] for e in doc["events"]]
    if rows:
        _table(rows, ["time", "step", "outcome", "status", "agent", "ms", "approval", "person", "cost", "decision"],
               [19, 20, 9, 6, 24, 8, 9, 6, 10, 36])
    else:
        click.echo("no step calls recorded")
    if doc["objects"]:
        click.echo("")
        _table([[o["type"], o["id"], o["step"], _short_time(o["linked_at"])] for o in doc["objects"]],
               ["object", "id", "linked by", "at"], [24, 40, 20, 19])


@workflows.command("kpis")
@click.option("--workflow", default=None, help="Only this workflow.")
@click.option("--since", default=None, metavar="WHEN",
              help="Start: 7d, 24h, 30m ago, or ISO 8601 / epoch seconds (default: 7 days ago).")
@click.option("--until", default=None, metavar="WHEN", help="End, as --since (default: now).")
@click.option("--bucket", "bucket", type=click.IntRange(60, 7 * 86400), default=None, metavar="SECONDS",
              help="Bucket width of the series in --json (default 3600).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer (series included).")
@_connection_options
def kpis_cmd(workflow: str | None, since: str | None, until: str | None, bucket: int | None, as_json: bool,
             **kw: Any) -> None:
    """Outcome KPIs: cycle time, throughput, work in progress, errors, rework, SLA, cost, autonomy."""
    now = time.time()
    query = {k: v for k, v in (("workflow", workflow), ("since", time_arg(since, now, "--since")),
                               ("until", time_arg(until, now, "--until")),
                               ("bucket_seconds", str(bucket) if bucket else None)) if v}
    doc = _client(_conn(kw)).call("GET", "/v1/workflows/kpis" + ("?" + urllib.parse.urlencode(query) if query else ""))
    if as_json:
        _print_json(doc)
        return
    click.echo(f"from {_short_time(doc['since'])} to {_short_time(doc['until'])} UTC")
    if doc.get("truncated"):
        click.echo("(limits reached: the numbers cover only part of the window's events or instances)")
    if not doc["workflows"]:
        click.echo("no workflows defined")
    for w in doc["workflows"]:
        render_workflow(w)


def render_workflow(w: dict[str, Any]) -> None:
    cur = f" {w['currency']}" if w["currency"] else ""
    inst, cyc, sla, cost = w["instances"], w["cycle_time_seconds"], w["sla"], w["cost"]
    click.echo("")
    click.echo(_safe(w["name"]))
    line = click.echo  # (one KPI per line)
    closed = f", closed by a person {inst['closed']}" if inst.get("closed") else ""
    line(f"  instances   started {inst['started']}, completed {inst['completed']}, running {inst['running']}{closed}")
    line(f"  cycle time  p50 {seconds(cyc['p50'])}, p90 {seconds(cyc['p90'])}, mean {seconds(cyc['mean'])} "
         f"({cyc['count']} completed)")
    line(f"              human wait p50 {seconds(cyc['human_wait_p50'])}, agent time p50 "
         f"{seconds(cyc['agent_time_p50'])}; waiting for people {percent(cyc.get('human_wait_share'))} of it")
    line(f"  throughput  {w['throughput']['completed']} completed, {w['throughput']['per_day']:g} per day")
    line(f"  errors      {percent(w['error_rate'])} of step calls failed; rework {percent(w['rework_rate'])}")
    if sla["target_seconds"]:
        line(f"  SLA {seconds(sla['target_seconds']):<7} met {sla['met']}, missed {sla['missed']} "
             f"({percent(sla['adherence'])}); running at risk {sla['at_risk']}, overdue {sla.get('overdue', 0)}")
    else:
        line("  SLA         no target set")
    per = f"{cost['per_instance']}{cur} per completed instance" if cost["per_instance"] is not None else \
        "no instance completed"
    line(f"  cost        {cost['total']}{cur} in the window; {per}")
    line(f"  autonomy    {percent(w['autonomy_rate'])} of step completions without a person")
    if any(s["attempts"] or s["refusals"] for s in w["steps"]):
        click.echo("")
        rows = [["  " + s["name"], str(s["attempts"]), str(s["completions"]), str(s["failures"]), str(s["refusals"]),
                 percent(s["error_rate"]), percent(s["rework_rate"]), ms(s["duration_ms"]["p50"]),
                 ms(s["duration_ms"]["p90"]), seconds(s["step_time_seconds"]["p50"]),
                 percent(s["sla_adherence"]) if s["sla_seconds"] else "-", percent(s["autonomy_rate"])]
                for s in w["steps"]]
        _table(rows, ["  step", "calls", "done", "failed", "refused", "errors", "rework", "p50 ms", "p90 ms",
                      "time p50", "in SLA", "autonomy"], [26, 6, 6, 6, 7, 7, 7, 8, 8, 9, 7, 8])
    if w["agents"]:
        click.echo("")
        _table([["  " + a["agent"], str(a["completions"]), str(a["failures"]), str(a["refusals"]),
                 percent(a["error_rate"])] for a in w["agents"]],
               ["  agent", "done", "failed", "refused", "errors"], [34, 6, 6, 7, 7])


# ---- the people's inbox of workflow exceptions (docs/workflows.md, "Exceptions") ----
RESOLUTIONS = ("retry", "take-over", "complete", "close")
_OBJECT_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def why(item: dict[str, Any]) -> str:
    """Why the item is in the inbox, for people: failed 2 times / gave up after 3 failures / stalled."""
    n = item.get("failures")
    times = f"{n} time{'s' if n != 1 else ''}" if isinstance(n, int) else "several times"
    reason = item.get("reason")
    if reason == "failures":
        text = f"failed {times}"
    elif reason == "gave-up":
        text = f"gave up after failing {times}"
    elif reason == "stalled":
        text = "stalled (no progress within its SLA)"
    else:
        text = str(reason or "?")
    if item.get("rerouted_to"):
        text += f"; rerouted to {item['rerouted_to']}"
    return text


def _state(item: dict[str, Any]) -> str:
    return f"taken by {item.get('taken_by')}" if item.get("state") == "taken" else str(item.get("state") or "?")


@workflows.command("inbox")
@click.option("--workflow", default=None, help="Only this workflow's items.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="At most this many items.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer (each item with its history).")
@_connection_options
def inbox_cmd(workflow: str | None, limit: int, as_json: bool, **kw: Any) -> None:
    """Open workflow exceptions waiting for a person: the items of your approval groups (operators: all)."""
    query = {k: v for k, v in (("workflow", workflow), ("limit", str(limit))) if v}
    doc = _client(_conn(kw)).call("GET", "/v1/workflows/inbox?" + urllib.parse.urlencode(query))
    if as_json:
        _print_json(doc)
        return
    items = doc.get("items") or []
    if not items:
        click.echo("no open workflow items in your groups")
        return
    rows = [[i["instance"], i["id"], i["workflow"], i.get("step") or "(instance)", i.get("group") or "(operators)",
             why(i), _state(i), i.get("agent") or "-", _short_time(i.get("opened_at"))] for i in items]
    _table(rows, ["instance", "item", "workflow", "step", "group", "why", "state", "agent", "opened"],
           [26, 26, 20, 20, 20, 44, 24, 40, 19])
    click.echo("")
    click.echo("decide: proctor workflows decide INSTANCE ITEM retry|take-over|complete|close [--note TEXT]")


def _object_arg(value: str) -> dict[str, str]:
    otype, sep, oid = value.partition(":")
    otype, oid = otype.strip(), oid.strip()
    if not sep or not _OBJECT_TYPE_RE.match(otype) or not oid or len(oid) > 512 or _CONTROL_RE.search(oid):
        _fail(f"--object must be Type:id (a type name such as PurchaseOrder, then the id), not {_safe(value)!r}")
    return {"type": otype, "id": oid}


@workflows.command("decide")
@click.argument("instance_id", metavar="INSTANCE")
@click.argument("item_id", metavar="ITEM")
@click.argument("resolution", metavar="retry|take-over|complete|close", type=click.Choice(RESOLUTIONS))
@click.option("--to", "to", default=None, metavar="AGENT", help="retry: give the step to this agent from now on.")
@click.option("--note", default=None, metavar="TEXT", help="Why (recorded; the agent is told it when you close).")
@click.option("--object", "objects", multiple=True, metavar="Type:id",
              help="complete: a business object your work made (of the step's declared types; repeatable).")
@click.option("--yes", is_flag=True, help="close: do not ask for confirmation on a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@_connection_options
def decide_cmd(instance_id: str, item_id: str, resolution: str, to: str | None, note: str | None,
               objects: tuple[str, ...], yes: bool, as_json: bool, **kw: Any) -> None:
    """Decide an item of the workflow inbox (INSTANCE and ITEM as `proctor workflows inbox` lists them).

    \b
    retry      agents may call the step again, with a fresh retry budget (--to: only that agent)
    take-over  you do the step: agents' calls of it are refused until you decide retry, complete or close
    complete   you did the step outside Proctor: it is recorded completed (--object links what you made)
    close      the instance is closed as failed: every call of its steps is refused (409)"""
    instance_id, item_id = instance_id.strip(), item_id.strip()
    if not instance_id or not item_id:
        _fail("an instance id and an item id are required (as `proctor workflows inbox` lists them)")
    if to is not None and resolution != "retry":
        _fail("--to (the agent to give the step to) goes with retry")
    if objects and resolution != "complete":
        _fail("--object (what your work made) goes with complete")
    body: dict[str, Any] = {"resolution": resolution}
    if to is not None:
        if not to.strip():
            _fail("--to is empty")
        body["to"] = to.strip()
    if note is not None and note.strip():
        body["note"] = note.strip()
    if objects:
        body["objects"] = [_object_arg(o) for o in objects]
    client = _client(_conn(kw))
    if resolution == "close" and not yes and _interactive():
        click.confirm(f"Close instance {_safe(instance_id)} as failed? Every call of its steps will be refused",
                      abort=True)
    path = (f"/v1/workflows/instances/{urllib.parse.quote(instance_id, safe='')}/escalations/"
            f"{urllib.parse.quote(item_id, safe='')}")
    doc = client.call("POST", path, body)
    if as_json:
        _print_json(doc)
        return
    inst = _safe(doc.get("instance", instance_id))
    if resolution == "retry":
        who = f" (only {_safe(to.strip())} from now on)" if to else ""
        click.echo(f"{inst}: agents may call the step again with a fresh retry budget{who}")
    elif resolution == "take-over":
        click.echo(f"{inst}: you have the step; agents' calls of it are refused until you decide retry, complete "
                   "or close")
    elif resolution == "complete":
        done = ", ".join(doc.get("completed") or [])
        click.echo(f"{inst}: the step is recorded completed by you; done {_safe(done) or '-'}; "
                   f"{_safe(doc.get('state') or '?')}")
    else:
        click.echo(f"{inst}: closed as failed; every call of its steps is refused (409 instance-closed)")
