"""`proctor demo`: mock ticketing, CRM and ERP systems, the proxy on the embedded default,
and scripted agents.

Everything runs as separate processes on loopback, exactly as a user would run
them: the agents are plain `requests` programs configured only through
HTTP_PROXY/HTTPS_PROXY (see proxy/demo/agents.py). The proxy runs the embedded default plus
the demo's rate limit and budget (proxy/demo/limits.py, written to .proctor/demo.yaml).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import default_config, load_config
from ..identity.dev_issuer import DevIssuer
from . import limits as demo_limits

MOCK_PORT = 9101  # ticketing
MOCKS = [
    # (module, port, what)
    ("proxy.demo.mock_ticketing", 9101, "ticketing (ServiceNow-style)"),
    ("proxy.demo.mock_crm", 9102, "CRM (Salesforce-style)"),
    ("proxy.demo.mock_erp", 9103, "ERP (SAP S/4HANA-style)"),
]
MOCK_PORTS = [port for _, port, _ in MOCKS]

SUPPORT = {"groups": ["support"], "team": "it-ops", "assignment_group": "service-desk"}
PROCUREMENT = {"groups": ["procurement", "procurement-approvers"], "team": "purchasing"}
PAYABLES = {"groups": ["accounts-payable"], "team": "finance"}
AGENTS = [
    # (script, agent id, claims or None for "no token")
    ("support", "support-bot", SUPPORT),
    # a colleague in the same queue: refused (409) on the incident support-bot has claimed
    ("support2", "support-bot-2", SUPPORT),
    # the handoff scene, on the service desk's e-mail incident: support-bot works it and hands it
    # to support-bot-2 (assigned_to), whose update then passes while support-bot's gets 409;
    # support-bot-2 finally gives it to the service desk's people (their inbox)
    ("handoff", "support-bot", SUPPORT),
    ("takeover", "support-bot-2", SUPPORT),
    ("late", "support-bot", SUPPORT),
    ("escalate", "support-bot-2", SUPPORT),
    # procure-to-pay (workflows/procure-to-pay.yaml): requisitions, quotations and orders; an order
    # before its quotation and a goods receipt before the release are refused out of order (409)
    ("procurement", "procurement-bot", PROCUREMENT),
    # raises procurement-bot's laptop order again: suppressed as a duplicate (409)
    ("procurement2", "procurement-bot-2", {"groups": ["procurement"], "team": "purchasing"}),
    # releases the servers order (procurement-bot may not release its own)
    ("finance", "finance-bot", {"groups": ["procurement-approvers"], "team": "finance"}),
    ("receive", "procurement-bot", PROCUREMENT),
    # the supplier's invoice fails the ERP's three-way match: escalated to the accounts-payable
    # supervisors, one of whom decides (the demo, through the workflow inbox API); then the
    # corrected invoice and the payment
    ("invoice", "payables-bot", PAYABLES),
    ("payables", "payables-bot", PAYABLES),
    # the procurement group's orders have used most of its monthly budget (po-spend-monthly): 8 more
    # laptops would go over it, so the order is held for a budget extension, which fiona.finance approves
    ("overspend", "procurement-bot-2", {"groups": ["procurement"], "team": "purchasing"}),
    ("sales", "sales-bot", {"groups": ["sales"], "team": "sales"}),
    # a reporting agent stuck in a loop: 3 queries pass, then 429 (rate limit crm-queries)
    ("runaway", "report-bot", {"groups": ["sales"], "team": "sales"}),
    ("rogue", "rogue-script", None),
]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback only
            return r.status == 200
    except OSError:
        return False


class _Terminated(Exception):
    """SIGTERM or SIGHUP reached the demo: unwind like Ctrl-C, so every child is stopped."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In each child (before exec): if the demo itself is killed outright (SIGKILL, OOM), the
    kernel sends the child SIGTERM, so no mock or proxy outlives it holding the demo's ports."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(procs: list[subprocess.Popen]) -> None:
    # a second SIGTERM while stopping must not cut the cleanup short (it is delivered afterwards)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
    try:
        _stop_all(procs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _fmt_table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


MANAGER = "maria.manager"
SUPERVISOR = "paula.payables"  # an accounts-payable supervisor: failed invoices reach her inbox
SUPERVISORS = "accounts-payable-supervisors"
DESK_PERSON = "sam.desk"  # a person of the service desk: its inbox of handed-over incidents
HANDOFF_SCENE = ("handoff", "takeover", "late", "escalate")
SETTLED = ("approved", "denied", "expired")


def _created(results: list[dict], agent: str, default: str, step: str | None = None) -> str:
    """The id of what `agent` created in an earlier scene (the next scene works on it): its first
    creation, or the one of the step named `step`."""
    return next((r["created"] for r in results
                 if r["agent"] == agent and r.get("created") and step in (None, r["step"])), default)


def _script_args(script: str, results: list[dict]) -> list[str]:
    """What a scene works on, from what the earlier scenes created."""
    none = "0000000000"
    if script == "support2":  # the incident support-bot opened (and claimed)
        return [_created(results, "support-bot", "0" * 32)]
    if script in HANDOFF_SCENE:  # the service desk's e-mail incident
        return [_incident(results)["sys_id"]]
    if script == "procurement2":  # the laptop quotation procurement-bot ordered on
        return [_created(results, "procurement-bot", none, "enter Acme's quotation (laptops)")]
    if script in ("finance", "receive", "invoice", "payables"):  # the servers order
        return [_created(results, "procurement-bot", none, "order 5 servers (EUR 26,000)")]
    return []


def _incident(results: list[dict]) -> dict:
    """The incident the handoff scene works on (support-bot found it when listing)."""
    return next((r["incident"] for r in results if r.get("incident")), {"sys_id": "0" * 32, "number": None})


def _lines(data: bytes) -> list[dict]:
    # (a line still being appended has no newline yet: left for the next read)
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(x) for x in complete.decode().splitlines() if x.strip()]


