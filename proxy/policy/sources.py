"""Where a policy set comes from: the schema, the policy directory, entities, connectors."""

from __future__ import annotations

from pathlib import Path

from ..config import ProctorConfig
from ..connectors.manifest import load_manifests
from ..limits.budget_table import budget_actions
from ..limits.table import usage_actions
from ..workflows.spec import load_workflows
from .engine import PolicySource


def policy_source(
    config: ProctorConfig,
    policy_dir: Path | None = None,
    schema_file: Path | None = None,
    manifests: list | None = None,
) -> PolicySource:
    """The active policy set's source (or a candidate directory's), with the schema
    generated from the configured connectors unless turned off."""
    if policy_dir is None:
        pdir, schema, entities = config.policies.dir, config.schema_path, config.entities_path
    else:
        pdir, schema, entities = policy_dir, policy_dir / "schema.cedarschema", policy_dir / "entities.json"
    if schema_file is not None:
        schema = schema_file
    workflow_actions: frozenset[str] = frozenset()
    usage: tuple[tuple[str, bool], ...] = ()
    budget: tuple[tuple[str, bool], ...] = ()
    if config.policies.schema_from_connectors:
        if manifests is None:
            manifests = load_manifests(config.connectors_dir)
        workflow_actions = load_workflows(config.effective_workflows_dir, manifests).actions
        usage = tuple(sorted(usage_actions(config.rate_limits, manifests, workflow_actions).items()))
        budget = tuple(sorted(budget_actions(config.budgets, manifests, workflow_actions).items()))
    else:
        manifests = []
    return PolicySource(schema, pdir, entities, tuple(manifests), workflow_actions, usage, budget)
