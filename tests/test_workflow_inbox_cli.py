"""`proctor workflows inbox` and `proctor workflows decide` against a real proxy (docs/workflows.md,
"The inbox: people decide").

The setup of tests/test_workflow_exceptions.py: a real Proctor process in front of a
recording upstream that fails on demand (X-Test-Status); the `orders` workflow escalates a
failing order to the `buyers` group after 2 failures and gives up after 3. People run the
CLI (click's CliRunner, the control API over loopback, tokens minted by the config's dev
issuer with --as/--group); agents call through the forward proxy with plain HTTP clients.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from conftest import Proctor
from test_workflow_exceptions import BUYERS, RECEIVERS, exceptions_workflow, items_of, person, to_quote, upstream_calls
from test_workflows import Work, call, header, start, work  # noqa: F401 (work: a fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cp(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:  # noqa: F811
    # (no stall sweep during the test: the inbox holds only the escalations these tests make)
    p = start(tmp_path_factory.mktemp("wfi-cli"), idp, pki, upstream, upstream_tls, work, [exceptions_workflow()],
              {"workflows": {"sweep_interval_seconds": 3600}})
    yield p
    p.stop()


def cli(p: Proctor, who: str, group: str, *args: str, input: str | None = None):
    from proxy.workflows.cli import workflows

    runner = CliRunner(env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None, "HTTP_PROXY": None,
                            "http_proxy": None})
    return runner.invoke(workflows, [*args, "--as", who, "--group", group, "-c", str(p.config_path)],
                         input=input, catch_exceptions=False)


def failing_order(p: Proctor, work: Work, idp, failures: int, agent: str = "alice") -> tuple[str, str]:  # noqa: F811
    inst, quote_no = to_quote(p, work, idp, agent)
    path = f"/quotes/{quote_no}/orders"
    for _ in range(failures):
        assert call(p, work, idp, agent, path, status=500).status_code == 500
    return inst, path


def decided(p: Proctor, inst: str) -> list[tuple[str, str, str | None]]:
    return [(e["by"], e["resolution"], e.get("note")) for e in p.decisions()
            if e.get("type") == "workflow" and e.get("instance") == inst and e.get("event") == "decided"]


def line_of(output: str, inst: str) -> list[str]:
    found = [line for line in output.splitlines() if line.startswith(inst)]
    assert len(found) == 1, output
    return found[0].split()


def test_inbox_lists_the_groups_items_and_decide_retry_unblocks_the_agent(cp, work, idp) -> None:  # noqa: F811
    inst, path = failing_order(cp, work, idp, 2)
    (item,) = items_of(cp, person(idp, "bea", BUYERS), inst)

    r = cli(cp, "bea", BUYERS, "inbox")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split()[:6] == ["instance", "item", "workflow", "step", "group", "why"]
    row = line_of(r.output, inst)
    assert row[1:5] == [item["id"], "orders", "order", BUYERS], row
    assert " ".join(row[5:]).startswith("failed 2 times open alice "), row
    assert "proctor workflows decide INSTANCE ITEM retry|take-over|complete|close" in r.output
    # --json: the API's document, each item with the instance's history
    r = cli(cp, "bea", BUYERS, "inbox", "--workflow", "orders", "--json")
    assert r.exit_code == 0, r.output
    (doc,) = [i for i in json.loads(r.output)["items"] if i["instance"] == inst]
    assert doc["id"] == item["id"] and doc["reason"] == "failures" and doc["failures"] == 2
    assert [(h["step"], h["outcome"]) for h in doc["history"]] == [
        ("request", "completed"), ("quote", "completed"), ("order", "failed"), ("order", "failed")]
    # another group's person sees nothing of it, and cannot decide it (it looks absent)
    r = cli(cp, "rita", RECEIVERS, "inbox")
    assert r.exit_code == 0 and inst not in r.output, r.output
    r = cli(cp, "rita", RECEIVERS, "decide", inst, item["id"], "retry")
    assert r.exit_code == 1 and "404 No such item" in r.output, r.output
    assert decided(cp, inst) == []

    # a buyer allows retries: the agent's next call reaches the upstream
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "retry", "--note", "supplier fixed the catalogue")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{inst}: agents may call the step again with a fresh retry budget"
    assert decided(cp, inst) == [("bea", "retry", "supplier fixed the catalogue")]
    # a second decision: 409, the first one stands
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "close")
    assert r.exit_code == 1 and "409 Already resolved" in r.output and "(retry) by bea" in r.output, r.output
    r = cli(cp, "bea", BUYERS, "inbox", "--workflow", "orders")
    assert r.exit_code == 0 and inst not in r.output, r.output
    before = upstream_calls(work, path)
    ok = call(cp, work, idp, "alice", path)
    assert ok.status_code == 201 and header(ok)["instance"] == inst, ok.text
    assert upstream_calls(work, path) == before + 1


def test_take_over_then_complete_with_an_object(cp, work, idp) -> None:  # noqa: F811
    inst, path = failing_order(cp, work, idp, 3)
    (item,) = items_of(cp, person(idp, "bea", BUYERS), inst)
    row = line_of(cli(cp, "bea", BUYERS, "inbox").output, inst)
    assert " ".join(row[5:]).startswith("gave up after failing 3 times open alice"), row

    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "take-over", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert (doc["resolution"], doc["decided_by"], doc["closed"]) == ("take-over", "bea", False)
    row = line_of(cli(cp, "bea", BUYERS, "inbox").output, inst)
    assert "taken by bea" in " ".join(row), row
    refused = call(cp, work, idp, "alice", path)
    assert refused.status_code == 409 and refused.json()["type"].endswith("/step-rerouted"), refused.text
    # someone else of the group cannot take it over too
    r = cli(cp, "ben", BUYERS, "decide", inst, item["id"], "take-over")
    assert r.exit_code == 1 and "409 Already taken" in r.output, r.output

    order_no = f"PO-{uuid.uuid4().hex[:8]}"
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "complete", "--object", f"Order:{order_no}",
            "--note", "placed by phone")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{inst}: the step is recorded completed by you; done request, quote, order; running"
    receipt = call(cp, work, idp, "carol", f"/orders/{order_no}/receipts")
    assert receipt.status_code == 201 and header(receipt)["instance"] == inst, receipt.text
    assert decided(cp, inst) == [("bea", "take-over", None), ("bea", "complete", "placed by phone")]


def test_close_refuses_the_agent_and_retry_to_another_agent(cp, work, idp) -> None:  # noqa: F811
    inst, path = failing_order(cp, work, idp, 2)
    (item,) = items_of(cp, person(idp, "olga", "proctor-admins"), inst)
    # an operator closes it (not a terminal: no confirmation asked)
    r = cli(cp, "olga", "proctor-admins", "decide", inst, item["id"], "close", "--note", "duplicate order")
    assert r.exit_code == 0, r.output
    assert "closed as failed" in r.output and "409 instance-closed" in r.output
    refused = call(cp, work, idp, "alice", path)
    assert refused.status_code == 409 and refused.json()["type"].endswith("/instance-closed"), refused.text
    assert "closed as failed by olga (duplicate order)" in refused.json()["detail"]
    r = cli(cp, "olga", "proctor-admins", "decide", inst, item["id"], "retry")
    assert r.exit_code == 1 and r.output.startswith("error: 409 "), r.output

    other, other_path = failing_order(cp, work, idp, 2)
    (item,) = items_of(cp, person(idp, "bea", BUYERS), other)
    r = cli(cp, "bea", BUYERS, "decide", other, item["id"], "retry", "--to", "bob")
    assert r.exit_code == 0 and "(only bob from now on)" in r.output, r.output
    assert call(cp, work, idp, "alice", other_path).status_code == 409  # the step is bob's now
    assert call(cp, work, idp, "bob", other_path).status_code == 201


def test_decide_usage_errors_send_nothing(cp, work, idp) -> None:  # noqa: F811
    inst, _ = failing_order(cp, work, idp, 2)
    (item,) = items_of(cp, person(idp, "bea", BUYERS), inst)
    cases = [
        (["close", "--to", "bob"], "--to (the agent to give the step to) goes with retry"),
        (["retry", "--object", "Order:1"], "--object (what your work made) goes with complete"),
        (["complete", "--object", "Order"], "--object must be Type:id"),
        (["complete", "--object", "Bad Type:1"], "--object must be Type:id"),
        (["complete", "--object", "Order:"], "--object must be Type:id"),
        (["retry", "--to", "  "], "--to is empty"),
    ]
    for args, message in cases:
        r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], *args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "maybe")
    assert r.exit_code == 2 and "maybe" in r.output, r.output
    r = cli(cp, "bea", BUYERS, "decide", "wfi_nope", "wfe_nope", "retry")
    assert r.exit_code == 1 and "404 No such item" in r.output, r.output
    # the API's own refusals are printed with its problem title and detail
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "complete", "--object", "Nope:1")
    assert r.exit_code == 1 and "400 Unknown object type" in r.output and "'Nope'" in r.output, r.output
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "retry", "--to", "human:eve")
    assert r.exit_code == 1 and "400 Bad agent" in r.output, r.output
    assert decided(cp, inst) == [] and len(items_of(cp, person(idp, "bea", BUYERS), inst)) == 1



def test_close_on_a_terminal_asks_first(cp, work, idp, monkeypatch) -> None:  # noqa: F811
    inst, path = failing_order(cp, work, idp, 2)
    (item,) = items_of(cp, person(idp, "bea", BUYERS), inst)
    monkeypatch.setattr("proxy.workflows.cli._interactive", lambda: True)
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "close", input="n\n")
    assert r.exit_code == 1 and f"Close instance {inst} as failed?" in r.output and "Aborted" in r.output, r.output
    assert decided(cp, inst) == [] and len(items_of(cp, person(idp, "bea", BUYERS), inst)) == 1
    r = cli(cp, "bea", BUYERS, "decide", inst, item["id"], "close", input="y\n")
    assert r.exit_code == 0 and "closed as failed" in r.output, r.output
    assert decided(cp, inst) == [("bea", "close", None)]
    assert call(cp, work, idp, "alice", path).status_code == 409