def _records(decisions: Path, start_offset: int, results: list[dict], timeout: float = 10.0) -> tuple[list[dict], list[dict]]:
    """(the lines of earlier runs, this run's lines) of the decision record, once every answer
    the agents got has its decision there and every approval those name is settled: the table
    is drawn from what was recorded, never from whatever happened to be written by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        data = decisions.read_bytes() if decisions.exists() else b""
        earlier, lines = _lines(data[:start_offset]), _lines(data[start_offset:])
        recs = {r["decision_id"]: r for r in lines if "type" not in r}
        settled = {r["approval_id"] for r in earlier + lines if r.get("type") == "approval" and r.get("event") in SETTLED}
        missing = [d for d in (res.get("decision_id") for res in results) if d and d not in recs]
        unsettled = [a for a in (recs[d].get("approval_id") for d in recs) if a and a not in settled]
        if not (missing or unsettled) or time.monotonic() > deadline:
            return earlier, lines
        time.sleep(0.1)


def _control_get(control: str, token: str, path: str) -> dict:
    import urllib.request

    req = urllib.request.Request(control + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def _order_number(location: str | None) -> str | None:
    """"order 4500000001" from an OData Location such as .../A_PurchaseOrder('4500000001')."""
    m = re.search(r"A_PurchaseOrder\('(\d+)'\)", location or "")
    return f"order {m.group(1)}" if m else None


def _manager_decides(detail: dict, value: float) -> tuple[str, str]:
    """A procurement manager: approves orders up to EUR 50,000, denies bigger ones."""
    if value <= 50_000:
        return "approve", f"EUR {value:,.0f} is within the FY27 hardware budget"
    return "deny", f"EUR {value:,.0f} exceeds what I can sign off"


def _controller_decides(detail: dict, value: float) -> tuple[str, str] | None:
    """A finance controller (budget-approvers): approves the budget extension of an order small
    enough to need no manager; bigger ones she leaves to the procurement manager."""
    if demo_limits.BUDGET_GROUP in detail.get("groups", {}) and value <= demo_limits.EXTENSION_UP_TO:
        return "approve", f"budget extension for this EUR {value:,.2f} order"
    return None


def _approver(control: str, token: str, decides, stop: threading.Event) -> None:
    """A person working the approvals inbox through the control API: each pending approval she
    may vote on (`you_may_decide`), decided by `decides(detail, net amount)` with a reason (None:
    left to someone else)."""
    import urllib.request

    def call(method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            control + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback only
            return json.loads(r.read())

    left: set[str] = set()  # approvals left to someone else
    while not stop.is_set():
        try:
            for item in call("GET", "/v1/approvals?state=pending")["approvals"]:
                if item["id"] in left:
                    continue
                detail = call("GET", f"/v1/approvals/{item['id']}")
                amount = (detail.get("derived", {}).get("resource_attributes", {}).get("net_amount") or {})
                value = float(((amount.get("__extn") or {}).get("arg")) or 0)
                decision = decides(detail, value) if detail.get("you_may_decide") else None
                if decision is None:
                    left.add(item["id"])
                    continue
                stop.wait(1.0)  # a human takes a moment
                call("POST", f"/v1/approvals/{item['id']}/{decision[0]}", {"reason": decision[1]})
        except OSError:
            pass
        stop.wait(0.3)


def _forget_mock_records(store_url: str) -> None:
    """The mock systems start empty on every run, so claims and stored answers (Idempotency-Key,
    dedupe windows) about the previous run's records name records that no longer exist: a
    rerun would find its first purchase order "already created". So do workflow instances: the
    ERP numbers its documents afresh (requisition 0010000001 again), and a rerun's requisition
    would find the last run's finished instance. The demo forgets them (the embedded SQLite
    store only; approvals, the agent registry, revisions and the decision record are kept).
    It also resets the rate-limit counters and the budget ledger (spend and reservations): a
    budget's window is a calendar month, so a rerun would otherwise find the last run's orders
    spent, and a rerun within a minute the last run's queries counted. Reset, rather than keys
    made per run, so the ledger the console and the API show is this run's."""
    import sqlite3
    from urllib.parse import unquote, urlsplit

    if not store_url.startswith("sqlite:"):
        return
    path = unquote(urlsplit(store_url).path)  # as open_store reads it: sqlite:///abs/path.db -> /abs/path.db
    if not os.path.isfile(path):
        return

    db = sqlite3.connect(path, timeout=10)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        with db:
            workflow_tables = sorted(t for t in tables if t.startswith("proctor_wf_"))
            budget_tables = sorted(t for t in tables if t.startswith("proctor_budget_"))
            for table in ("proctor_claims", "proctor_idempotency", *workflow_tables, "proctor_rate_limits",
                          *budget_tables):
                if table in tables:
                    db.execute(f'DELETE FROM "{table}"')  # noqa: S608 - names from sqlite_master
    finally:
        db.close()


