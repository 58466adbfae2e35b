"""The demo's rate limit and budget config (proxy/demo/limits.py), and what the demo prints
about them, without starting anything (the demo itself: tests/test_demo.py)."""

from __future__ import annotations

from decimal import Decimal

from proxy.config import load_config
from proxy.demo import limits


def test_the_written_config_is_the_embedded_default_plus_the_limits_with_state_next_to_it(tmp_path):
    cfg = load_config(limits.write_config(tmp_path))
    assert cfg.state_dir == tmp_path.resolve()
    assert cfg.store_url == f"sqlite://{tmp_path.resolve() / 'proctor.db'}"
    assert [(r.name, r.limit, r.burst, r.key) for r in cfg.rate_limits] == [("crm-queries", 30, 3, ["agent"])]
    (b,) = cfg.budgets
    assert (b.name, b.key, b.limit, b.soft_threshold, b.on_exceed, b.period) == (
        "po-spend-monthly", ["group"], Decimal("40000"), Decimal("0.75"), "hold", "month")
    assert b.cost is not None and b.cost.field == "net_amount"


def _event(decision_id: str, event: str, outcome: str, group: str, spent: str, reserved: str) -> dict:
    return {"type": "budget", "event": event, "budget": limits.BUDGET, "key": {"group": group}, "spent": spent,
            "reserved": reserved, "outcome": outcome, "agent": "a", "decision_id": decision_id}


def test_budget_events_one_line_per_call_and_event_with_its_groups():
    results = [{"agent": "a", "step": "order 5 servers (EUR 26,000)", "decision_id": "1"},
               {"agent": "b", "step": "order 8 laptops (EUR 9,599.92)", "decision_id": "2"}]
    events = [_event("1", "soft_threshold", "reserved", "g2", "4799.96", "26000"),
              _event("1", "soft_threshold", "reserved", "g1", "4799.96", "26000"),
              {**_event("9", "soft_threshold", "reserved", "g1", "1", "0"), "budget": "another"},
              _event("2", "exhausted", "extended", "g1", "30799.96", "9599.92")]
    assert limits.budget_event_lines(events, results) == [
        "  soft_threshold       a, order 5 servers (EUR 26,000): groups g1, g2 at EUR 30,799.96 (77 %)",
        "  exhausted, extended  b, order 8 laptops (EUR 9,599.92): group g1 at EUR 40,399.88 (101 %)",
    ]


def test_ledger_lines_from_the_budgets_api():
    ledger = {"key": {"group": "g1"}, "spent": "40399.88", "remaining": "0", "soft_reached": True}
    doc = {"budgets": [{"name": "another", "ledgers": []},
                       {"name": limits.BUDGET, "ledgers": [
                           {"key": {"group": "g2"}, "spent": "100", "remaining": "39900", "soft_reached": False},
                           ledger]}]}
    assert limits.ledger_lines(doc) == [
        "  group g1                    EUR 40,399.88 spent (101 %), EUR 0 remaining, soft threshold reached",
        "  group g2                    EUR 100 spent (0 %), EUR 39,900 remaining",
    ]
    assert limits.ledger_lines({"budgets": [{"name": limits.BUDGET, "ledgers": []}]}) == ["  (nothing spent)"]
    assert limits.ledger_lines({"budgets": []}) == ["  (not declared)"]


def test_rate_limit_cells():
    throttled = {"rate_limit": {"name": "crm-queries", "limit": 30, "period_seconds": 60.0, "burst": 3,
                                "key": {"agent": "report-bot"}}, "retry_after": "2"}
    assert limits.rate_limit_cell(throttled) == "crm-queries: 30 a minute per agent, 3 at once; Retry-After <= 2 s"
    # a slower run sees a shorter wait: the same cell
    assert limits.rate_limit_cell({**throttled, "retry_after": "1"}) == limits.rate_limit_cell(throttled)
    assert limits.rate_limit_cell({**throttled, "retry_after": "7"}).endswith("Retry-After 7 s")
    assert limits.rate_limit_cell({"remaining": 0}) == "crm-queries: 0 left"
    assert limits.rate_limit_cell({"remaining": 1, "retried": [429]}) == "after 429 and its Retry-After"
    assert limits.rate_limit_cell({}) is None
