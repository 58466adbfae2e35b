"""The demo's rate limit and budget (docs/limits.md): the config the demo runs the proxy with,
and what the demo prints about them.

The proxy runs the embedded default plus `DEMO_LIMITS`, written to `.proctor/demo.yaml` on
every run (so `proctor run -c .proctor/demo.yaml` reproduces it). The limits stay out of the
bundled connectors and the embedded default on purpose: those apply to every user.

- `crm-queries`: report-bot's runaway loop re-runs one SOQL query; 3 pass at once, then 429.
- `po-spend-monthly`: purchase orders' net amount per agent group and calendar month; the
  servers order takes the procurement group past the soft threshold, a later order over the
  limit is held for a budget extension (policies/budgets.cedar) that fiona.finance approves.
  The demo prints the budget's event lines from the decision record and its ledgers from
  GET /v1/budgets.
"""

from __future__ import annotations

import math

from decimal import Decimal
from pathlib import Path

RATE_LIMIT = "crm-queries"
BUDGET = "po-spend-monthly"
BUDGET_LIMIT = Decimal("40000")
BUDGET_SOFT = Decimal("0.75")
BUDGET_GROUP = "budget-approvers"  # the @approval group of the bundled budget-extension policy
CONTROLLER = "fiona.finance"  # a finance controller in it: approves budget extensions of small orders
EXTENSION_UP_TO = 10_000  # bigger orders are held for a procurement manager anyway: the controller leaves them

# T = 60 s / 30 = 2 s: after 3 at once the 4th passes 2 s after the 1st. The loop's 5 calls take
# well under a second, so every run prints 3 allowed, 2 refused with Retry-After 2 (printed as
# its bound, <= 2 s, so a slow machine prints the same) and the Retry-After-honouring call let through after its one 429.
DEMO_LIMITS = f"""\
rate_limits:
  - name: {RATE_LIMIT}                 # an agent stuck in a loop re-running one SOQL query
    match: {{connectors: [crm], actions: [crm.query]}}
    key: [agent]
    limit: 30
    period: 1m
    burst: 3                          # at most 3 at once, then one every 2 seconds

budgets:
  - name: {BUDGET}
    match: {{connectors: [erp], actions: [erp.purchase_order.create]}}
    key: [group]                      # one ledger per agent group (an agent counts in each of its groups)
    limit: {BUDGET_LIMIT}
    currency: EUR
    period: month
    cost: {{field: net_amount}}         # the order's net amount (connectors/erp.yaml)
    soft_threshold: {BUDGET_SOFT}
    on_exceed: hold                   # over the limit: held for {BUDGET_GROUP} (policy budget-extension)
"""


def write_config(state_dir: Path) -> Path:
    """`.proctor/demo.yaml`: the embedded default (state in this directory) plus the limits."""
    path = state_dir / "demo.yaml"
    path.write_text("# Written by `proctor demo` on every run: the embedded default plus the demo's rate limit\n"
                    "# and budget (docs/limits.md). `proctor run -c .proctor/demo.yaml` runs the same proxy.\n"
                    "state_dir: .\n\n" + DEMO_LIMITS)
    return path


def rate_limit_cell(res: dict) -> str | None:
    """What a limited answer says, for the table: the 429's limit and Retry-After, or what is left."""
    rl = res.get("rate_limit")
    if isinstance(rl, dict):
        seconds = rl.get("period_seconds")
        period = {60.0: "minute", 3600.0: "hour", 86400.0: "day"}.get(seconds or 0.0, f"{seconds} s")
        per = " per " + ", ".join(rl.get("key") or {}) if rl.get("key") else ""
        # (the wait shrinks as the run goes on: shown as its bound, one refill interval, so that a
        # slow machine prints the same table)
        retry, limit = res.get("retry_after"), rl.get("limit")
        bound = math.ceil(seconds / limit) if isinstance(seconds, (int, float)) and isinstance(limit, int) and limit else None
        wait = (f"Retry-After <= {bound} s" if bound is not None and str(retry).isdigit() and int(str(retry)) <= bound
                else f"Retry-After {retry} s")
        return f"{rl.get('name')}: {limit} a {period}{per}, {rl.get('burst')} at once; {wait}"
    if res.get("retried"):  # its client waited out the 429s' Retry-After, then retried
        return f"after {' and '.join(map(str, res['retried']))} and its Retry-After"
    left = res.get("remaining")
    return f"{RATE_LIMIT}: {left} left" if left is not None else None


def _money(value: Decimal) -> str:
    return f"EUR {value:,.2f}".replace(".00", "")


def _share(value: Decimal) -> str:
    return f"{value * 100 / BUDGET_LIMIT:.0f} %"


def budget_event_lines(events: list[dict], results: list[dict]) -> list[str]:
    """This run's budget events (decision record lines of `"type": "budget"`, also sent to the
    audit trail and webhooks), one line per call and event: the groups whose window it was in,
    and where the window stood (spent + reserved, this call's reservation included when it
    made one)."""
    calls = {r.get("decision_id"): r for r in results}
    merged: dict[tuple[str, str, str], list[dict]] = {}
    for e in events:
        if e.get("budget") == BUDGET:
            merged.setdefault((e["decision_id"], e["event"], e["outcome"]), []).append(e)
    out = []
    for (decision_id, event, outcome), same in merged.items():
        res = calls.get(decision_id, {"agent": same[0].get("agent"), "step": "a call"})
        groups = sorted(str((e.get("key") or {}).get("group")) for e in same)
        at = {Decimal(e["spent"]) + Decimal(e["reserved"]) for e in same}
        where = " / ".join(f"{_money(a)} ({_share(a)})" for a in sorted(at))
        kind = event if event == "soft_threshold" else f"{event}, {outcome}"
        label = "group" if len(groups) == 1 else "groups"
        out.append(f"  {kind:<21}{res['agent']}, {res['step']}: {label} {', '.join(groups)} at {where}")
    return out


def ledger_lines(doc: dict) -> list[str]:
    """The budget's ledgers in the current window, as GET /v1/budgets answers (fleet-wide)."""
    budget = next((b for b in doc.get("budgets", []) if b.get("name") == BUDGET), None)
    if budget is None:
        return ["  (not declared)"]
    out = []
    for ledger in sorted(budget["ledgers"], key=lambda x: sorted(x["key"].items())):
        who = ", ".join(f"{dim} {value}" for dim, value in ledger["key"].items())
        spent = Decimal(ledger["spent"])
        soft = ", soft threshold reached" if ledger["soft_reached"] else ""
        out.append(f"  {who:<28}{_money(spent)} spent ({_share(spent)}), {_money(Decimal(ledger['remaining']))} "
                   f"remaining{soft}")
    return out or ["  (nothing spent)"]