def _inbox(cfg, issuer: DevIssuer, results: list[dict], handoffs: dict[str, dict]) -> list[str]:
    """What a person of the service desk finds in its inbox: the incidents agents handed to it."""
    token = issuer.issue(DESK_PERSON, {cfg.approvals.approver_groups_claim: ["service-desk"]}, "15m",
                         audience=cfg.approvals.approver_audience)
    try:
        items = _control_get(f"http://127.0.0.1:{cfg.control.listen.port}", token, "/v1/claims/inbox")["items"]
    except (OSError, ValueError, KeyError) as e:
        return [f"  (could not read it: {e})"]
    mail = _incident(results)
    by = {h["new_claim_id"]: h.get("by") for h in handoffs.values() if h.get("new_claim_id")}  # the inbox item's id
    out = []
    for item in items:
        c = item["claim"]
        name = mail.get("number") if c["resource"] == f'Incident::"{mail.get("sys_id")}"' else None
        who = by.get(c["id"]) or "an agent"
        state = f"taken by {item['taken_by']}" if item.get("taken_by") else "waiting for a person"
        until = re.sub(r"\.\d+Z$", "Z", str(c["expires_at"]))
        out.append(f"  {name or c['resource']}: handed over by {who}, {state} (until {until})")
    return out


OPERATOR = "olivia.ops"  # a Proctor operator (control.admin_group): reads the budgets


