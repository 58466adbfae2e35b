"""`proctor demo` end to end (fixed default ports: skipped if they are taken)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from proxy.demo import MOCK_PORTS, port_free

pytestmark = pytest.mark.integration


def run_demo(cwd) -> str:
    busy = [p for p in (8080, 8081, *MOCK_PORTS) if not port_free(p)]
    if busy:
        pytest.skip(f"demo ports {busy} are in use on this machine")
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "demo"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two runs of the demo in one directory, one after the other: the second finds the first's
    .proctor state (approvals, the decision record; claims and stored answers it forgets)."""
    cwd = tmp_path_factory.mktemp("demo")
    first = run_demo(cwd)
    return cwd, first, run_demo(cwd)


SUMMARY = ("43 calls: 25 allowed (2 of them handoffs), 3 held for approval, 13 refused (2 out of order, "
           "2 rate-limited), 1 duplicate suppressed, 1 failed at the ERP (1 escalated).")


def table(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()
            if re.match(r"(\S+-bot(-\d)?|rogue-script) ", line)]


def test_demo_runs_and_explains_each_call(demo_runs):
    tmp_path, text, _ = demo_runs
    assert SUMMARY in text
    # table rows: columns are separated by two or more spaces (their widths follow the content)
    rows = {f"{c[0]}|{c[1]}": "  ".join(c) for c in table(text)}
    def row(agent: str, step: str) -> str:
        return rows[f"{agent}|{step}"]
    # ticketing: the incident's group is looked up on the upstream
    assert "ALLOWED" in row("support-bot", "work its own incident")
    assert "no policy permits it (default deny)" in row("support-bot", "work the network team's incident")
    assert "resolve-needs-close-code" in row("support-bot", "resolve without a close code")
    assert "agents-never-delete-incidents" in row("support-bot", "delete the incident")
    assert "egress-default-deny" in row("support-bot", "send data to an unknown host")
    # claims: support-bot's first update claimed its incident for 15 minutes; its colleague
    # is refused with 409, and the table says who holds it and until when
    claimed = row("support-bot-2", "work support-bot's incident")
    assert "REFUSED (claimed)" in claimed and "  409  " in claimed
    m = re.search(r"claimed by support-bot until (\S+Z)", claimed)
    assert m, claimed
    ttl = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp() - time.time()
    assert 600 < ttl <= 900, ttl
    # handoff: support-bot works the e-mail incident and reassigns it to support-bot-2; the claim
    # moves, support-bot-2's update passes, support-bot's next one gets 409 naming support-bot-2
    assert "ALLOWED" in row("support-bot", "work the e-mail incident")
    handed = row("support-bot", "hand the e-mail incident to support-bot-2")
    assert "ALLOWED, HANDED OFF" in handed and "  200  " in handed and "claim moved to support-bot-2" in handed
    took = row("support-bot-2", "work the e-mail incident handed to it")
    assert "ALLOWED" in took and "  200  " in took and "support-update-own-group-incidents" in took
    late = row("support-bot", "update the e-mail incident again")
    assert "REFUSED (claimed)" in late and "  409  " in late and "claimed by support-bot-2 until " in late, late
    # and to the service desk's people: the claim goes to their inbox, which the demo reads
    desk = row("support-bot-2", "hand it to the service-desk people")
    assert "ALLOWED, HANDED OFF" in desk and "claim moved to the service-desk inbox (people)" in desk
    assert "The service desk's inbox (GET /v1/claims/inbox as sam.desk):" in text
    assert re.search(r"^  INC\d+: handed over by support-bot-2, waiting for a person \(until \S+Z\)$", text, re.M), text
    # the record holds both handoffs, each with the request that made it
    records = [json.loads(x) for x in (tmp_path / ".proctor" / "decisions.jsonl").read_text().splitlines() if x.strip()]
    moves = [(r["holder"], r.get("to"), r.get("to_queue")) for r in records
             if r.get("type") == "claim" and r["event"] == "handoff"]
    assert moves[:2] == [("support-bot", "support-bot-2", None), ("support-bot-2", None, "service-desk")], moves
    # ERP, procure-to-pay (workflows/procure-to-pay.yaml): an order needs its quotation first;
    # the 409 says which step is missing and which can be done now, and the ERP never sees it
    assert "ALLOWED" in row("procurement-bot", "raise a requisition for 4 laptops")
    early = row("procurement-bot", "order the laptops before a quote")
    assert "REFUSED (out of order)" in early and "  409  " in early, early
    assert "needs quote first; can do now: quote" in early, early
    assert "procurement-enter-quotations" in row("procurement-bot", "enter Acme's quotation (laptops)")
    laptops = row("procurement-bot", "order 4 laptops (EUR 4,799.96)")
    assert "ALLOWED" in laptops and "  201  " in laptops  # order 4500000002
    assert "ALLOWED" in row("procurement-bot", "raise a requisition for 5 servers")
    assert "ALLOWED" in row("procurement-bot", "enter Globex's quotation (servers)")
    # held for a manager, who approves one (forwarded: 201) and denies the other
    servers = row("procurement-bot", "order 5 servers (EUR 26,000)")
    assert "HELD, APPROVED" in servers and "  201  " in servers  # order 4500000003
    assert "HELD, DENIED" in row("procurement-bot", "order 20 servers (EUR 104,000)")
    assert "403" in row("procurement-bot", "order 20 servers (EUR 104,000)")
    # the goods receipt before the release: 409 naming the release
    receipt = row("procurement-bot", "post the goods receipt before the release")
    assert "REFUSED (out of order)" in receipt and "  409  " in receipt
    assert "needs release first; can do now: release" in receipt, receipt
    assert "no-self-approval" in row("procurement-bot", "release the order it created")
    # dedupe: the same order (supplier and items) by another agent is not sent to the ERP again
    dup = row("procurement-bot-2", "order the same 4 laptops again")
    assert "SUPPRESSED (duplicate)" in dup and "  409  " in dup
    assert "same order as order 4500000002, not sent again" in dup, dup
    # finance-bot releases the servers order procurement-bot raised; the receipt then passes
    assert "approvers-release-orders" in row("finance-bot", "release order 4500000003")
    assert "procurement-post-goods-receipts" in row("procurement-bot", "post the goods receipt")
    # the invoice 10 % over the order fails the ERP's three-way match (422): the step failed
    failed = row("payables-bot", "enter Globex's invoice (EUR 28,600)")
    assert "STEP FAILED, ESCALATED" in failed and "  422  " in failed, failed
    assert "ERP M8/087: amount does not match the purchase order" in failed, failed
    # escalated to the accounts-payable supervisors (the invoice step's on_error): one of them
    # finds it in her workflow inbox and decides, then the agent enters the corrected invoice
    assert ("The accounts-payable-supervisors' inbox (GET /v1/workflows/inbox as paula.payables), after the "
            "failed invoice:\n"
            "  order 4500000003, step invoice: 1 failed call (payables-bot, ERP answered 422), waiting for a person\n"
            "  paula.payables decides retry: \"Globex confirmed the quoted EUR 5,200 a server: enter its corrected "
            "invoice\"\n") in text, text
    events = [(r["event"], r.get("step"), r.get("group"), r.get("by"), r.get("resolution")) for r in records
              if r.get("type") == "workflow"]
    assert events[:2] == [("escalated", "invoice", "accounts-payable-supervisors", None, None),
                          ("decided", "invoice", "accounts-payable-supervisors", "paula.payables", "retry")], events
    corrected = row("payables-bot", "enter the corrected invoice (EUR 26,000)")
    assert "ALLOWED" in corrected and "  201  " in corrected and "payables-enter-invoices" in corrected
    paid = row("payables-bot", "pay invoice 5105600001")
    assert "ALLOWED" in paid and "  201  " in paid and "payables-pay-invoices" in paid
    # the instances, as the workflow API has them: the servers order went all the way
    assert re.search(r"^  order 4500000002: running \(next: release\), cost EUR 1\.70\n"
                     r"    requisition > quote > purchase_order \(1 refused\)$", text, re.M), text
    assert re.search(r"^  order 4500000003: completed, cost EUR 2\.05\n    requisition > quote > "
                     r"purchase_order \(approved by a person\) > release > goods_receipt \(1 refused\) > "
                     r"invoice \(1 failed, escalated\) > payment$", text, re.M), text
    assert re.search(r"^  order 4500000004: running \(next: release\), cost EUR 1\.70\n"
                     r"    requisition > quote > purchase_order \(approved by a person\)$", text, re.M), text
    # and its outcomes (GET /v1/workflows/kpis)
    assert "Outcomes (GET /v1/workflows/kpis?workflow=procure-to-pay):" in text
    assert re.search(r"^  cycle time     \d+\.\d s from requisition to payment \(\d+\.\d s of it waiting for a "
                     r"person\)$", text, re.M), text
    assert "  throughput     1 completed, 2 running (3 started)" in text
    assert "  error rate     7 % of step calls failed (1 of 14); 2 refused out of order" in text
    assert "  SLA adherence  100 % (1 of 1 completed within 7 days)" in text
    assert "  cost           EUR 5.45 in all, EUR 2.05 per completed instance" in text
    # budget po-spend-monthly (the demo's config): EUR 40,000 of orders a month per agent group; the
    # servers order takes the procurement group past its 75 % soft threshold, the 20 servers would
    # go over it (held, and the manager denies them), procurement-bot-2's 8 laptops go over it: held
    # for a budget extension, which the controller approves (reserved over the limit, sent once)
    over = row("procurement-bot-2", "order 8 laptops (EUR 9,599.92)")
    assert "HELD, APPROVED" in over and "  201  " in over, over
    assert "fiona.finance: budget extension for this EUR 9,599.92 order" in over, over
    assert ("Budget po-spend-monthly (.proctor/demo.yaml): purchase orders' net amount, EUR 40,000 a month per "
            "agent\ngroup, soft threshold 75 %. Its events (decisions.jsonl \"type\": \"budget\", also in the audit "
            "trail and to webhooks):\n"
            "  soft_threshold       procurement-bot, order 5 servers (EUR 26,000): groups procurement, "
            "procurement-approvers at EUR 30,799.96 (77 %)\n"
            "  exhausted, held      procurement-bot, order 20 servers (EUR 104,000): groups procurement, "
            "procurement-approvers at EUR 30,799.96 (77 %)\n"
            "  exhausted, extended  procurement-bot-2, order 8 laptops (EUR 9,599.92): group procurement at "
            "EUR 40,399.88 (101 %)\n"
            "Its ledgers now (GET /v1/budgets?name=po-spend-monthly as olivia.ops):\n"
            "  group procurement           EUR 40,399.88 spent (101 %), EUR 0 remaining, soft threshold reached\n"
            "  group procurement-approvers EUR 30,799.96 spent (77 %), EUR 9,200.04 remaining, soft threshold "
            "reached\n") in text, text
    parts = {r.get("decision_id"): r["budget"] for r in records if r.get("budget")}
    extended = next(p for p in parts.values() if p.get("outcome") == "extended")
    assert (extended["estimate"], extended["result"], extended["actual"]) == ("9599.92", "settled", "9599.92")
    assert (tmp_path / ".proctor" / "demo.yaml").exists()
    # CRM
    assert "agents-never-close-won" in row("sales-bot", "mark the deal Closed Won")
    # rate limit crm-queries (the demo's config): report-bot's loop gets 3 through, then 429 with
    # Retry-After; the same call from a client honouring Retry-After waits and passes
    for i, left in ((1, 2), (2, 1), (3, 0)):
        passed = row("report-bot", f"re-run its account report ({i} of 5)")
        assert "ALLOWED" in passed and f"sales-read-crm; crm-queries: {left} left" in passed, passed
    for i in (4, 5):
        throttled = row("report-bot", f"re-run its account report ({i} of 5)")
        assert "THROTTLED" in throttled and "  429  " in throttled, throttled
        assert "crm-queries: 30 a minute per agent, 3 at once; Retry-After <= 2 s" in throttled, throttled
    honoured = row("report-bot", "run it again, honouring Retry-After")
    assert "ALLOWED" in honoured and "  200  " in honoured and "after 429 and its Retry-After" in honoured
    # (in the record of both runs: the honouring client's own 429 is a decision too)
    limited = [r["rate_limit"] for r in records if r.get("agent") == "report-bot" and r.get("rate_limit")]
    assert [x["outcome"] for x in limited] == (["allowed"] * 3 + ["throttled"] * 3 + ["allowed"]) * 2, limited
    assert {x["name"] for x in limited} == {"crm-queries"}
    assert "407" in row("rogue-script", "call the ticketing API without a token")
    assert (tmp_path / ".proctor" / "decisions.jsonl").exists()


