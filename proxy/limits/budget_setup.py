"""Budgets from the config and the manifests, with their ledger (server.py builds it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .budget_table import BudgetTable, build_budget_table
from .ledger import BudgetLedger


@dataclass
class Budgets:
    """The compiled budgets and the ledger they reserve in (None when nothing is budgeted)."""

    table: BudgetTable
    ledger: BudgetLedger

    @property
    def backend(self) -> str:
        return self.ledger.backend


    async def close(self) -> None:
        close = getattr(self.ledger, "close", None)
        if close is not None:
            await close()


def build_budgets(config: Any, manifests: Iterable[Any], workflow_actions: frozenset[str], store: Any,
                  counters: Any = None) -> Budgets | None:
    """`config` is the ProctorConfig; `counters` the backend the rate limits already use (shared:
    one Redis pool), else one is made from `counters:`. Raises BudgetConfigError (a ValueError)
    for declarations that cannot work."""
    table = build_budget_table(config.budgets, manifests, workflow_actions, config.llm_prices)
    if not table:
        return None
    if counters is None:
        c = config.counters
        if c.backend == "redis":
            from .redis_backend import RedisCounters

            counters = RedisCounters(config.counters_redis_url, prefix=c.prefix, timeout=c.timeout_seconds)
        else:
            from .store_backend import StoreCounters

            counters = StoreCounters(store)
    return Budgets(table, counters)