def _budget(cfg, issuer: DevIssuer, config_path: Path, events: list[dict], results: list[dict]) -> list[str]:
    """The demo's purchase-order budget: this run's budget events from the decision record, and
    its ledgers now, as an operator reads them (GET /v1/budgets)."""
    b = demo_limits
    out = [f"Budget {b.BUDGET} ({config_path.parent.name}/{config_path.name}): purchase orders' net amount, "
           f"EUR {b.BUDGET_LIMIT:,} a month per agent\ngroup, soft threshold {b.BUDGET_SOFT * 100:.0f} %. "
           "Its events (decisions.jsonl \"type\": \"budget\", also in the audit trail and to webhooks):",
           *(b.budget_event_lines(events, results) or ["  (none)"]),
           f"Its ledgers now (GET /v1/budgets?name={b.BUDGET} as {OPERATOR}):"]
    token = issuer.issue(OPERATOR, {cfg.approvals.approver_groups_claim: [cfg.control.admin_group]}, "15m",
                         audience=cfg.approvals.approver_audience)
    try:
        doc = _control_get(f"http://127.0.0.1:{cfg.control.listen.port}", token, f"/v1/budgets?name={b.BUDGET}")
    except (OSError, ValueError) as e:
        return out + [f"  (could not read them: {e})"]
    return out + b.ledger_lines(doc)


WORKFLOW = "procure-to-pay"
SUPERVISOR_NOTE = "Globex confirmed the quoted EUR 5,200 a server: enter its corrected invoice"


def _supervise(control: str, token: str) -> list[str]:
    """An accounts-payable supervisor working her workflow inbox through the control API: each
    escalated step shown with what failed, then decided `retry` (the agent may go on) with a note."""
    import urllib.request

    head = f"The {SUPERVISORS}' inbox (GET /v1/workflows/inbox as {SUPERVISOR}), after the failed invoice:"
    try:
        items = _control_get(control, token, f"/v1/workflows/inbox?workflow={WORKFLOW}")["items"]
        out = [head]
        for item in items:
            failed: dict = next((e for e in reversed(item["history"]) if e["decision_id"] == item.get("decision_id")),
                                {})
            details = _control_get(control, token, f"/v1/workflows/instances/{item['instance']}")
            order = next((o["id"] for o in details["objects"] if o["type"] == "PurchaseOrder"), "?")
            n = item.get("failures") or 0
            why = {"failures": f"{n} failed call{'' if n == 1 else 's'} ({item.get('agent')}, ERP answered "
                               f"{failed.get('status', '?')})",
                   "gave-up": f"gave up after {n} failed calls", "stalled": "stalled"}.get(item["reason"],
                                                                                          item["reason"])
            state = f"taken by {item['taken_by']}" if item.get("taken_by") else "waiting for a person"
            out.append(f"  order {order}, step {item['step']}: {why}, {state}")
            req = urllib.request.Request(
                control + item["decide_url"], method="POST",
                data=json.dumps({"resolution": "retry", "note": SUPERVISOR_NOTE}).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback only
                decided = json.loads(r.read())
            out.append(f"  {decided['decided_by']} decides {decided['resolution']}: \"{SUPERVISOR_NOTE}\"")
        return out if items else [head, "  (empty)"]
    except (OSError, ValueError, KeyError) as e:
        return [head, f"  (could not work it: {e})"]


@dataclass
class ProcureToPay:
    outcomes: dict[str, str]  # decision id -> step outcome (completed, failed, refused)
    lines: list[str]  # what the demo prints about the instances and their outcomes


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f} %"