def test_a_rerun_tells_the_same_story(demo_runs):
    """Same .proctor state, same table: every label, status and reason (timestamps aside). In
    particular the 20-server order is held and denied again: each run's orders carry a new
    Idempotency-Key, so the last run's final denial does not answer this run's new order."""
    _, first, second = demo_runs
    def story(text: str) -> list[list[str]]:
        return [[re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", cell) for cell in row] for row in table(text)]
    assert story(second) == story(first)
    assert len(story(first)) == 43
    twenty = next(r for r in table(second) if r[1] == "order 20 servers (EUR 104,000)")
    assert twenty[3:5] == ["HELD, DENIED", "403"], twenty
    assert SUMMARY in first and SUMMARY in second
    # the workflow tells the same story too: the mock ERP numbers its documents afresh, and the
    # demo forgot the last run's instances, so the rerun's requisition starts a new one
    def outcomes(text: str) -> list[str]:
        # the supervisors' inbox, the instances, their outcomes (seconds aside) and the budget
        start = text.index("The accounts-payable-supervisors' inbox")
        return [re.sub(r"\d+\.\d s", "<s>", block) for block in text[start:].split("\n\n", 4)[:4]]
    assert outcomes(second) == outcomes(first)
    assert outcomes(first)[3].startswith("Budget po-spend-monthly"), outcomes(first)
    # (a budget window is a calendar month: the rerun found it empty, as the demo resets the
    # ledger and the rate-limit counters at start)


def test_the_demo_forgets_claims_stored_answers_and_workflow_instances_about_the_mock_records(tmp_path):
    """The mocks start empty on every run: a rerun must not find its first order 'already created',
    nor its requisition (numbered 0010000001 again) in the last run's finished instance; nor the
    last run's orders spent in this month's budget window, nor its queries in the rate limit."""
    import sqlite3

    from proxy.demo import _forget_mock_records

    forgotten = ("proctor_claims", "proctor_idempotency", "proctor_wf_instances", "proctor_wf_objects",
                 "proctor_wf_events", "proctor_rate_limits", "proctor_budget_usage", "proctor_budget_reservations")
    kept = ("proctor_approvals", "proctor_agents")
    db_path = tmp_path / "proctor.db"
    db = sqlite3.connect(db_path)
    for table in forgotten + kept:
        db.execute(f"CREATE TABLE {table} (id TEXT)")
        db.execute(f"INSERT INTO {table} VALUES ('x')")
    db.commit()
    db.close()
    _forget_mock_records(f"sqlite://{db_path}")
    db = sqlite3.connect(db_path)
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in forgotten + kept}
    assert counts == {**{t: 0 for t in forgotten}, **{t: 1 for t in kept}}
    _forget_mock_records(f"sqlite://{tmp_path / 'missing.db'}")  # no store yet: nothing to do
    assert not (tmp_path / "missing.db").exists()


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc: each task's children)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = open(f"/proc/{p}/task/{t}/children").read().split()
            except FileNotFoundError:
                continue
            for k in map(int, kids):
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_keep_running_stops_every_process_on_sigterm_as_on_ctrl_c(tmp_path, sig):
    """`demo --keep-running` stopped by a service manager (SIGTERM) or a closed terminal (SIGHUP):
    the proxy and the three mocks stop with it and the demo's ports are free again."""
    busy = [p for p in (8080, 8081, *MOCK_PORTS) if not port_free(p)]
    if busy:
        pytest.skip(f"demo ports {busy} are in use on this machine")
    demo = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo", "--keep-running"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = []
        assert demo.stdout is not None
        for line in demo.stdout:
            out.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        else:
            pytest.fail("the demo ended before it was ready:\n" + "".join(out))
        children = _descendants(demo.pid)
        assert len(children) >= 4, children  # the proxy and three mocks at least
        demo.send_signal(sig)
        assert demo.wait(30) == 0, "".join(out) + demo.stdout.read()
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)], "processes outlived the demo"
        assert all(port_free(p) for p in (8080, 8081, *MOCK_PORTS))
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_children_die_with_a_demo_killed_outright(tmp_path):
    """SIGKILL cannot be caught: the children ask the kernel for SIGTERM when their parent dies."""
    script = ("import subprocess, sys, time\nfrom proxy.demo import _die_with_parent\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_die_with_parent)\n"
              "print(p.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