def _procure_to_pay(control: str, token: str, exceptions: list[dict]) -> ProcureToPay:
    """This run's procure-to-pay instances (the demo forgot the last run's at start) with their
    steps, from GET /v1/workflows/instances, and the outcomes from GET /v1/workflows/kpis;
    `exceptions`: this run's workflow event records (escalated, decided, ...)."""
    head = f"Procure-to-pay (workflows/{WORKFLOW}.yaml): the instances agents worked on (GET /v1/workflows/instances):"
    try:
        listed = _control_get(control, token, f"/v1/workflows/instances?workflow={WORKFLOW}")["instances"]
        details = [_control_get(control, token, f"/v1/workflows/instances/{i['id']}") for i in listed]
        kpi_doc = _control_get(control, token, f"/v1/workflows/kpis?workflow={WORKFLOW}")
    except (OSError, ValueError, KeyError) as e:
        return ProcureToPay({}, [head, f"  (could not read them: {e})"])
    outcomes = {e["decision_id"]: e["outcome"] for d in details for e in d["events"]}
    lines = [head]
    for d in sorted(details, key=lambda d: d["started_at"]):
        objects = {o["type"]: o["id"] for o in d["objects"]}
        name = (f"order {objects['PurchaseOrder']}" if "PurchaseOrder" in objects
                else f"requisition {objects.get('PurchaseRequisition', '?')}")
        steps = []
        for step in d["completed"]:
            t = d["tally"].get(step) or {}
            notes = [f"{t[k]} {label}" for k, label in (("refusals", "refused"), ("failures", "failed")) if t.get(k)]
            if any(x["event"] == "escalated" and x["instance"] == d["id"] and x.get("step") == step
                   for x in exceptions):
                notes.append("escalated")  # (and a person decided on it)
            elif any(e["human"] and e["step"] == step and e["outcome"] == "completed" for e in d["events"]):
                notes.append("approved by a person" if step == "purchase_order" else "a person took part")
            steps.append(step + (f" ({', '.join(notes)})" if notes else ""))
        pending = [f"{s} ({t['refusals']} refused)" for s, t in d["tally"].items()
                   if s not in d["completed"] and t.get("refusals")]
        state = "completed" if d["state"] == "completed" else f"running (next: {', '.join(d['next']) or '-'})"
        lines.append(f"  {name}: {state}, cost {d['currency']} {d['cost']}")
        lines.append(f"    {' > '.join(steps + pending)}")
    w = next((w for w in kpi_doc.get("workflows", []) if w["name"] == WORKFLOW), None)
    if w is None:
        return ProcureToPay(outcomes, lines + ["  (no KPIs for it)"])
    inst, cycle, sla, cost = w["instances"], w["cycle_time_seconds"], w["sla"], w["cost"]
    failed = sum(s["failures"] for s in w["steps"])
    calls = sum(s["attempts"] for s in w["steps"])
    refused = sum(s["refusals"] for s in w["steps"])
    target = _duration(sla["target_seconds"]) if sla["target_seconds"] and sla["target_seconds"] < 86400 \
        else f"{(sla['target_seconds'] or 0) // 86400} days"
    lines += [
        "",
        f"Outcomes (GET /v1/workflows/kpis?workflow={WORKFLOW}):",
        f"  cycle time     {_duration(cycle['p50'])} from requisition to payment "
        f"({_duration(cycle['human_wait_p50'])} of it waiting for a person)",
        f"  throughput     {inst['completed']} completed, {inst['running']} running ({inst['started']} started)",
        f"  error rate     {_percent(w['error_rate'])} of step calls failed ({failed} of {calls}); "
        f"{refused} refused out of order",
        f"  SLA adherence  {_percent(sla['adherence'])} ({sla['met']} of {sla['met'] + sla['missed']} "
        f"completed within {target})",
        f"  cost           {w['currency']} {cost['total']} in all, {w['currency']} {cost['per_instance'] or '-'} "
        "per completed instance",
    ]
    return ProcureToPay(outcomes, lines)


def run_demo(keep_running: bool = False) -> int:
    """Run the demo; SIGTERM and SIGHUP stop it (and every process it started) as Ctrl-C does."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run_demo(keep_running)
    except _Terminated as e:
        print(f"proctor demo: stopped by {e}", file=sys.stderr)
        return 128 + signal.Signals[str(e)].value
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_demo(keep_running: bool) -> int:
    state_dir = default_config().state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = demo_limits.write_config(state_dir)  # the embedded default plus the demo's limits
    cfg = load_config(config_path)
    busy = [p for p in (cfg.listen.port, cfg.control.listen.port, *MOCK_PORTS) if not port_free(p)]
    if busy:
        print(f"proctor demo: port(s) {busy} on 127.0.0.1 are in use; stop whatever uses them and retry", file=sys.stderr)
        return 2
    _forget_mock_records(cfg.store_url)
    logs = cfg.state_dir / "demo-logs"
    logs.mkdir(exist_ok=True)
    decisions = cfg.decisions_path
    start_offset = decisions.stat().st_size if decisions.exists() else 0
    py = sys.executable
    procs: list[subprocess.Popen] = []
    try:
        mocks = []
        for module, port, what in MOCKS:
            mock_log = logs / f"{module.rsplit('.', 1)[-1]}.log"
            proc = subprocess.Popen([py, "-m", module, "--port", str(port)], stdout=open(mock_log, "w"),
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            procs.append(proc)
            mocks.append((proc, port, what, mock_log))
        proxy_log = logs / "proctor.log"
        proxy = subprocess.Popen([py, "-m", "proxy.cli", "run", "-c", str(config_path)], stdout=open(proxy_log, "w"),
                                 stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        procs.append(proxy)
        print("proctor demo: starting mock " + ", ".join(w for _, _, w in MOCKS) + " systems and the proxy ...")
        for proc, port, what, mock_log in mocks:
            _wait(lambda port=port: not port_free(port), 20, f"mock {what}", proc, mock_log)
        _wait(lambda: _http_ok(f"http://127.0.0.1:{cfg.control.listen.port}/readyz"), 30, "proctor", proxy, proxy_log)

        issuer = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer)
        ca_pem = cfg.ca_dir / "mitmproxy-ca-cert.pem"
        results: list[dict] = []
        manager_token = issuer.issue(
            MANAGER, {cfg.approvals.approver_groups_claim: ["procurement-managers"]}, "15m",
            audience=cfg.approvals.approver_audience,
        )
        supervisor_token = issuer.issue(SUPERVISOR, {cfg.approvals.approver_groups_claim: [SUPERVISORS]}, "15m",
                                        audience=cfg.approvals.approver_audience)
        controller_token = issuer.issue(demo_limits.CONTROLLER,
                                        {cfg.approvals.approver_groups_claim: [demo_limits.BUDGET_GROUP]}, "15m",
                                        audience=cfg.approvals.approver_audience)
        supervisor_lines: list[str] = []
        stop_manager = threading.Event()
        control = f"http://127.0.0.1:{cfg.control.listen.port}"
        for token, decides in ((manager_token, _manager_decides), (controller_token, _controller_decides)):
            threading.Thread(target=_approver, args=(control, token, decides, stop_manager), daemon=True).start()
        for script, agent_id, claims in AGENTS:
            if claims is None:
                proxy_url = f"http://127.0.0.1:{cfg.listen.port}"
            else:
                token = issuer.issue(agent_id, claims, "15m")
                proxy_url = f"http://{agent_id}:{token}@127.0.0.1:{cfg.listen.port}"
            env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
            env.update(
                HTTP_PROXY=proxy_url,
                HTTPS_PROXY=proxy_url,
                http_proxy=proxy_url,
                https_proxy=proxy_url,
                SSL_CERT_FILE=str(ca_pem),
                REQUESTS_CA_BUNDLE=str(ca_pem),
            )
            argv = [py, "-m", "proxy.demo.agents", script, *_script_args(script, results)]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                raise RuntimeError(f"demo agent {script} failed")
            results += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            if script == "invoice":  # the failed invoice is in the supervisors' inbox: one decides
                supervisor_lines = _supervise(f"http://127.0.0.1:{cfg.control.listen.port}", supervisor_token)

        stop_manager.set()
        earlier, lines = _records(decisions, start_offset, results)
        recs = {r["decision_id"]: r for r in lines if "type" not in r}
        approval_events: dict[str, tuple[dict, bool]] = {}  # approval id -> (settled event, in an earlier run?)
        for r, before in [(r, True) for r in earlier] + [(r, False) for r in lines]:
            if r.get("type") == "approval" and r.get("event") in SETTLED:
                approval_events[r["approval_id"]] = (r, before)
        handoffs = {r["decision_id"]: r for r in lines if r.get("type") == "claim" and r.get("event") == "handoff"}
        p2p = _procure_to_pay(f"http://127.0.0.1:{cfg.control.listen.port}", manager_token,
                              [r for r in lines if r.get("type") == "workflow"])
        rows = []
        for res in results:
            rec = recs.get(res["decision_id"] or "", {})
            outcome = rec.get("decision", "?")
            settled, before = approval_events.get(rec.get("approval_id") or "", (None, False))
            if settled is not None:
                # held in this run; or the same request an approver settled in an earlier run (a
                # denial is final for it), which this run did not hold again
                verdict = f"{settled['event'].upper()} EARLIER" if before else f"HELD, {settled['event'].upper()}"
                rows.append([res["agent"], res["step"], rec.get("action") or "-", verdict, str(res["status"]),
                             f"{settled.get('by', '?')}: {settled.get('reason', '')}"])
                continue
            moved = handoffs.get(res["decision_id"] or "")
            if moved is not None and outcome == "allow":
                to = (f"the {moved['to_queue']} inbox (people)" if moved.get("to_queue")
                      else str(moved.get("to")))
                rows.append([res["agent"], res["step"], rec.get("action") or "-", "ALLOWED, HANDED OFF",
                             str(res["status"]), f"claim moved to {to}"])
                continue
            if res.get("claim"):
                c = res["claim"]
                rows.append([res["agent"], res["step"], rec.get("action") or "-", "REFUSED (claimed)",
                             str(res["status"]), f"claimed by {c.get('holder')} until {c.get('until')}"])
                continue
            if res.get("first"):
                first = res["first"]
                what = _order_number(first.get("result")) or f"decision {first.get('decision_id')}"
                rows.append([res["agent"], res["step"], rec.get("action") or "-", "SUPPRESSED (duplicate)",
                             str(res["status"]), f"same order as {what}, not sent again"])
                continue
            if res.get("workflow") and (rec.get("refusal") or {}).get("kind") == "step-precondition":
                wf = res["workflow"]
                rows.append([res["agent"], res["step"], rec.get("action") or "-", "REFUSED (out of order)",
                             str(res["status"]), f"needs {' and '.join(wf.get('missing') or [])} first; "
                             f"can do now: {', '.join(wf.get('next') or []) or 'nothing'}"])
                continue
            if outcome == "allow" and p2p.outcomes.get(res["decision_id"] or "") == "failed":
                err = res.get("upstream_error") or {}
                why = str(err.get("message") or "").split(":", 1)[0].split(" (", 1)[0]
                # (the answer's Proctor-Workflow-Retry says whose inbox has it now: escalated="group")
                verdict = "STEP FAILED, ESCALATED" if "escalated=" in (res.get("retry") or "") else "STEP FAILED"
                rows.append([res["agent"], res["step"], rec.get("action") or "-", verdict,
                             str(res["status"]), f"ERP {err.get('code') or ''}: {why}".strip()])
                continue
            if (rec.get("refusal") or {}).get("kind") == "rate-limited":
                rows.append([res["agent"], res["step"], rec.get("action") or "-", "THROTTLED", str(res["status"]),
                             demo_limits.rate_limit_cell(res) or "-"])
                continue
            if outcome == "allow":
                verdict = "ALLOWED"
            elif res["status"] in (401, 407):
                verdict = "REFUSED (auth)"
            else:
                verdict = "DENIED"
            why = ", ".join(rec.get("reasons") or [])
            if not why and (rec.get("refusal") or {}).get("kind") == "policy":
                why = "no policy permits it (default deny)"
            why = why or (rec.get("refusal") or {}).get("title", "")
            limited = demo_limits.rate_limit_cell(res) if outcome == "allow" else None
            if limited:
                why = f"{why}; {limited}"
            rows.append(
                [res["agent"], res["step"], rec.get("action") or "-", verdict, str(res["status"]), why or "-"]
            )
        inbox_lines = _inbox(cfg, issuer, results, handoffs)
        print()
        print(_fmt_table(rows, ["agent", "what it tried", "action", "decision", "status", "policy / reason"]))
        print()
        if inbox_lines:
            print(f"The service desk's inbox (GET /v1/claims/inbox as {DESK_PERSON}):")
            print("\n".join(inbox_lines))
            print()
        if supervisor_lines:
            print("\n".join(supervisor_lines))
            print()
        print("\n".join(p2p.lines))
        print()
        print("\n".join(_budget(cfg, issuer, config_path, [r for r in lines if r.get("type") == "budget"], results)))
        print()
        print(
            f"Orders over EUR 10,000 are held for a procurement manager (policy po-over-10k-needs-approval);\n"
            f"here {MANAGER} approves up to EUR 50,000 through the approvals API and denies the rest.\n"
            "The held agent's connection simply waits; once approved, its request goes through exactly once."
        )
        print()
        print(
            "An agent's first update claims the incident for 15 minutes (connectors/ticketing.yaml), so its\n"
            "colleague gets 409 naming the holder and until when. A reassignment hands the claim over once the\n"
            "ticketing system accepts it: to the agent named in assigned_to (the old holder then gets 409 naming\n"
            "it), else to the assignment group's people, in their inbox. The same purchase order (supplier and\n"
            "items) raised again within 10 minutes, by any agent, is not sent to the ERP twice (connectors/erp.yaml)."
        )
        print()
        print(
            f"Procure-to-pay is a workflow (workflows/{WORKFLOW}.yaml): each step finds its instance from the\n"
            "document it follows (the quotation names the requisition, the order the quotation, the goods receipt\n"
            "and the invoice the order, the payment the invoice), and a step whose prerequisites are not done gets\n"
            "409 naming them and what can be done now (policy workflow-step-out-of-order), before anything reaches\n"
            "the ERP. A step the ERP refuses is recorded as failed: here the invoice 10 % over the order fails its\n"
            f"three-way match (422) and, as the invoice step's on_error says, goes to the {SUPERVISORS}'\n"
            "inbox; once one of them decides, the corrected invoice completes the step."
        )
        print()
        print(
            f"The demo's config ({config_path}) adds a rate limit and a budget to the embedded default\n"
            f"(docs/limits.md). report-bot, stuck in a loop re-running one query, meets rate limit {demo_limits.RATE_LIMIT}\n"
            "(30 a minute per agent, at most 3 at once): the rest get 429 with Retry-After, before any policy\n"
            "runs, and a client that honours Retry-After (urllib3's Retry) waits and gets through. Purchase orders\n"
            f"count against {demo_limits.BUDGET} in each group of the agent's (procurement-bot is in two): the call\n"
            "that takes a window past its soft threshold is an event (the record, the audit trail, webhooks), and\n"
            "an order that would go over the limit is held for a budget extension (policy budget-extension), here\n"
            f"approved by {demo_limits.CONTROLLER} of {demo_limits.BUDGET_GROUP}. The demo starts each run with fresh "
            "rate-limit counters\nand budget windows."
        )
        print()
        print(f"Every decision is in {decisions} (one JSON line each); look one up by its X-Proctor-Decision-Id.")
        allowed = sum(1 for r in rows if r[3].startswith("ALLOWED"))
        handed = sum(1 for r in rows if r[3] == "ALLOWED, HANDED OFF")
        failed = sum(1 for r in rows if r[3].startswith("STEP FAILED"))
        escalated = sum(1 for r in rows if r[3] == "STEP FAILED, ESCALATED")
        held = sum(1 for r in rows if r[3].startswith("HELD"))
        duplicates = sum(1 for r in rows if r[3].startswith("SUPPRESSED"))
        out_of_order = sum(1 for r in rows if r[3] == "REFUSED (out of order)")
        throttled = sum(1 for r in rows if r[3] == "THROTTLED")
        refused = len(rows) - allowed - failed - held - duplicates
        print(f"{len(rows)} calls: {allowed} allowed ({handed} of them handoffs), {held} held for approval, "
              f"{refused} refused ({out_of_order} out of order, {throttled} rate-limited), {duplicates} duplicate"
              f"{'' if duplicates == 1 else 's'} suppressed, {failed} failed at the ERP ({escalated} escalated).")
        if keep_running:
            try:  # (from the first word of the banner on: a signal right after it is a clean stop too)
                print(
                    f"\nStill running: proxy on 127.0.0.1:{cfg.listen.port}, control API on "
                    f"127.0.0.1:{cfg.control.listen.port}, mock ticketing/CRM/ERP on 127.0.0.1:9101/9102/9103 "
                    f"(config: {config_path}). Try:\n"
                    f"  export TOKEN=$(proctor token issue --agent support-bot --claim 'groups=[\"support\"]')\n"
                    f"  curl -x http://support-bot:$TOKEN@127.0.0.1:{cfg.listen.port} "
                    f"http://127.0.0.1:{MOCK_PORT}/api/now/table/incident\n"
                    "Press Ctrl-C to stop (SIGTERM stops it too)."
                )
                sys.stdout.flush()
                while all(p.poll() is None for p in procs):
                    time.sleep(0.5)
            except (KeyboardInterrupt, _Terminated):
                pass  # the finally below stops every process; exit 0 as after Ctrl-C
        return 0
    except RuntimeError as e:
        print(f"proctor demo failed: {e}\nlogs: {logs}", file=sys.stderr)
        return 1
    finally:
        _stop(procs)
